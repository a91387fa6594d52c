"""Logical -> mesh rules: ``auto`` derived from the mesh, presets,
and the check against the mesh."""

import dataclasses

import jax
import pytest

from mlgen import sharding
from mlgen.config import ConfigError, MeshConfig
from mlgen.runs import setup
from mlgen.sharding import rules as rules_lib
from tests.helpers import tiny_lm_config


def _specs(cfg):
    s = setup(cfg, abstract=True)
    return {
        "/".join(map(str, path)): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(s.state["params"])[0]
    }


@pytest.mark.parametrize(
    "mesh, preset",
    [
        (MeshConfig(data=8), "dp"),
        (MeshConfig(data=2, fsdp=4), "fsdp"),
        (MeshConfig(data=1, fsdp=2, tensor=4), "fsdp_tp"),
        (MeshConfig(data=2, seq=4), "fsdp_sp"),
        (MeshConfig(data=1, fsdp=2, expert=4), "fsdp_ep"),
    ],
    ids=["dp", "fsdp", "fsdp_tp", "fsdp_sp", "fsdp_ep"],
)
def test_auto_shards_like_the_matching_preset(mesh, preset):
    """On a mesh whose axes > 1 are the ones a preset was written for, ``auto`` places every
    parameter and every batch key exactly as that preset does."""
    sizes = mesh.resolve(8)

    def placed(spec):  # the mesh axes > 1 of each dimension (a preset also names size-1 axes)
        return tuple(
            tuple(a for a in ((p,) if isinstance(p, str) else p or ()) if sizes[a] > 1)
            for p in spec
        )

    auto = _specs(tiny_lm_config(mesh=mesh))
    named = _specs(tiny_lm_config(mesh=dataclasses.replace(mesh, rules=preset)))
    assert {k: placed(v) for k, v in auto.items()} == {k: placed(v) for k, v in named.items()}
    s = setup(tiny_lm_config(mesh=mesh), abstract=True)
    for name in ("batch", "length", "embed", "heads", "mlp", "vocab"):
        want = [
            a for a in rules_lib.mesh_axes_of(rules_lib.get_rules(preset), name) if sizes[a] > 1
        ]
        assert list(rules_lib.mesh_axes_of(s.rules, name)) == want, name


def test_auto_rules_come_from_the_mesh_fields():
    """Every mesh axis is one MeshConfig field whose metadata lists the logical axes it shards."""
    roles = MeshConfig.axis_roles()
    assert tuple(roles) == MeshConfig.AXES == ("data", "fsdp", "expert", "tensor", "seq")
    assert all(set(names) <= sharding.axes() for names in roles.values())
    derived = dict(rules_lib.derive({"data": 2, "fsdp": 2, "expert": 1, "tensor": 1, "seq": 2}))
    assert (
        derived["batch"] == ("data", "fsdp")
        and derived["embed"] == "fsdp"
        and derived["length"] == "seq"
    )
    assert "heads" not in derived and "expert" not in derived  # tensor and expert are 1
    assert rules_lib.derive({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, "seq": 1}) == ()
    # The expert axis splits the experts and, outside the MoE layers, the batch (data parallel).
    derived = dict(rules_lib.derive({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1, "seq": 1}))
    assert derived["batch"] == ("data", "expert") and derived["expert"] == "expert"


def test_family_fragments_extend_any_rules():
    sharding.register_axes(["experts_test"])
    pairs = rules_lib.get_rules("fsdp", {}, (("experts_test", "tensor"),))
    assert rules_lib.mesh_axes_of(pairs, "experts_test") == ("tensor",)
    pairs = rules_lib.get_rules("auto", {"data": 2, "tensor": 2}, (("experts_test", "tensor"),))
    assert rules_lib.mesh_axes_of(pairs, "experts_test") == ("tensor",)
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.spec(("experts_unknown",), pairs)


@pytest.mark.parametrize(
    "overrides, msg",
    [
        (
            dict(mesh=MeshConfig(data=4, seq=2, rules="fsdp")),
            r"^mesh\.rules: 'fsdp' shards nothing .* over mesh\.seq=2",
        ),
        (
            dict(mesh=MeshConfig(data=4, tensor=2, rules="fsdp_sp")),
            r"^mesh\.rules: 'fsdp_sp' .* mesh\.tensor=2",
        ),
        (
            dict(mesh=MeshConfig(data=4, expert=2, rules="fsdp")),
            r"^mesh\.rules: 'fsdp' shards nothing .* over mesh\.expert=2",
        ),
        (
            dict(mesh=MeshConfig(data=1, tensor=8), num_heads=4),
            r"^model\.num_heads: 4 is not divisible by the 8 shards",
        ),
        (
            dict(mesh=MeshConfig(data=1, fsdp=1, rules="nope")),
            r"^mesh\.rules: unknown rules 'nope'",
        ),
    ],
)
def test_rules_that_waste_or_miss_the_mesh_are_config_errors(overrides, msg):
    mesh = overrides.pop("mesh")
    cfg = tiny_lm_config(mesh=mesh, **overrides)
    with pytest.raises(ConfigError, match=msg):
        cfg.validate(8 if mesh.data != 1 or mesh.tensor > 1 else 1)


def test_unet_has_nothing_for_a_seq_axis():
    from tests.helpers import tiny_digits_config

    cfg = dataclasses.replace(tiny_digits_config("/tmp/x"), mesh=MeshConfig(data=4, seq=2))
    with pytest.raises(
        ConfigError, match=r"^mesh\.rules: 'auto' shards nothing of the unet model over mesh\.seq=2"
    ):
        cfg.validate(8)
