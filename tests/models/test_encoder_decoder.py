"""The T5-style encoder-decoder: source padding masked, cached decoding = the full forward,
greedy and sampled generation (``mlgen.samplers.seq2seq``), its FLOP count."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.models.encoder import (
    EncoderDecoder,
    EncoderDecoderConfig,
    seq2seq_flops_per_example,
)
from mlgen.ops.attention import AttentionConfig
from mlgen.samplers import lm as sampler_lm
from mlgen.samplers import seq2seq as sampler

V = 32
_SMALL = dict(vocab_size=V, num_layers=2, d_model=32, num_heads=4, max_len=32)


def _seq2seq(**kw):
    cfg = EncoderDecoderConfig(**{**_SMALL, "attention": AttentionConfig(backend="xla"), **kw})
    return EncoderDecoder(cfg, rngs=nnx.Rngs(params=1))


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, shape), jnp.int32)


@pytest.mark.parametrize("flavour", ["llama"])
def test_seq2seq_source_padding_is_masked(flavour):
    m = _seq2seq(flavour=flavour)
    src, dec = _tokens((2, 10)), _tokens((2, 6), seed=1)
    mask = jnp.asarray(np.arange(10)[None] < np.array([[6], [10]]), jnp.int32)
    fwd = nnx.jit(lambda m, s, d, k: m(s, d, input_mask=k))
    out = fwd(m, src, dec, mask)
    other = jnp.where(mask > 0, src, _tokens((2, 10), seed=7))
    np.testing.assert_allclose(np.asarray(fwd(m, other, dec, mask)), np.asarray(out), atol=1e-5)
    changed = src.at[0, 2].set((src[0, 2] + 1) % V)
    assert float(jnp.abs(fwd(m, changed, dec, mask) - out)[0].max()) > 1e-4


@pytest.mark.parametrize("flavour,tied,layers", [("llama", True, 3), ("bert", False, 0)])
def test_cached_decoding_equals_full_forward(flavour, tied, layers):
    """Feeding the decoder inputs one at a time through the KV cache (the encoder output and
    the cross keys / values computed once) gives the full forward's logits at every step."""
    m = _seq2seq(flavour=flavour, tie_embeddings=tied, num_decoder_layers=layers)
    src, dec = _tokens((2, 9)), _tokens((2, 5), seed=2)
    mask = jnp.asarray(np.arange(9)[None] < np.array([[5], [9]]), jnp.int32)
    full = nnx.jit(lambda m, s, d, k: m(s, d, input_mask=k))(m, src, dec, mask)

    @nnx.jit
    def stepwise(m, src, dec, mask):
        m = m.for_decoding()
        memory, real = m.encode(src, mask)
        cross, cache = m.cross_cache(memory, real), m.init_cache(2, 6)
        out = []
        for t in range(dec.shape[1]):
            logits, cache = m.decode(dec[:, t : t + 1], jnp.full((2, 1), t), cache, cross)
            out.append(logits)
        return jnp.stack(out, axis=1)

    np.testing.assert_allclose(np.asarray(stepwise(m, src, dec, mask)), np.asarray(full), atol=1e-5)
    params = nnx.to_pure_dict(nnx.split(m, nnx.Param)[1])
    assert ("head" in params["embedding"]) is not tied
    assert set(params["decoder"]["blocks"]) >= {"attn", "cross", "mlp"}
    assert "cross" not in params["encoder"]["blocks"]


def test_greedy_generation_equals_argmax_of_full_forward():
    """The sampler's greedy tokens are the argmax of the teacher-forced forward on its own
    output (so its cache, positions and bos are the training ones)."""
    m = _seq2seq()
    sources = [[5, 6, 7, 8, 2], [9, 10, 2]]
    gen = sampler.generate(m, sources, max_new_tokens=6, bos_id=1, eos_id=None, pad_id=0)
    assert gen.tokens.shape == (2, 6)
    src = np.zeros((2, 5), np.int32)
    mask = np.zeros((2, 5), np.int32)
    for r, s in enumerate(sources):
        src[r, : len(s)], mask[r, : len(s)] = s, 1
    dec = np.concatenate([np.ones((2, 1), np.int32), gen.tokens[:, :-1]], axis=1)
    logits = nnx.jit(lambda m, s, d, k: m(s, d, input_mask=k))(m, src, dec, mask)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), gen.tokens)
    # stopping: a row stops at eos and pads after it
    first = int(gen.tokens[0, 1])
    stopped = sampler.generate(m, sources, max_new_tokens=6, bos_id=1, eos_id=first)  # same jit
    assert stopped.lengths[0] == list(gen.tokens[0]).index(first) + 1
    assert (stopped.tokens[0, stopped.lengths[0] :] == 0).all()


def test_sampled_generation_is_reproducible_from_its_seed():
    m = _seq2seq()
    kw = dict(max_new_tokens=5, bos_id=1, sampling=sampler_lm.Sampling(temperature=1.5))
    a = sampler.generate(m, [[5, 6, 2]] * 4, seed=0, **kw)
    b = sampler.generate(m, [[5, 6, 2]] * 4, seed=0, **kw)
    c = sampler.generate(m, [[5, 6, 2]] * 4, seed=1, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert len({tuple(r) for r in a.tokens}) > 1  # rows of one source differ: it samples
    assert (a.logprobs <= 0).all() and (a.tokens < V).all()


def test_seq2seq_flops_grow_with_both_lengths():
    cfg = EncoderDecoderConfig(**_SMALL)
    base = seq2seq_flops_per_example(cfg, 16, 16)
    assert seq2seq_flops_per_example(cfg, 32, 16) > base
    assert seq2seq_flops_per_example(cfg, 16, 32) > base > 0
