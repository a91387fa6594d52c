"""BERT masking (15%, 80/10/10, real tokens only) and the MLM loss: on the selected positions
only, and it falls on a synthetic task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.config import ConfigError
from mlgen.models.encoder import Encoder, EncoderConfig
from mlgen.objectives.mlm import MLMObjectiveConfig, make_loss, mask_tokens
from mlgen.ops.attention import AttentionConfig
from tests.objectives.encoder_training import train

MASK = 40


def test_mask_tokens_selects_15_percent_and_replaces_80_10_10():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 200, (128, 1024)), jnp.int32)
    eligible = jnp.asarray(rng.random((128, 1024)) < 0.9)  # ~17.7k selected
    out, sel = mask_tokens(
        tokens,
        eligible,
        jax.random.key(0),
        mask_rate=0.15,
        replace_mask=0.8,
        replace_random=0.1,
        mask_id=250,
        random_vocab=200,
    )
    out, sel, tokens, eligible = map(np.asarray, (out, sel, tokens, eligible))
    assert not (sel & ~eligible).any()  # padding is never selected
    assert abs(sel.sum() / eligible.sum() - 0.15) < 0.005
    np.testing.assert_array_equal(out[~sel], tokens[~sel])  # unselected tokens unchanged
    masked = out[sel] == 250
    random = (out[sel] != 250) & (out[sel] != tokens[sel])
    kept = out[sel] == tokens[sel]
    assert abs(masked.mean() - 0.8) < 0.012  # 4 standard deviations
    assert abs(random.mean() - 0.1 * (1 - 1 / 200)) < 0.01  # a random draw may hit the original
    assert abs(kept.mean() - (0.1 + 0.1 / 200)) < 0.01
    assert out[sel][random].max() < 200


def _model(**kw):
    cfg = EncoderConfig(
        **{
            **dict(vocab_size=48, num_layers=2, d_model=32, num_heads=4),
            "attention": AttentionConfig(backend="xla"),
            **kw,
        }
    )
    return Encoder(cfg, rngs=nnx.Rngs(params=0))


def _arithmetic_rows(n, rows, length, seed):
    """Rows ``3 + (a + t) % 30`` (a random per row): a masked token is its left neighbour + 1,
    which only a model that reads context (both sides at a row's start) can know."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        start = rng.integers(0, 30, (rows, 1))
        tokens = (3 + (start + np.arange(length)[None]) % 30).astype(np.int32)
        seg = np.ones((rows, length), np.int32)
        seg[: rows // 2, length - 4 :] = 0  # some right padding
        yield {"inputs": np.where(seg > 0, tokens, 0).astype(np.int32), "segment_ids": seg}


def test_loss_is_cross_entropy_at_the_selected_positions_only():
    m = _model()
    cfg = MLMObjectiveConfig()
    graphdef, params = nnx.split(m, nnx.Param)
    params = nnx.to_pure_dict(params)
    loss = make_loss(graphdef, cfg, mask_id=MASK, random_vocab=33, train=False)
    batch = next(_arithmetic_rows(1, 4, 24, seed=0))
    rng = jax.random.key(3)
    value, (metrics, _) = jax.jit(loss)(params, {}, batch, rng)
    corrupted, sel = mask_tokens(
        jnp.asarray(batch["inputs"]),
        jnp.asarray(batch["segment_ids"] > 0),
        jax.random.split(rng)[0],
        mask_rate=cfg.mask_rate,
        replace_mask=cfg.replace_mask,
        replace_random=cfg.replace_random,
        mask_id=MASK,
        random_vocab=33,
    )
    logits = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(
        m, corrupted, jnp.asarray(batch["segment_ids"])
    )
    nll = (
        jax.nn.logsumexp(logits, -1)
        - jnp.take_along_axis(logits, jnp.asarray(batch["inputs"])[..., None], -1)[..., 0]
    )
    want = float(jnp.sum(nll * sel) / jnp.sum(sel))
    assert int(metrics["tokens"]) == int(sel.sum()) > 0
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert abs(float(jnp.mean(nll[batch["segment_ids"] > 0])) - want) > 1e-4  # not all positions
    assert 0.0 < float(metrics["masked_fraction"]) < 0.4


def test_mlm_loss_falls_on_a_synthetic_task():
    m = _model()
    cfg = MLMObjectiveConfig(mask_rate=0.2)

    def make(gd):
        return make_loss(gd, cfg, mask_id=MASK, random_vocab=33, train=True)

    _, _, losses = train(m, make, _arithmetic_rows(60, 16, 24, seed=1), lr=3e-3)
    # From above the uniform guess over the 30 symbols (log 30 = 3.4) to well below it: the
    # model reads the neighbours of a masked token.
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert first > np.log(30) and last < np.log(30) - 0.7, (first, last)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(mask_rate=0.0), "mask_rate"),
        (dict(replace_mask=1.2), "replace_mask"),
        (dict(replace_mask=0.8, replace_random=0.3), "replace_random"),
        (dict(mask_id=-2), "mask_id"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        MLMObjectiveConfig(**kw).validate()
