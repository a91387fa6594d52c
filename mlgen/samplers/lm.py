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
- sharded models: call under ``mlgen.sharding.use(mesh, rules)`` with sharded params.

The sampler knows a model only through the :class:`Decoder` protocol (``init_cache``,
``decode``, ``max_length``, ``for_decoding``): any family implementing it (a transformer, a
recurrent-state model, an imported checkpoint) samples here. ``mlgen generate WORKDIR`` is in
``mlgen.cli``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

__all__ = [
    "Candidate",
    "Chain",
    "Decoder",
    "Generation",
    "Greedy",
    "Sampling",
    "SamplingMethod",
    "Temperature",
    "TopK",
    "TopP",
    "best_of_n",
    "candidates",
    "generate",
    "max_length",
]

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

    def sample(self, logits: Float[Array, "B V"], key: jax.Array) -> Int[Array, " B"]:
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
            raise ValueError(
                f"Temperature: temperature must be > 0 (use Greedy for 0), got {self.temperature}"
            )

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
    """Applies the filters of ``methods`` in order, then samples (e.g. temperature,
    top-k, top-p)."""

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


# ----------------------------------------------------------------------------- the protocol
class Decoder(Protocol):
    """What the sampler needs from a model (an ``nnx.Module``).

    ``positions`` ``[B, T]`` give each token's position in its row; a negative position marks
    left padding, which a decoder must store as never-attended-to. Each layer owns its part of
    the cache (a KV cache for attention, conv + SSM state for a recurrent layer).
    """

    @property
    def max_length(self) -> int | None:
        """The longest prompt + continuation the model can take (None: unbounded)."""

    def init_cache(self, batch: int, max_len: int) -> Any:
        """An empty cache (a pytree) for ``batch`` rows of up to ``max_len`` tokens."""

    def decode(
        self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: Any
    ) -> tuple[Float[Array, "B V"], Any]:
        """Runs ``T`` new tokens per row; returns the next-token logits after the last one and
        the updated cache (``T`` is the prompt length for the prefill, then 1)."""

    def for_decoding(self) -> "Decoder":
        """The module the decoding loop carries
        (e.g. with per-layer weights sliced once); often self."""


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


@flax.struct.dataclass
class _Loop:
    """The decoding loop's carry."""

    i: jax.Array  # tokens emitted so far (the next output column)
    token: jax.Array  # [B] the last token of each row
    position: jax.Array  # [B] the position that token takes
    cache: Any
    tokens: jax.Array  # [B, max_new_tokens]
    logprobs: jax.Array  # [B, max_new_tokens]
    lengths: jax.Array  # [B]
    done: jax.Array  # [B]
    model: Any  # the decoder's state (merged at the loop's trace level)


def _bucket(n: int, minimum: int = 16) -> int:
    """Prompt length rounded up to a power of two, so few lengths compile."""
    return max(minimum, 1 << (n - 1).bit_length())


def _split_model(model) -> tuple[nnx.GraphDef, Any]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    graphdef, *states = model
    return graphdef, states[0] if len(states) == 1 else tuple(states)


def _merge(graphdef, state):
    return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


def prefill_positions(seg: Int[Array, "B P"]) -> Int[Array, "B P"]:
    """Positions of left-padded rows (``seg`` 0 = padding): 0.. on the first real token,
    -1 on padding."""
    return jnp.where(seg != 0, jnp.cumsum(seg != 0, axis=1) - 1, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new_tokens"))
def _generate(
    state,
    tokens,
    seg,
    key,
    stops,
    pad_id,
    *,
    graphdef,
    sampling: SamplingMethod,
    max_new_tokens: int,
):
    """tokens/seg ``[B, P]`` left-padded -> (tokens, logprobs ``[B, max_new_tokens]``,
    lengths ``[B]``).

    ``stops`` ``[S]`` holds the stop ids padded with -1 and ``pad_id`` is a scalar: both are
    traced, so changing them does not recompile.
    """
    decoder: Decoder = _merge(graphdef, state).for_decoding()
    loop_def, loop_state = nnx.split(decoder)
    B, P = tokens.shape
    positions = prefill_positions(seg)
    logits, cache = decoder.decode(tokens, positions, decoder.init_cache(B, P + max_new_tokens))

    def emit(c: _Loop, logits) -> _Loop:
        tok = sampling.sample(logits, jax.random.fold_in(key, c.i))
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(c.done, pad_id, tok)
        lp = jnp.where(c.done, 0.0, lp)
        return c.replace(
            i=c.i + 1,
            token=tok,
            lengths=c.lengths + (~c.done).astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.i)),
            logprobs=jax.lax.dynamic_update_slice(c.logprobs, lp[:, None], (0, c.i)),
            done=c.done | jnp.any(tok[:, None] == stops[None, :], axis=-1),
        )

    def cond(c: _Loop):
        return (c.i < max_new_tokens) & ~jnp.all(c.done)

    def body(c: _Loop) -> _Loop:
        logits, cache = nnx.merge(loop_def, c.model).decode(
            c.token[:, None], c.position[:, None], c.cache
        )
        return emit(c.replace(position=c.position + 1, cache=cache), logits)

    # The decoder's state rides in the carry (unchanged) so that the module is merged at the
    # loop's trace level (NNX modules may not cross trace levels).
    start = _Loop(
        i=jnp.int32(0),
        token=jnp.zeros((B,), jnp.int32),
        position=positions[:, -1] + 1,
        cache=cache,
        tokens=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        model=loop_state,
    )
    end = jax.lax.while_loop(cond, body, emit(start, logits))
    rep = lambda x: constrain(x, (None,) * x.ndim)  # noqa: E731  (whole on every host)
    return rep(end.tokens), rep(end.logprobs), rep(end.lengths)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingMethod | None = None,
    eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    num_samples: int = 1,
    prompt_bucket: int | None = 16,
) -> Generation:
    """Samples continuations of ``prompts`` with a cache.

    Args:
      model: a :class:`Decoder` module, or ``(graphdef, params[, model_state])`` as from
        ``nnx.split(model, nnx.Param, ...)`` / ``mlgen.restore``. Sharded params work: call
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
    max_len = _max_length(graphdef, state)
    if max_len is not None and longest + max_new_tokens > max_len:
        raise ValueError(
            f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_length={max_len}"
        )
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    tokens = np.full((len(rows), P), pad_id, np.int32)
    seg = np.zeros((len(rows), P), np.int32)
    for r, p in enumerate(rows):
        tokens[r, P - len(p) :] = p
        seg[r, P - len(p) :] = 1
    stop_set = sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set()))
    stops = np.full(max(4, 1 << max(len(stop_set) - 1, 0).bit_length()), -1, np.int32)
    stops[: len(stop_set)] = stop_set
    out = _generate(
        state,
        tokens,
        seg,
        jax.random.key(seed),
        stops,
        np.int32(pad_id),
        graphdef=graphdef,
        sampling=sampling,
        max_new_tokens=int(max_new_tokens),
    )
    tok, lp, lengths = (np.asarray(x) for x in jax.device_get(out))
    return Generation(tok, lp, lengths, num_samples)


def max_length(model) -> int | None:
    """The ``max_length`` of a decoder given as :func:`generate` takes it."""
    return _max_length(*_split_model(model))


def _max_length(graphdef: nnx.GraphDef, state) -> int | None:
    return _merge(graphdef, jax.eval_shape(lambda: state)).max_length  # abstract: nothing is copied


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


def best_of_n(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    max_new_tokens: int,
    sampling: SamplingMethod | None = None,
    score: Callable[[Any], float] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    **kw,
) -> list[list[Candidate]]:
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
    gen = generate(
        model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, num_samples=n, **kw
    )
    out = []
    for cands in candidates(gen, decode):
        for c in cands:
            c.score = (
                float(score(c.text if decode is not None else c.tokens))
                if score is not None
                else c.mean_logprob
            )
        out.append(sorted(cands, key=lambda c: -c.score))
    return out


def candidates(gen: Generation, decode: Callable[[list[int]], str] | None) -> list[list[Candidate]]:
    """The rows of ``gen`` grouped by prompt, in sample order, scored by mean log-prob."""
    n = gen.num_samples
    out = []
    for i in range(gen.tokens.shape[0] // n):
        cands = []
        for r in range(i * n, (i + 1) * n):
            toks = gen.tokens[r, : gen.lengths[r]].tolist()
            lps = gen.logprobs[r, : gen.lengths[r]].tolist()
            c = Candidate(toks, lps, 0.0, decode(toks) if decode is not None else None)
            c.score = c.mean_logprob
            cands.append(c)
        out.append(cands)
    return out
