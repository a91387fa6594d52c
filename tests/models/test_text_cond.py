"""Text-conditioned denoisers (UNet, DiT): padding is masked, the learned null embedding stands
for the empty prompt (and for dropped captions), guidance 0 / 1 reduce to the null-prompt /
prompt-only model, the text encoder can be frozen, bad fields are one-line errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.config import ConfigError
from mlgen.models.dit import PRESETS as DIT_PRESETS
from mlgen.models.dit import DiT
from mlgen.models.encoder import EncoderConfig
from mlgen.models.family import family_of
from mlgen.models.text import ImageCrossAttention, TextConfig
from mlgen.models.unet import PRESETS as UNET_PRESETS
from mlgen.models.unet import UNet
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, make_loss
from mlgen.samplers.diffusion import sample

S = 8
TEXT = TextConfig(
    encoder=EncoderConfig(vocab_size=256, num_layers=1, d_model=16, num_heads=2), max_len=S
)
CONFIGS = {
    "unet": (UNet, dataclasses.replace(UNET_PRESETS["unet-tiny"], context_dim=16, text=TEXT)),
    "dit": (DiT, dataclasses.replace(DIT_PRESETS["dit-tiny"], context_dim=16, text=TEXT)),
}


@functools.cache
def _randomised(name):
    """A model whose zero-initialised parameters (cross-attention outputs, adaLN, the pooled
    projection) are random too, so that every path from the text reaches the output. Built
    once per name by one compiled init (eager init runs op by op: slow)."""
    cls, cfg = CONFIGS[name]

    def build():
        model = cls(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        leaves, tree = jax.tree.flatten(nnx.to_pure_dict(params))
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [v + 0.2 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
        nnx.replace_by_pure_dict(params, jax.tree.unflatten(tree, leaves))
        return nnx.split(nnx.merge(graphdef, params))[1]

    graphdef = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))[0]
    return nnx.merge(graphdef, jax.jit(build)())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _randomised(request.param)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, tokens, mask):
    return nnx.merge(graphdef, state)(x, t, text_tokens=tokens, text_mask=mask)


def _run(model, x, t, tokens, mask):
    """``model(x, t, text_tokens=tokens, text_mask=mask)``, compiled once per model (the
    model's current parameters are an argument: changing one does not recompile)."""
    return _forward(*nnx.split(model), x, t, tokens, mask)


def _inputs():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    t = jnp.array([100.0, 700.0])
    tokens = jnp.array([[97, 32, 55, 9, 9, 9, 9, 9], [55, 55, 55, 55, 55, 9, 9, 9]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
    return x, t, tokens, mask


def test_cross_attention_ignores_padding(model):
    x, t, tokens, mask = _inputs()
    out = _run(model, x, t, tokens, mask)
    other_pad = jnp.where(mask == 0, 123, tokens)
    np.testing.assert_allclose(_run(model, x, t, other_pad, mask), out, rtol=1e-5, atol=1e-5)
    other_real = tokens.at[:, 0].set(50)  # a real token: the output follows it
    assert not np.allclose(_run(model, x, t, other_real, mask), out, atol=1e-4)
    # The cross-attention layers alone ignore whatever sits in the context's padded slots.
    ctx, cmask, _ = model.text(tokens, mask)
    assert cmask.tolist() == (mask != 0).tolist()
    layer = _first_cross(model)
    h = jax.random.normal(jax.random.key(3), (2, 5, layer.q.in_features[0]))
    noisy = jnp.where(cmask[..., None], ctx, 7.0 * jnp.ones_like(ctx))
    np.testing.assert_allclose(
        layer(h, noisy, context_mask=cmask), layer(h, ctx, context_mask=cmask), atol=1e-5
    )
    assert not np.allclose(
        layer(h, ctx + 1.0, context_mask=cmask), layer(h, ctx, context_mask=cmask)
    )


def _first_cross(model):
    if isinstance(model, UNet):
        return next(m for m in model.down if isinstance(m, ImageCrossAttention)).attn
    return nnx.merge(*_layer0(model.blocks.cross))  # layer 0 of the stacked (scanned) blocks


def _layer0(layer):
    graphdef, state = nnx.split(layer)
    return graphdef, jax.tree.map(lambda v: v[0], state)


def test_empty_prompt_is_the_learned_null(model):
    x, t, tokens, _ = _inputs()
    empty = jnp.zeros_like(tokens)
    ctx, cmask, _ = model.text(tokens, empty)
    np.testing.assert_allclose(ctx[:, 0], jnp.broadcast_to(model.text.null[...], ctx[:, 0].shape))
    assert cmask[:, 0].all() and not cmask[:, 1:].any()
    out = _run(model, x, t, tokens, empty)
    # The empty prompt's tokens do not matter; the null embedding does.
    np.testing.assert_allclose(_run(model, x, t, tokens + 1, empty), out, rtol=1e-5, atol=1e-5)
    saved = model.text.null[...]
    model.text.null[...] = saved + 1.0
    try:
        assert not np.allclose(_run(model, x, t, tokens, empty), out, atol=1e-4)
    finally:
        model.text.null[...] = saved


def test_caption_dropout_trains_the_null(model):
    """label_dropout replaces captions by the empty prompt (null_cond): the null embedding
    gets a gradient then, and none without dropout."""
    x, _, tokens, mask = _inputs()
    batch = {"images": jnp.tanh(x), "text_tokens": tokens, "text_mask": mask}
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    null = {"text_tokens": 0, "text_mask": 0}

    def null_grad(rate):
        obj = DiffusionObjectiveConfig(prediction="v", label_dropout=rate)
        loss = make_loss(
            graphdef, obj, train=True, cond_keys=("text_tokens", "text_mask"), null_cond=null
        )
        # jitted (the eager gradient ran op by op: 35 s of CPU for the UNet against 7)
        grad = jax.grad(lambda p: loss(p, {}, batch, jax.random.key(0))[0])
        return float(jnp.abs(jax.jit(lambda p: grad(p)["text"]["null"])(params)).sum())

    assert null_grad(0.0) == 0.0
    assert null_grad(0.99) > 0.0


@pytest.mark.parametrize("name", ["unet"])
def test_guidance_zero_and_one_with_text(name):
    model = _randomised(name)  # the fixture's model
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    _, _, tokens, mask = _inputs()
    cond = {"text_tokens": tokens, "text_mask": mask}
    null = {"text_tokens": 0, "text_mask": 0}
    kw = dict(schedule="cosine", prediction="v", shape=(2, 8, 8, 1), key=jax.random.key(4))
    kw.update(steps=3, max_steps=4)

    def draw(c, **more):
        return np.asarray(sample(graphdef, params, cond=c, **kw, **more))

    g0 = draw(cond, null_cond=null, guidance=0.0)
    g1 = draw(cond, null_cond=null, guidance=1.0)
    g3 = draw(cond, null_cond=null, guidance=3.0)
    prompt_only = draw(cond)  # no null_cond: one conditional call
    null_only = draw({"text_tokens": jnp.zeros_like(tokens), "text_mask": jnp.zeros_like(mask)})
    np.testing.assert_allclose(g1, prompt_only, atol=1e-5)
    np.testing.assert_allclose(g0, null_only, atol=1e-5)
    assert not np.allclose(prompt_only, null_only, atol=1e-3)
    assert not np.allclose(g3, prompt_only, atol=1e-3)


def test_freeze_keeps_the_encoder_out_of_training():
    _, cfg = CONFIGS["unet"]
    frozen = dataclasses.replace(cfg, text=dataclasses.replace(TEXT, init="/x", freeze=True))
    trainable = family_of(frozen).trainable(frozen)
    assert not trainable("text/encoder/embedding/embed/embedding")
    assert trainable("text/proj/kernel") and trainable("text/null") and trainable("conv_in/kernel")
    assert family_of(cfg).trainable(cfg) is None


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(context_dim=-1), "context_dim"),
        (dict(text=dataclasses.replace(TEXT, max_len=0)), "text.max_len"),
        (dict(text=dataclasses.replace(TEXT, freeze=True)), "text.freeze"),
        (
            dict(text=dataclasses.replace(TEXT, encoder=EncoderConfig(num_heads=3, d_model=16))),
            "text.encoder.num_heads",
        ),
    ],
)
def test_bad_text_fields(change, field):
    _, cfg = CONFIGS["unet"]
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(cfg, **change).validate()
    msg = str(e.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
