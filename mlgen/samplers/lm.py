"""Language-model generation: KV-cache decoding with sampling strategies and best-of-N.

Supports:
- sampling strategies as small frozen dataclasses behind one interface,
  :class:`SamplingMethod`: :class:`Greedy`, :class:`Temperature`, :class:`TopK`,
  :class:`TopP` (nucleus), combined with :class:`Chain` or the :func:`Sampling` shortcut
  (``Sampling(temperature=0.8, top_k=40, top_p=0.95)``);
- a batch of prompts of different lengths: left-padded (segment id 0) to a length bucket,
  with per-row positions starting at 0 on each row's first real token;
- one prefill pass that writes the KV cache, then the whole decode inside ONE jitted
  ``lax.while_loop`` (no Python per token), that exits once every row has stopped;
- stopping on ``eos_id`` / ``stop_ids`` (finished rows emit ``pad_id``, log-prob 0);
- per-token log-probabilities under the model (temperature 1, unfiltered);
- reproducible samples from a seed (per-step keys are ``fold_in(key, step)``);
- best-of-N: N samples per prompt ranked by mean log-probability or a user verifier;
- sharded models: call under ``mlgen.sharding.use(mesh, rules)`` with sharded params;
- ``mlgen generate WORKDIR --prompt TEXT ...`` (:func:`generate_main`).
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import functools
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgen.models.transformer import Transformer
from mlgen.nn.attention import KVCache
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

__all__ = ["Candidate", "Chain", "Generation", "Greedy", "Sampling", "SamplingMethod", "Temperature", "TopK",
           "TopP", "best_of_n", "generate", "generate_main"]

_NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------- strategies
class SamplingMethod(abc.ABC):
    """How the next token is drawn from logits ``[B, V]``.

    ``filter`` turns logits into the logits of the distribution actually sampled from
    (``-inf`` outside its support); ``sample`` draws one token per row from it. Filters
    compose left to right in :class:`Chain`.
    """

    @abc.abstractmethod
    def filter(self, logits: Float[Array, "B V"]) -> Float[Array, "B V"]:
        """Logits of the sampled distribution (unnormalised; ``-inf`` = never drawn)."""

    def sample(self, logits: Float[Array, "B V"], key: jax.Array) -> Int[Array, "B"]:
        return jax.random.categorical(key, self.filter(logits), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Greedy(SamplingMethod):
    """The most likely token (deterministic; the key is unused)."""

    def filter(self, logits):
        best = jnp.argmax(logits, axis=-1)
        keep = jnp.arange(logits.shape[-1]) == best[..., None]
        return jnp.where(keep, logits, _NEG_INF)

    def sample(self, logits, key):
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature(SamplingMethod):
    """Samples from ``softmax(logits / temperature)``."""

    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"Temperature: temperature must be > 0 (use Greedy for 0), got {self.temperature}")

    def filter(self, logits):
        return logits / jnp.asarray(self.temperature, logits.dtype)


@dataclasses.dataclass(frozen=True)
class TopK(SamplingMethod):
    """Samples among the ``k`` most likely tokens only (renormalised)."""

    k: int

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"TopK: k must be >= 1, got {self.k}")

    def filter(self, logits):
        if self.k >= logits.shape[-1]:
            return logits
        _, idx = jax.lax.top_k(logits, self.k)
        # Masking by index (not by a value threshold) keeps exactly k tokens, even with ties.
        keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], idx].set(True)
        return jnp.where(keep, logits, _NEG_INF)


@dataclasses.dataclass(frozen=True)
class TopP(SamplingMethod):
    """Nucleus sampling: the smallest set of most likely tokens whose mass reaches ``p``,
    renormalised. The most likely token is always kept."""

    p: float

    def __post_init__(self):
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"TopP: p must be in (0, 1], got {self.p}")

    def filter(self, logits):
        if self.p >= 1.0:
            return logits
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < self.p
        rows = jnp.arange(logits.shape[0])[:, None]
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
        return jnp.where(keep, logits, _NEG_INF)


@dataclasses.dataclass(frozen=True)
class Chain(SamplingMethod):
    """Applies the filters of ``methods`` in order, then samples (e.g. temperature, top-k, top-p)."""

    methods: tuple[SamplingMethod, ...]

    def __init__(self, *methods: SamplingMethod):
        object.__setattr__(self, "methods", tuple(methods))

    def filter(self, logits):
        for m in self.methods:
            logits = m.filter(logits)
        return logits


def Sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingMethod:  # noqa: N802
    """The usual knobs as one method: ``temperature`` 0 is greedy; ``top_k`` 0 and
    ``top_p`` 1 disable those filters. Order: temperature, top-k, top-p (as in transformers)."""
    if temperature == 0:
        return Greedy()
    parts: list[SamplingMethod] = []
    if temperature != 1.0:
        parts.append(Temperature(temperature))
    if top_k:
        parts.append(TopK(top_k))
    if top_p < 1.0:
        parts.append(TopP(top_p))
    if not parts:
        return Temperature(1.0)
    return parts[0] if len(parts) == 1 else Chain(*parts)


# ----------------------------------------------------------------------------- generation
@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns (host numpy arrays).

    tokens ``[R, max_new_tokens]`` with ``pad_id`` after a row stopped; logprobs ``[R,
    max_new_tokens]`` (the model's log-probability of each token, 0 after stopping);
    lengths ``[R]`` (generated tokens per row, the stop token included). With
    ``num_samples = n``, rows ``i*n .. i*n+n-1`` are the samples of prompt ``i``.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    num_samples: int = 1

    def completions(self) -> list[list[int]]:
        """Each row's generated tokens (the stop token included, padding removed)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def mean_logprobs(self) -> np.ndarray:
        return self.logprobs.sum(-1) / np.maximum(self.lengths, 1)


def _bucket(n: int, minimum: int = 16) -> int:
    """Prompt length rounded up to a power of two, so few lengths compile."""
    return max(minimum, 1 << (n - 1).bit_length())


def _split_model(model) -> tuple[nnx.GraphDef, Any]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    graphdef, params = model
    return graphdef, params


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new_tokens", "copy_layers"))
def _generate(state, tokens, seg, key, stops, pad_id, *, graphdef, sampling: SamplingMethod, max_new_tokens: int,
              copy_layers: bool):
    """tokens/seg ``[B, P]`` left-padded -> (tokens, logprobs ``[B, max_new_tokens]``, lengths ``[B]``).

    ``stops`` ``[S]`` holds the stop ids padded with -1 and ``pad_id`` is a scalar: both are
    traced, so changing them does not recompile. ``copy_layers`` slices each layer's weights
    out of the stacked ones once, before the loop, instead of at every token: XLA:CPU copies
    such slices at every token (15-25% of the time per token at the benchmark's shapes) while GPU/TPU gemms read
    them in place, so only CPU pays the extra copy of the block weights in memory.
    """
    model: Transformer = nnx.merge(graphdef, state)
    B = tokens.shape[0]
    logits, pos, caches = _prefill(model, tokens, seg, tokens.shape[1] + max_new_tokens)
    out_tok = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    out_lp = jnp.zeros((B, max_new_tokens), jnp.float32)

    def emit(i, logits, out_tok, out_lp, done):
        tok = sampling.sample(logits, jax.random.fold_in(key, i))
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, i))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i))
        done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
        return tok, out_tok, out_lp, done

    done0 = jnp.zeros((B,), bool)
    tok, out_tok, out_lp, done = emit(0, logits, out_tok, out_lp, done0)
    lengths = jnp.ones((B,), jnp.int32)

    def cond(carry):
        i, *_, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    layers = _layer_weights(model) if copy_layers else None

    def body(carry):
        i, tok, pos, caches, out_tok, out_lp, lengths, done, (state, layers) = carry
        logits, caches = _decode_step(nnx.merge(graphdef, state), tok, pos, caches, layers)
        lengths = lengths + (~done).astype(jnp.int32)
        tok, out_tok, out_lp, done = emit(i, logits, out_tok, out_lp, done)
        return i + 1, tok, pos + 1, caches, out_tok, out_lp, lengths, done, (state, layers)

    # The parameters ride in the carry (unchanged) so that the model is merged at the loop's
    # trace level (NNX modules may not cross trace levels).
    carry = (jnp.int32(1), tok, pos, caches, out_tok, out_lp, lengths, done, (state, layers))
    _, _, _, _, out_tok, out_lp, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    rep = lambda x: constrain(x, (None,) * x.ndim)  # noqa: E731  (whole on every host)
    return rep(out_tok), rep(out_lp), rep(lengths)


def _prefill(model: Transformer, tokens: Int[Array, "B P"], seg: Int[Array, "B P"], cache_len: int
             ) -> tuple[Float[Array, "B V"], Int[Array, "B"], tuple[KVCache, ...]]:
    """Runs the left-padded prompts (``seg`` 0 = padding) in one pass that fills a fresh cache.

    Returns the next-token logits of each row, the position of the next token of each row
    and one cache per layer (for :func:`_decode_step`).
    """
    positions = jnp.maximum(jnp.cumsum(seg != 0, axis=1) - 1, 0).astype(jnp.int32)
    cache = model.init_cache(tokens.shape[0], cache_len)
    hidden, cache = model(tokens, positions=positions, segment_ids=seg, cache=cache, return_hidden=True)
    logits = model.logits(hidden[:, -1:])[:, 0]  # only the last position: no [B, P, V] logits
    caches = tuple(jax.tree.map(lambda a: a[layer], cache) for layer in range(model.cfg.num_layers))
    return logits, positions[:, -1] + 1, caches


def _layer_weights(model: Transformer) -> tuple[nnx.GraphDef, tuple[Any, ...]]:
    """One block's graph and each layer's slice of the stacked block state."""
    block_def, stacked = nnx.split(model.blocks)
    return block_def, tuple(jax.tree.map(lambda a: a[layer], stacked) for layer in range(model.cfg.num_layers))


def _decode_step(model: Transformer, tok: Int[Array, "B"], pos: Int[Array, "B"], caches: tuple[KVCache, ...],
                 layers: tuple[nnx.GraphDef, tuple[Any, ...]] | None = None
                 ) -> tuple[Float[Array, "B V"], tuple[KVCache, ...]]:
    """One token per row through the model, with one cache per layer.

    The same computation as ``model(tok[:, None], positions=..., cache=...)`` (checked by
    the tests), but with the layers unrolled over separate per-layer caches: the model's
    layer scan passes the stacked cache through as scanned inputs/outputs, which makes XLA
    copy the whole cache several times per token (measured ~3x slower on CPU at the
    benchmark's shapes); here each cache is updated in place inside the while loop.
    ``layers`` (from :func:`_layer_weights`) are the per-layer weights if already sliced.
    """
    B = tok.shape[0]
    tokens, positions = tok[:, None], pos[:, None]
    x = model.embed(tokens)
    if model.pos_embed is not None:
        x = x + jnp.take(model.pos_embed[...], positions, axis=0).astype(x.dtype)
    x = constrain(x, ("batch", "length", "act_embed"))
    block_def, layer_states = _layer_weights(model) if layers is None else layers
    seg = jnp.ones((B, 1), jnp.int32)
    new = []
    for layer, cache in enumerate(caches):
        block = nnx.merge(block_def, layer_states[layer])
        x, cache = block(x, positions=positions, segment_ids=seg, cache=cache)
        new.append(cache)
    return model.logits(model.final_norm(x))[:, 0], tuple(new)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingMethod | None = None, eos_id: int | None = None, stop_ids: Sequence[int] = (),
             pad_id: int = 0, seed: int = 0, num_samples: int = 1, prompt_bucket: int | None = 16) -> Generation:
    """Samples continuations of ``prompts`` with a KV cache.

    Args:
      model: an ``mlgen.models.transformer.Transformer``, or ``(graphdef, params)`` as from
        ``nnx.split(model, nnx.Param)`` / ``trainer.restore``. Sharded params work: call
        inside ``mlgen.sharding.use(mesh, rules)``.
      prompts: token ids, one non-empty list per prompt (lengths may differ).
      max_new_tokens: tokens generated per row (fewer if every row stops).
      sampling: a :class:`SamplingMethod` (default :class:`Greedy`).
      eos_id, stop_ids: a row stops after emitting any of them (the stop token is kept).
      pad_id: emitted by rows that stopped, and used to left-pad prompts.
      seed: samples are a function of (seed, prompts, settings).
      num_samples: rows per prompt (independent samples).
      prompt_bucket: the padded prompt length is a power of two at least this (fewer
        compilations); ``None`` pads to the longest prompt only.

    Returns:
      A :class:`Generation` with ``tokens``/``logprobs`` ``[len(prompts) * num_samples,
      max_new_tokens]`` and ``lengths``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. bos)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Greedy() if sampling is None else sampling
    graphdef, state = _split_model(model)
    longest = max(len(p) for p in prompts)
    P = longest if prompt_bucket is None else _bucket(longest, prompt_bucket)
    max_len = _position_limit(graphdef, state)
    if max_len is not None:
        if longest + max_new_tokens > max_len:
            raise ValueError(f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"max_len={max_len}")
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    tokens = np.full((len(rows), P), pad_id, np.int32)
    seg = np.zeros((len(rows), P), np.int32)
    for r, p in enumerate(rows):
        tokens[r, P - len(p):] = p
        seg[r, P - len(p):] = 1
    stop_set = sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set()))
    stops = np.full(max(4, 1 << max(len(stop_set) - 1, 0).bit_length()), -1, np.int32)
    stops[:len(stop_set)] = stop_set
    out = _generate(state, tokens, seg, jax.random.key(seed), stops, np.int32(pad_id), graphdef=graphdef,
                    sampling=sampling, max_new_tokens=int(max_new_tokens),
                    copy_layers=jax.default_backend() == "cpu")
    tok, lp, lengths = (np.asarray(x) for x in jax.device_get(out))
    return Generation(tok, lp, lengths, num_samples)


def _position_limit(graphdef, state) -> int | None:
    """The learned-position table size (gpt2 flavour), else None (RoPE has no limit)."""
    model = nnx.merge(graphdef, jax.eval_shape(lambda: state))  # abstract: nothing is copied
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "flavour", None) == "gpt2":
        return cfg.max_len
    return None


# ----------------------------------------------------------------------------- best-of-N
@dataclasses.dataclass
class Candidate:
    """One sample of a prompt: its tokens, their log-probabilities, its score (and text)."""

    tokens: list[int]
    logprobs: list[float]
    score: float
    text: str | None = None

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


def best_of_n(model, prompts: Sequence[Sequence[int]], n: int, *, max_new_tokens: int,
              sampling: SamplingMethod | None = None, score: Callable[[Any], float] | None = None,
              decode: Callable[[list[int]], str] | None = None, **kw) -> list[list[Candidate]]:
    """Draws ``n`` samples per prompt and ranks them, best first.

    Args:
      score: a verifier ``score(x) -> float`` (higher is better), called on the decoded
        text when ``decode`` is given, else on the token list. Default: the mean
        log-probability of the sample under the model.
      decode: token ids -> text (e.g. ``tokenizer.decode``); fills ``Candidate.text``.
      **kw: passed to :func:`generate` (``eos_id``, ``seed``, ``pad_id`` …).

    Returns:
      For each prompt, its ``n`` :class:`Candidate` sorted by descending score.
    """
    if sampling is None:
        sampling = Temperature(1.0)
    gen = generate(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, num_samples=n, **kw)
    out = []
    for cands in _candidates(gen, decode):
        for c in cands:
            c.score = float(score(c.text if decode is not None else c.tokens)) if score is not None else c.mean_logprob
        out.append(sorted(cands, key=lambda c: -c.score))
    return out


def _candidates(gen: Generation, decode: Callable[[list[int]], str] | None) -> list[list[Candidate]]:
    """The rows of ``gen`` grouped by prompt, in sample order, scored by mean log-prob."""
    n = gen.num_samples
    out = []
    for i in range(gen.tokens.shape[0] // n):
        cands = []
        for r in range(i * n, (i + 1) * n):
            toks = gen.tokens[r, :gen.lengths[r]].tolist()
            lps = gen.logprobs[r, :gen.lengths[r]].tolist()
            c = Candidate(toks, lps, 0.0, decode(toks) if decode is not None else None)
            c.score = c.mean_logprob
            cands.append(c)
        out.append(cands)
    return out


# ----------------------------------------------------------------------------- CLI
def generate_main(argv: list[str]) -> int:
    """``mlgen generate WORKDIR --prompt TEXT [...]``: sample from a trained run."""
    ap = argparse.ArgumentParser(prog="mlgen generate", description="Sample text from a trained language model.")
    ap.add_argument("workdir", help="a run's workdir (its config.json and checkpoints)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--num-samples", type=int, default=1, help="completions printed per prompt")
    ap.add_argument("--best-of", type=int, default=0,
                    help="draw this many samples per prompt and print the --num-samples best by mean log-prob")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw parameters, not their EMA")
    ap.add_argument("overrides", nargs="*", help="config overrides for restoring, e.g. mesh.data=1")
    a = ap.parse_intermixed_args(argv)  # overrides may follow the flags

    from mlgen import sharding
    from mlgen.data.text import get_tokenizer
    from mlgen.train.trainer import restore

    result = restore(a.workdir, a.overrides, step=a.step)
    cfg = result.config
    tok = get_tokenizer(cfg.data, a.workdir)
    params = result.state["ema"] if "ema" in result.state and not a.no_ema else result.state["params"]
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    add_bos = getattr(cfg.data, "add_bos", True)
    prompts = [([tok.bos_id] if add_bos else []) + tok.encode(p) for p in a.prompt]
    max_len = cfg.model.max_len if cfg.model.flavour == "gpt2" else None
    new = a.max_new_tokens
    if max_len is not None:
        new = min(new, max_len - max(len(p) for p in prompts))
        if new < 1:
            print(f"mlgen generate: the prompt fills the model's max_len={max_len}", file=sys.stderr)
            return 2
    kw = dict(max_new_tokens=new, sampling=sampling, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=a.seed)
    model = (result.graphdef, params)
    with sharding.use(result.mesh, cfg.mesh.rules):
        if a.best_of:
            n = max(a.best_of, a.num_samples)
            groups = [c[:a.num_samples] for c in best_of_n(model, prompts, n, decode=tok.decode, **kw)]
        else:
            groups = _candidates(generate(model, prompts, num_samples=a.num_samples, **kw), tok.decode)
    for text, cands in zip(a.prompt, groups):
        for j, c in enumerate(cands):
            rank = f" (best of {a.best_of} by mean log-prob)" if a.best_of else ""
            print(f"--- {text!r} sample {j + 1}/{len(cands)}{rank}  mean log-prob {c.mean_logprob:.3f}")
            print(text + c.text)
    return 0
