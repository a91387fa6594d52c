"""The bidirectional encoder: attention is bidirectional and honours padding and packed rows,
cross-attention masks the context's padding, scanned = unrolled layers, config errors (the
encoder-decoder: test_encoder_decoder.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen import sharding
from mlgen.config import ConfigError
from mlgen.models import families
from mlgen.models.encoder import (
    Encoder,
    EncoderConfig,
    EncoderDecoderConfig,
)
from mlgen.nn.attention import CrossAttention
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig

V = 32
_SMALL = dict(vocab_size=V, num_layers=2, d_model=32, num_heads=4, max_len=32)


def _encoder(**kw):
    cfg = EncoderConfig(**{**_SMALL, "attention": AttentionConfig(backend="xla"), **kw})
    return Encoder(cfg, rngs=nnx.Rngs(params=0))


@nnx.jit
def _hidden(m, tok, mask):
    return m.encode(tok, mask)


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, V, shape), jnp.int32)


@pytest.mark.parametrize("flavour", ["llama"])
def test_encoder_is_bidirectional(flavour):
    """Changing the last token changes the first position's hidden state (a causal model's
    would not change)."""
    m = _encoder(flavour=flavour)
    tok = _tokens((2, 10))
    mask = jnp.ones((2, 10), jnp.int32)
    h0, _ = _hidden(m, tok, mask)
    h1, _ = _hidden(m, tok.at[:, -1].set((tok[:, -1] + 1) % V), mask)
    assert float(jnp.abs(h1[:, 0] - h0[:, 0]).max()) > 1e-4


@pytest.mark.parametrize("flavour", ["bert"])  # learned positions; llama: the packed-row test
def test_encoder_padding_changes_nothing(flavour):
    """Real positions' hidden states do not depend on what the padding holds; padding is zero
    in ``encode``'s output and its mask is the real-token mask."""
    m = _encoder(flavour=flavour)
    tok = _tokens((2, 12))
    lengths = np.array([7, 12])
    mask = jnp.asarray(np.arange(12)[None] < lengths[:, None], jnp.int32)
    h0, real = _hidden(m, tok, mask)
    other = jnp.where(mask > 0, tok, _tokens((2, 12), seed=5))
    h1, _ = _hidden(m, other, mask)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(real), np.asarray(mask > 0))
    assert float(jnp.abs(h0[0, 7:]).max()) == 0.0
    # ... and a padded row equals the same tokens run alone, unpadded
    alone, _ = _hidden(m, tok[:1, :7], jnp.ones((1, 7), jnp.int32))
    np.testing.assert_allclose(np.asarray(h0[0, :7]), np.asarray(alone[0]), atol=1e-5)


def test_encoder_packed_row_equals_documents_alone():
    m = _encoder()
    tok = _tokens((1, 12))
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    packed = nnx.jit(lambda m, t, s, p: m(t, segment_ids=s, positions=p))(m, tok, seg, pos)
    first = nnx.jit(lambda m, t: m(t))(m, tok[:, :5])
    second = nnx.jit(lambda m, t: m(t))(m, tok[:, 5:])
    np.testing.assert_allclose(np.asarray(packed[0, :5]), np.asarray(first[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[0, 5:]), np.asarray(second[0]), atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "blockwise"])
def test_cross_attention_masks_context_padding(backend):
    """Queries see only the real context positions: rewriting the padded ones changes nothing,
    rewriting a real one changes the output."""
    layer = CrossAttention(
        16, 4, 2, 8, context_dim=24, attention=AttentionConfig(backend=backend), rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, 9, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(9)[None] < np.array([[4], [9]]))
    run = nnx.jit(lambda layer, x, c, m: layer(x, c, context_mask=m))
    out = run(layer, x, ctx, mask)
    noise = jnp.asarray(rng.normal(size=ctx.shape), jnp.float32)
    padded_changed = jnp.where(mask[..., None], ctx, noise)
    np.testing.assert_allclose(
        np.asarray(run(layer, x, padded_changed, mask)), np.asarray(out), atol=1e-6
    )
    real_changed = ctx.at[0, 1].add(1.0)
    assert float(jnp.abs(run(layer, x, real_changed, mask) - out)[0].max()) > 1e-4
    # the masked layer on the first row = the same layer on its real prefix, unmasked
    alone = layer(x[:1], ctx[:1, :4])
    np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(alone), atol=1e-5)


def test_scan_and_unrolled_layers_agree():
    tok = _tokens((2, 8))
    a = nnx.jit(lambda m, t: m(t))(_encoder(scan_layers=True), tok)
    b = nnx.jit(lambda m, t: m(t))(_encoder(scan_layers=False), tok)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize(
    "cls,kw,field",
    [
        (EncoderConfig, dict(num_heads=3, d_model=32), "num_heads"),
        (EncoderConfig, dict(flavour="t5"), "flavour"),
        (EncoderConfig, dict(num_kv_heads=3), "num_kv_heads"),
        (EncoderConfig, dict(dropout=1.0), "dropout"),
        (EncoderConfig, dict(attention=AttentionConfig(backend="nope")), "attention.backend"),
        (EncoderDecoderConfig, dict(num_decoder_layers=-1), "num_decoder_layers"),
    ],
)
def test_config_errors_name_the_field(cls, kw, field):
    with pytest.raises(ConfigError) as e:
        cls(**{**_SMALL, **kw}).validate()
    assert str(e.value).startswith(f"{field}:") and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["encoder", "encoder_decoder"])
def test_declared_logical_axes_are_the_ones_the_models_use(name):
    """As tests/models/test_family.py checks the other families: ``logical_axes`` = the names on
    the parameters + those the forward constrains activations to + the batch axes."""
    family, used = families()[name], set()
    cls = EncoderConfig if name == "encoder" else EncoderDecoderConfig
    for flavour in ("llama", "bert"):
        cfg = cls(**{**_SMALL, "flavour": flavour, "tie_embeddings": flavour == "llama"})
        model = nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0), Policy()))  # noqa: B023
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            used |= {n for n in v.get_metadata()["out_sharding"] if n is not None}

        def forward(cfg=cfg):
            m = family.build(cfg, nnx.Rngs(0), Policy())
            tok = jnp.zeros((2, 8), jnp.int32)
            return m(tok) if name == "encoder" else m(tok, tok)

        with sharding.recording() as names:
            jax.eval_shape(forward)
        used |= names
    used |= {n for axes in family.batch_axes.values() for n in axes if n is not None}
    assert used == set(family.logical_axes), (
        sorted(used - family.logical_axes),
        sorted(family.logical_axes - used),
    )
