"""Samplers: ``mlgen.samplers.lm`` (KV-cache text decoding) and ``mlgen.samplers.diffusion``
(DDPM / DDIM / Euler / Heun / DPM-Solver++(2M) with classifier-free guidance and guidance
rescale). Import the submodule you need."""
