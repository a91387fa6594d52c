"""``mlgen generate WORKDIR --prompt TEXT ...``: restore a language-model run and sample from it."""

from __future__ import annotations

import argparse
import sys

from mlgen import runs, sharding
from mlgen.data.text import get_tokenizer
from mlgen.samplers.lm import Sampling, best_of_n, candidates, generate, max_length


def generate_main(argv: list[str]) -> int:
    """Samples text from a trained run (its config, checkpoint and tokenizer)."""
    ap = argparse.ArgumentParser(
        prog="mlgen generate", description="Sample text from a trained language model."
    )
    ap.add_argument("workdir", help="a run's workdir (its config.json and checkpoints)")
    ap.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for several)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--num-samples", type=int, default=1, help="completions printed per prompt")
    ap.add_argument(
        "--best-of",
        type=int,
        default=0,
        help="draw this many samples per prompt and print the --num-samples best by mean log-prob",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw parameters, not their EMA")
    ap.add_argument("overrides", nargs="*", help="config overrides for restoring, e.g. mesh.data=1")
    a = ap.parse_intermixed_args(argv)  # overrides may follow the flags

    result = runs.restore(a.workdir, a.overrides, step=a.step)
    cfg = result.config
    tok = get_tokenizer(cfg.data, a.workdir)
    state = result.state
    params = state["ema"] if "ema" in state and not a.no_ema else state["params"]
    model = (
        (result.graphdef, params, state["model_state"])
        if state.get("model_state")
        else (result.graphdef, params)
    )
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    add_bos = getattr(cfg.data, "add_bos", True)
    prompts = [([tok.bos_id] if add_bos else []) + tok.encode(p) for p in a.prompt]
    new = a.max_new_tokens
    limit = max_length(model)
    if limit is not None:
        new = min(new, limit - max(len(p) for p in prompts))
        if new < 1:
            print(
                f"mlgen generate: the prompt fills the model's max_length={limit}", file=sys.stderr
            )
            return 2
    kw = dict(
        max_new_tokens=new, sampling=sampling, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=a.seed
    )
    with sharding.use(result.mesh, result.rules):
        if a.best_of:
            n = max(a.best_of, a.num_samples)
            groups = [
                c[: a.num_samples] for c in best_of_n(model, prompts, n, decode=tok.decode, **kw)
            ]
        else:
            groups = candidates(
                generate(model, prompts, num_samples=a.num_samples, **kw), tok.decode
            )
    for text, cands in zip(a.prompt, groups):
        for j, c in enumerate(cands):
            rank = f" (best of {a.best_of} by mean log-prob)" if a.best_of else ""
            print(
                f"--- {text!r} sample {j + 1}/{len(cands)}{rank}  "
                f"mean log-prob {c.mean_logprob:.3f}"
            )
            print(text + c.text)
    return 0
