"""Encoder-decoder generation: the source encoded once, then KV-cache decoding of the target.

Supports:
- a batch of sources of different lengths, right-padded (mask 0) to a length bucket;
- the encoder run once per source, and each decoder layer's cross-attention keys / values
  computed once from its output (``cross_cache``); then the whole decode in ONE jitted
  ``lax.while_loop`` (no Python per token) that exits once every row has stopped;
- the sampling strategies of ``mlgen.samplers.lm`` (:class:`~mlgen.samplers.lm.Greedy`,
  ``Sampling(temperature=, top_k=, top_p=)``, ...); stopping on ``eos_id``; per-token
  log-probabilities; reproducible samples from a seed (``fold_in(key, step)``).

The sampler knows a model through :class:`Seq2SeqDecoder` only: ``encode``, ``cross_cache``,
``init_cache``, ``decode``, ``max_length``, ``for_decoding``
(``mlgen.models.encoder.EncoderDecoder``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlgen.samplers.lm import Generation, Greedy, SamplingMethod
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

__all__ = ["Seq2SeqDecoder", "generate"]


class Seq2SeqDecoder(Protocol):
    """What the sampler needs from an encoder-decoder (an ``nnx.Module``)."""

    @property
    def max_length(self) -> int | None:
        """The longest source or target the model takes (None: unbounded)."""

    def encode(self, tokens: Int[Array, "B S"], mask: Array) -> tuple[Float[Array, "B S D"], Any]:
        """``(memory, mask)`` of the sources."""

    def cross_cache(self, memory: Float[Array, "B S D"], mask: Any) -> Any:
        """What the decoder layers read from the source, computed once."""

    def init_cache(self, batch: int, max_len: int) -> Any:
        """An empty decoder cache for up to ``max_len`` target tokens."""

    def decode(
        self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: Any, cross: Any
    ) -> tuple[Float[Array, "B V"], Any]:
        """Next-token logits after the last of ``T`` new target tokens, and the cache."""

    def for_decoding(self) -> "Seq2SeqDecoder":
        """The module the decoding loop carries (often self)."""


@flax.struct.dataclass
class _Loop:
    i: jax.Array  # tokens emitted so far (the next output column; the next token's position)
    token: jax.Array  # [B] the last token of each row
    cache: Any
    tokens: jax.Array  # [B, max_new_tokens]
    logprobs: jax.Array  # [B, max_new_tokens]
    lengths: jax.Array  # [B]
    done: jax.Array  # [B]
    model: Any  # the decoder's state, merged at the loop's trace level
    cross: Any


def _split_model(model) -> tuple[nnx.GraphDef, Any]:
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    graphdef, *states = model
    return graphdef, states[0] if len(states) == 1 else tuple(states)


def _merge(graphdef, state):
    return nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new_tokens"))
def _generate(state, src, mask, key, bos_id, eos_id, pad_id, *, graphdef, sampling, max_new_tokens):
    model: Seq2SeqDecoder = _merge(graphdef, state).for_decoding()
    memory, memory_mask = model.encode(src, mask)
    cross = model.cross_cache(memory, memory_mask)
    loop_def, loop_state = nnx.split(model)
    B = src.shape[0]

    def cond(c: _Loop):
        return (c.i < max_new_tokens) & ~jnp.all(c.done)

    def body(c: _Loop) -> _Loop:
        pos = jnp.full((B, 1), c.i, jnp.int32)
        logits, cache = nnx.merge(loop_def, c.model).decode(c.token[:, None], pos, c.cache, c.cross)
        tok = sampling.sample(logits, jax.random.fold_in(key, c.i))
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(c.done, pad_id, tok)
        lp = jnp.where(c.done, 0.0, lp)
        return c.replace(
            i=c.i + 1,
            token=tok,
            cache=cache,
            lengths=c.lengths + (~c.done).astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.i)),
            logprobs=jax.lax.dynamic_update_slice(c.logprobs, lp[:, None], (0, c.i)),
            done=c.done | (tok == eos_id),
        )

    start = _Loop(
        i=jnp.int32(0),
        token=jnp.full((B,), bos_id, jnp.int32),
        cache=model.init_cache(B, max_new_tokens),
        tokens=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        model=loop_state,
        cross=cross,
    )
    end = jax.lax.while_loop(cond, body, start)
    rep = lambda x: constrain(x, (None,) * x.ndim)  # noqa: E731  (whole on every host)
    return rep(end.tokens), rep(end.logprobs), rep(end.lengths)


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def generate(
    model,
    sources: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    sampling: SamplingMethod | None = None,
    seed: int = 0,
    source_bucket: int | None = 16,
) -> Generation:
    """Generates a target for each source.

    Args:
      model: a :class:`Seq2SeqDecoder` module, or ``(graphdef, params[, model_state])``.
        Sharded params work: call inside ``mlgen.sharding.use(mesh, rules)``.
      sources: token ids, one non-empty list per source (lengths may differ).
      max_new_tokens: target tokens generated per row (fewer if every row stops).
      bos_id: the decoder's start token (position 0; not part of the output).
      eos_id: a row stops after emitting it (kept in the output); None = never stops early.
      pad_id: pads the sources and fills rows that stopped.
      sampling: a ``mlgen.samplers.lm.SamplingMethod`` (default greedy).
      seed: samples are a function of (seed, sources, settings).
      source_bucket: the padded source length is a power of two at least this (fewer
        compilations); None pads to the longest source only.

    Returns:
      A ``mlgen.samplers.lm.Generation``: ``tokens`` / ``logprobs`` ``[len(sources),
      max_new_tokens]`` and ``lengths``.
    """
    if not sources or any(len(s) == 0 for s in sources):
        raise ValueError("generate: every source needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Greedy() if sampling is None else sampling
    graphdef, state = _split_model(model)
    longest = max(len(s) for s in sources)
    S = longest if source_bucket is None else _bucket(longest, source_bucket)
    limit = _merge(graphdef, jax.eval_shape(lambda: state)).max_length
    if limit is not None:
        if longest > limit:
            raise ValueError(f"generate: a source of {longest} tokens exceeds max_length={limit}")
        if max_new_tokens > limit:
            raise ValueError(
                f"generate: max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_length={limit}"
            )
        S = min(S, limit)
    src = np.full((len(sources), S), pad_id, np.int32)
    mask = np.zeros((len(sources), S), np.int32)
    for r, s in enumerate(sources):
        src[r, : len(s)], mask[r, : len(s)] = s, 1
    out = _generate(
        state,
        src,
        mask,
        jax.random.key(seed),
        np.int32(bos_id),
        np.int32(-1 if eos_id is None else eos_id),
        np.int32(pad_id),
        graphdef=graphdef,
        sampling=sampling,
        max_new_tokens=int(max_new_tokens),
    )
    tok, lp, lengths = (np.asarray(x) for x in jax.device_get(out))
    return Generation(tok, lp, lengths)
