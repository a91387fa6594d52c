"""``mlgen generate WORKDIR --prompt TEXT ...``: restore a language-model run and sample from it.

Every mistake is one line naming its flag, found before the weights are restored where it can
be: the sampling flags, the workdir (a language-model run with a checkpoint), the step, the
tokenizer file. Prompt length:

- a prompt longer than the context the model was trained on (``data.seq_len`` tokens, bos
  included) is refused (``--prompt: ...``), never truncated: cutting the user's text
  silently would answer another question;
- with a bounded model (GPT-2's learned positions: ``max_length``), ``--max-new-tokens N``
  given explicitly must fit after the longest prompt (else ``--max-new-tokens: ...`` says how
  many do); left at its default it is "up to 200, as many as fit".
"""

from __future__ import annotations

from etils import epath

from mlgen import runs, sharding
from mlgen.cli.args import Parser, at_least
from mlgen.config import Config, InputError, check
from mlgen.data.pretrained import HF_TOKENIZER, SP_TOKENIZER
from mlgen.data.text import TOKENIZER_FILENAME, TextDataConfig, get_tokenizer
from mlgen.models.family import family_of
from mlgen.samplers.lm import Sampling, best_of_n, candidates, generate, max_length

DEFAULT_NEW_TOKENS = 200


def _parser() -> Parser:
    ap = Parser(prog="mlgen generate", description="Sample text from a trained language model.")
    ap.add_argument("workdir", help="a run's workdir (its config.json and checkpoints)")
    ap.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text (repeat for several); longer than the trained context "
        "(data.seq_len tokens) is an error, not truncated",
    )
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens to generate (default {DEFAULT_NEW_TOKENS}, or as many as fit in a model "
        "with a max_length; given explicitly, they must fit)",
    )
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
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
    return ap


def _check_flags(a) -> None:
    at_least(a.max_new_tokens, 1, "--max-new-tokens")
    at_least(a.temperature, 0, "--temperature", " (0 = greedy)")
    at_least(a.top_k, 0, "--top-k", " (0 = off)")
    check(
        0.0 < a.top_p <= 1.0, "--top-p", f"must be in (0, 1] (1 = off), got {a.top_p}", InputError
    )
    at_least(a.num_samples, 1, "--num-samples")
    at_least(a.best_of, 0, "--best-of", " (0 = off)")
    check(
        not a.best_of or a.best_of >= a.num_samples,
        "--best-of",
        f"{a.best_of} draws cannot give the --num-samples {a.num_samples} best",
        InputError,
    )


def _check_run(cfg: Config, workdir: str) -> None:
    """An LM run (a decoder on text) whose tokenizer can be loaded without training one."""
    family = family_of(cfg.model)
    check(
        family.kind == "decoder" and isinstance(cfg.data, TextDataConfig),
        "workdir",
        f"{workdir!r} is a {cfg.task} run of a {family.name} {family.kind}, not a language "
        "model (mlgen sample samples diffusion runs)",
        InputError,
    )
    d = cfg.data
    if d.tokenizer != "byte" and not d.tokenizer_path:
        names = (
            (HF_TOKENIZER, SP_TOKENIZER) if d.tokenizer == "pretrained" else (TOKENIZER_FILENAME,)
        )
        check(
            any((epath.Path(workdir) / name).is_file() for name in names),
            "workdir",
            f"{workdir!r} has no {' or '.join(names)} (the run's {d.tokenizer} tokenizer)",
            InputError,
        )


def _new_tokens(a, prompts: list[list[int]], seq_len: int, limit: int | None) -> int:
    """The tokens to generate, after checking the prompts' lengths (see the module docstring)."""
    for i, p in enumerate(prompts, 1):
        check(
            len(p) <= seq_len,
            "--prompt",
            f"prompt {i} is {len(p)} tokens, longer than the {seq_len}-token context the model "
            "was trained on (data.seq_len); shorten it",
            InputError,
        )
    if limit is None:
        return a.max_new_tokens or DEFAULT_NEW_TOKENS
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    room = limit - len(prompts[longest])
    check(
        room >= 1,
        "--prompt",
        f"prompt {longest + 1} is {len(prompts[longest])} tokens and fills the model's "
        f"max_length={limit}",
        InputError,
    )
    if a.max_new_tokens is None:
        return min(DEFAULT_NEW_TOKENS, room)
    check(
        a.max_new_tokens <= room,
        "--max-new-tokens",
        f"{a.max_new_tokens} do not fit: prompt {longest + 1} is {len(prompts[longest])} tokens "
        f"of the model's max_length={limit}, leaving room for {room}",
        InputError,
    )
    return a.max_new_tokens


def generate_main(argv: list[str]) -> int:
    """Samples text from a trained run (its config, checkpoint and tokenizer)."""
    a = _parser().parse_intermixed_args(argv)  # overrides may follow the flags
    _check_flags(a)
    cfg = runs.saved_config(a.workdir, a.overrides, step=a.step)  # checks the workdir and step
    _check_run(cfg, a.workdir)
    tok = get_tokenizer(cfg.data, a.workdir)
    add_bos = cfg.data.add_bos
    prompts = [([tok.bos_id] if add_bos else []) + tok.encode(p) for p in a.prompt]
    check(
        all(prompts),
        "--prompt",
        "an empty prompt needs a bos token, and this run has data.add_bos=false",
        InputError,
    )
    result = runs.restore(cfg, step=a.step)
    state = result.state
    params = state["ema"] if "ema" in state and not a.no_ema else state["params"]
    model = (
        (result.graphdef, params, state["model_state"])
        if state.get("model_state")
        else (result.graphdef, params)
    )
    new = _new_tokens(a, prompts, cfg.data.seq_len, max_length(model))
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    kw = dict(
        max_new_tokens=new, sampling=sampling, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=a.seed
    )
    with sharding.use(result.mesh, result.rules):
        if a.best_of:
            groups = [
                c[: a.num_samples]
                for c in best_of_n(model, prompts, a.best_of, decode=tok.decode, **kw)
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
