"""LoRA adapters on ``Linear``: ``x W + alpha / r * (x A) B``, a no-op at initialisation, and
``merge_adapters`` folds them into the weights (stacked layers too) without changing the
function; the model config's target names and their errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mlgen.config import ConfigError
from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.nn.core import Linear, LoRA, is_adapter, merge_adapters


def _randomise_b(model: nnx.Module, seed: int = 0) -> None:
    """Gives every ``lora_b`` (zero at init) random values, so the adapters do something."""
    key = jax.random.key(seed)
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "lora_b" and isinstance(var, nnx.Param):
            key, sub = jax.random.split(key)
            var[...] = 0.1 * jax.random.normal(sub, var[...].shape)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_linear_adapter_is_its_formula_and_a_no_op_at_init():
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    lin = Linear(
        8, (2, 6), in_names=("embed",), out_names=("heads", "head_dim"), use_bias=True,
        lora=LoRA(rank=4, alpha=8.0), rngs=nnx.Rngs(0),
    )  # fmt: skip
    w, b = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    base = np.einsum("btd,dnh->btnh", np.asarray(x), w) + b
    np.testing.assert_allclose(np.asarray(lin(x)), base, atol=1e-6)  # B = 0: the base layer
    _randomise_b(lin)
    a, bb = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...])
    want = base + 2.0 * np.einsum("btd,dr,rnh->btnh", np.asarray(x), a, bb)
    np.testing.assert_allclose(np.asarray(lin(x)), want, atol=1e-5)
    assert not np.allclose(want, base, atol=1e-3)

    merged = merge_adapters(_params(lin), 2.0)
    assert sorted(merged) == ["bias", "kernel"]
    plain = Linear(
        8, (2, 6), in_names=("embed",), out_names=("heads", "head_dim"), use_bias=True,
        rngs=nnx.Rngs(3),
    )  # fmt: skip
    nnx.update(plain, merged)
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(lin(x)), atol=1e-5)


WANT = {
    "q,k,v,o": {"q", "k", "v", "o"},
    "all": {"q", "k", "v", "o", "gate", "up", "down"},
    "mlp": {"up", "down"},  # gpt2: no gate
}


@pytest.mark.parametrize(
    ("flavour", "targets"), [("llama", "q,k,v,o"), ("llama", "all"), ("gpt2", "mlp")]
)
def test_merged_stacked_model_computes_what_the_adapted_one_does(flavour, targets):
    cfg = TransformerConfig(
        flavour=flavour, vocab_size=64, num_layers=2, d_model=32, num_heads=4,
        num_kv_heads=4 if flavour == "gpt2" else 2, max_len=16,
        lora_rank=3, lora_alpha=6.0, lora_targets=targets,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    before = np.asarray(model(tokens))
    _randomise_b(model)
    adapted = np.asarray(model(tokens))
    assert not np.allclose(adapted, before, atol=1e-3)

    assert cfg.adapted == WANT[targets]
    found = {
        path[-2]
        for path, var in nnx.iter_graph(model)
        if path and path[-1] == "lora_a" and isinstance(var, nnx.Param)
    }
    assert found == WANT[targets]
    assert is_adapter("blocks/attn/q/lora_b") and not is_adapter("blocks/attn/q/kernel")

    merged_cfg = dataclasses.replace(cfg, lora_rank=0)
    plain = Transformer(merged_cfg, rngs=nnx.Rngs(5))
    nnx.update(plain, merge_adapters(_params(model), cfg.lora.scale))
    np.testing.assert_allclose(np.asarray(plain(tokens)), adapted, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha"),
        (dict(lora_rank=4, lora_targets="q,x"), "lora_targets"),
        (dict(lora_rank=4, lora_targets=""), "lora_targets"),
        (dict(lora_rank=4, flavour="gpt2", lora_targets="gate"), "lora_targets"),
    ],
)
def test_bad_lora_fields_are_one_line_naming_the_field(fields, field):
    with pytest.raises(ConfigError) as err:
        TransformerConfig(**fields).validate()
    assert str(err.value).startswith(f"{field}:") and "\n" not in str(err.value)
