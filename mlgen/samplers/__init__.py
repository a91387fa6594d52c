"""Samplers: ``mlgen.samplers.lm`` (KV-cache text decoding) and ``mlgen.samplers.diffusion``
(DDPM / DDIM / Euler / Heun with classifier-free guidance). Import the submodule you need."""
