"""Config errors: each bad input is a one-line ConfigError naming the field, before any compile."""

import jax
import pytest

from mlgen.config import ConfigError, MeshConfig, from_dict, load, to_dict

TINY = "configs/lm/tiny.py"


def _err(overrides, num_devices=8):
    with pytest.raises(ConfigError) as e:
        cfg = load(TINY, ["workdir=/tmp/x"] + overrides)
        cfg.validate(num_devices)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.num_layerz=3"], "model.num_layerz"),
        (["model.num_layers=three"], "model.num_layers"),
        (["model.num_layers=0"], "model.num_layers"),
        (["model.num_heads=3"], "model.num_heads"),
        (["model.num_kv_heads=3"], "model.num_kv_heads"),
        (["model.flavour=gpt3"], "model.flavour"),
        (["model.attention.backend=magic"], "model.attention.backend"),
        (["model.attention_backend=magic"], "model.attention.backend"),  # the old name, moved
        (["model.attention.block_sizes=64,64"], "model.attention.block_sizes"),
        (["model.attention.ring_local_backend=cuda"], "model.attention.ring_local_backend"),
        (["mesh.tensor=2", "mesh.rules=fsdp"], "mesh.rules"),  # tensor > 1 that the rules never use
        (["mesh.seq=2", "mesh.rules=fsdp_tp"], "mesh.rules"),
        (["model.remat=sometimes"], "remat"),  # the old name, moved to the top (test_precision)
        (["mesh.data=3"], "mesh"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh.fsdp"),
        (["mesh.rules=zero3"], "mesh.rules"),
        (["mesh.data=2", "mesh.fsdp=4", "data.batch_size=12"], "data.batch_size"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.b2=1.5"], "optim.b2"),
        (["train.num_steps=0"], "train.num_steps"),
        (["train.async_checkpoints=maybe"], "train.async_checkpoints"),
        (["data.seq_len=0"], "data.seq_len"),
        (["model.vocab_size=100"], "model.vocab_size"),
        (["data.seq_len=100", "mesh.data=1", "mesh.seq=8", "mesh.rules=fsdp_sp"], "data.seq_len"),
        (["train=3"], "train"),
        (["nosuchsection.x=1"], "nosuchsection"),
        (["workdir"], "workdir"),
    ],
)
def test_bad_input_names_the_field(overrides, field):
    assert _err(overrides).startswith(field), _err(overrides)


def test_missing_workdir():
    with pytest.raises(ConfigError, match="^workdir"):
        load(TINY, ["workdir="])


def test_overrides_typed_and_roundtrip():
    cfg = load(
        TINY,
        [
            "workdir=/tmp/x",
            "model.num_layers=2",
            "optim.lr=1e-3",
            "optim.no_decay=norm,bias",
            "train.progress_bar=false",
            "mesh.data=-1",
        ],
    )
    assert cfg.model.num_layers == 2 and cfg.optim.lr == 1e-3 and cfg.train.progress_bar is False
    assert cfg.optim.no_decay == ("norm", "bias")
    assert from_dict(to_dict(cfg)) == cfg
    cfg.validate(8)


def test_mesh_fill():
    assert MeshConfig(data=-1, tensor=2).resolve(8) == {
        "data": 4,
        "fsdp": 1,
        "expert": 1,
        "tensor": 2,
        "seq": 1,
    }
    with pytest.raises(ConfigError, match="^data: cannot fill"):
        MeshConfig(data=-1, tensor=3).resolve(8)


def test_errors_are_raised_before_compiling(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "jit", lambda *a, **k: calls.append(1))
    from mlgen.runs import train

    with pytest.raises(ConfigError):
        train(TINY, ["workdir=/tmp/x", "model.num_heads=3"])
    assert not calls
