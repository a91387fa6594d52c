"""Model families as specs: what each declares matches what its model does; registry and names."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mlgen import config as config_lib
from mlgen import sharding
from mlgen.config import ConfigError
from mlgen.models import families, family_of
from mlgen.models.dit import PRESETS as DIT
from mlgen.models.encoder import EncoderConfig
from mlgen.models.text import TextConfig
from mlgen.models.transformer import TransformerConfig
from mlgen.models.unet import PRESETS as UNETS
from mlgen.nn.policy import Policy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

_LM = TransformerConfig(
    vocab_size=32, num_layers=2, d_model=16, num_heads=2, num_kv_heads=1, max_len=8
)
_TEXT = TextConfig(  # bert flavour: the learned position table too
    encoder=EncoderConfig(flavour="bert", num_layers=1, d_model=8, num_heads=2, max_len=8),
    max_len=8,
)
TINY = {  # per family, configs that between them use every feature
    "transformer": (
        _LM,
        dataclasses.replace(_LM, flavour="gpt2"),
        dataclasses.replace(_LM, num_layers=2, moe_every=2, num_experts=4, lora_rank=2),
    ),
    "unet": (
        dataclasses.replace(UNETS["unet-tiny"], num_classes=3),
        dataclasses.replace(UNETS["unet-tiny"], context_dim=8, text=_TEXT),
    ),
    "dit": (
        dataclasses.replace(DIT["dit-tiny"], num_classes=3),
        dataclasses.replace(DIT["dit-tiny"], context_dim=8, text=_TEXT),
    ),
}


def _forward(name, model):
    if name == "transformer":
        tokens = jnp.zeros((2, 8), jnp.int32)
        model(tokens)
        model.decode(tokens, jnp.zeros((2, 8), jnp.int32), model.init_cache(2, 8))
    else:
        labels = jnp.zeros((2,), jnp.int32) if model.cfg.num_classes else None
        text = {}
        if model.cfg.context_dim:
            text = dict(text_tokens=jnp.ones((2, 8), jnp.int32), text_mask=jnp.ones((2, 8)))
        model(jnp.zeros((2, 8, 8, 1)), jnp.ones((2,)), labels, **text)


def test_builtin_families_are_registered_by_name():
    assert {"transformer", "unet", "dit"} <= set(families())
    for name, (cfg, *_) in TINY.items():
        family = family_of(cfg)
        assert family.name == name and family.config is type(cfg)
        assert config_lib.section_name(type(cfg)) == name
        assert family.kind == ("decoder" if name == "transformer" else "denoiser")


@pytest.mark.parametrize("name", sorted(TINY))
def test_declared_logical_axes_are_the_ones_the_model_uses(name):
    """A family's ``logical_axes`` (the mesh-rules check relies on them) equal the names on its
    parameters plus those its forward pass constrains activations to."""
    family, used = families()[name], set()
    for cfg in TINY[name]:
        model = nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0), Policy()))  # noqa: B023
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            used |= {n for n in v.get_metadata()["out_sharding"] if n is not None}
        with sharding.recording() as names:
            jax.eval_shape(lambda: _forward(name, family.build(cfg, nnx.Rngs(0), Policy())))  # noqa: B023
        used |= names
    used |= {n for axes in family.batch_axes.values() for n in axes if n is not None}
    assert used == set(family.logical_axes), (
        sorted(used - family.logical_axes),
        sorted(family.logical_axes - used),
    )
    assert set(family.logical_axes) <= sharding.axes()


def test_an_unregistered_model_config_is_one_line_naming_model():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Mystery:
        width: int = 1

        def validate(self):
            pass

    with pytest.raises(
        ConfigError, match=r"^model: \S*Mystery belongs to no registered model family"
    ):
        family_of(Mystery())
    cfg = config_lib.load("configs/lm/tiny.py", ["workdir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"^model: .*Mystery is not a registered config class"):
        dataclasses.replace(cfg, model=Mystery()).validate()


def test_saved_configs_store_names_and_old_ones_still_load():
    cfg = config_lib.load("configs/lm/tiny.py", ["workdir=/tmp/x"])
    d = config_lib.to_dict(cfg)
    assert (d["model"]["__class__"], d["data"]["__class__"], d["objective"]["__class__"]) == (
        "transformer",
        "text",
        "lm",
    )
    assert "__class__" not in d["mesh"] and "__class__" not in d["model"]["attention"]
    assert config_lib.from_dict(json.loads(json.dumps(d))) == cfg
    # Written by mlgen before families had names: import paths, flat attention fields.
    for run in ("legacy_lm_config.json", "legacy_dit_config.json"):
        old = json.loads((FIXTURES / run).read_text())
        assert ":" in old["model"]["__class__"] and "attention_backend" in old["model"]
        loaded = config_lib.from_dict(old)
        assert loaded.model.attention.backend == old["model"]["attention_backend"]
        assert loaded.validate() is loaded
        assert config_lib.to_dict(loaded)["model"]["__class__"] in ("transformer", "dit")


def test_old_field_names_work_as_overrides():
    cfg = config_lib.load(
        "configs/lm/tiny.py",
        ["workdir=/tmp/x", "model.attention_backend=blockwise", "model.attention_interpret=true"],
    )
    assert cfg.model.attention.backend == "blockwise" and cfg.model.attention.interpret is True
