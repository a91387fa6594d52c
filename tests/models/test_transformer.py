"""The decoder-only LM: flavours, packing, scanned layers, remat, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.nn.policy import Policy
from mlgen.ops.attention import AttentionConfig
from mlgen.ops.losses import cross_entropy


def _model(policy=Policy(), **kw):
    cfg = TransformerConfig(
        **{
            **dict(
                vocab_size=64,
                num_layers=2,
                d_model=32,
                num_heads=4,
                num_kv_heads=2,
                attention=AttentionConfig(backend="reference"),
            ),
            **kw,
        }
    )
    return Transformer(cfg, policy=policy, rngs=nnx.Rngs(params=0))


@nnx.jit
def _fwd(m, tok, positions=None, segment_ids=None):
    return m(tok, positions=positions, segment_ids=segment_ids)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_forward_shapes_and_params(flavour):
    m = _model(flavour=flavour, max_len=16)
    tok = jnp.arange(24).reshape(2, 12) % 64
    assert _fwd(m, tok).shape == (2, 12, 64)
    params = nnx.to_pure_dict(nnx.split(m, nnx.Param)[1])
    if flavour == "gpt2":
        assert "pos_embed" in params and "head" not in params  # tied
        assert "bias" in params["blocks"]["attn"]["q"]
    else:
        assert "head" in params and params["blocks"]["attn"]["q"].get("bias") is None


def test_packed_row_equals_documents_run_separately():
    """A packed row's per-token losses equal those of its documents run alone (<= 1e-5)."""
    m = _model()
    rng = np.random.default_rng(0)
    lens = [5, 9, 7]
    docs = [rng.integers(0, 64, n + 1).astype(np.int32) for n in lens]
    inputs = np.concatenate([d[:-1] for d in docs])[None]
    targets = np.concatenate([d[1:] for d in docs])[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens])[None].astype(np.int32)
    packed = _fwd(m, jnp.asarray(inputs), jnp.asarray(pos), jnp.asarray(seg))
    packed_nll = (
        jax.nn.logsumexp(packed, -1) - jnp.take_along_axis(packed, targets[..., None], -1)[..., 0]
    )
    start = 0
    for d, n in zip(docs, lens):
        alone = _fwd(m, jnp.asarray(d[None, :-1]))
        nll = (
            jax.nn.logsumexp(alone, -1) - jnp.take_along_axis(alone, d[None, 1:, None], -1)[..., 0]
        )
        np.testing.assert_allclose(packed_nll[0, start : start + n], nll[0], atol=1e-5)
        start += n


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing_numerically(remat):
    tok = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)))

    def loss(m):
        return cross_entropy(m(tok[:, :-1]), tok[:, 1:])[0]

    base, ckpt = _model(), _model(Policy(remat=remat))
    grad = nnx.jit(nnx.grad(loss))
    gb = grad(base)
    gc = grad(ckpt)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(gb)), jax.tree.leaves(nnx.to_pure_dict(gc))):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_the_scan(remat):
    """scan_layers=False (one call per layer, as mlgen plan compiles to count every layer) has
    the same parameters, logits and gradients as the scanned stack."""
    tok = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)))

    def loss(m):
        return cross_entropy(m(tok[:, :-1]), tok[:, 1:])[0]

    scanned = _model(Policy(remat=remat), num_layers=3)
    unrolled = _model(Policy(remat=remat), num_layers=3, scan_layers=False)
    assert jax.tree.map(jnp.shape, nnx.state(scanned)) == jax.tree.map(
        jnp.shape, nnx.state(unrolled)
    )
    np.testing.assert_allclose(_fwd(scanned, tok), _fwd(unrolled, tok), atol=1e-5)
    grad = nnx.jit(nnx.grad(loss))
    for a, b in zip(
        jax.tree.leaves(nnx.to_pure_dict(grad(scanned))),
        jax.tree.leaves(nnx.to_pure_dict(grad(unrolled))),
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_kv_cache_decoding_matches_full_forward(flavour):
    """The decoder protocol: a 6-token prefill, then one token at a time, gives the full forward's
    next-token logits at every position."""
    m = _model(flavour=flavour, max_len=32)
    tok = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 14)))
    full = nnx.jit(lambda m, t: m(t))(m, tok)
    run = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
    pos = jnp.broadcast_to(jnp.arange(14, dtype=jnp.int32), (2, 14))
    out, cache = run(m, tok[:, :6], pos[:, :6], m.init_cache(2, 16))
    steps = [out]
    for t in range(6, 14):
        o, cache = run(m, tok[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(o)
    np.testing.assert_allclose(jnp.stack(steps, 1), full[:, 5:], atol=1e-5)
    assert len(cache) == m.cfg.num_layers and int(cache[0].index) == 14  # one cache per layer


def test_dropout_only_with_rng():
    m = _model(dropout=0.5)
    tok = jnp.zeros((1, 8), jnp.int32)
    np.testing.assert_array_equal(m(tok), m(tok))
    assert not np.allclose(m(tok, rng=jax.random.key(0)), m(tok))
