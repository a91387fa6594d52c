"""One precision and one remat policy for every family: ``precision.params|compute|optimizer`` and
``remat`` reach the LM, the DiT and the UNet through ``Family.build``; norms, softmax and losses
stay float32; remat changes no number; bad combinations and old names are handled in config."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend import core as jcore

import mlgen
from mlgen import config as config_lib
from mlgen import sharding
from mlgen.config import (
    REMATS,
    Config,
    ConfigError,
    MeshConfig,
    OptimConfig,
    PrecisionConfig,
    TrainConfig,
)
from mlgen.data.images import ImageDataConfig
from mlgen.models.dit import PRESETS as DIT
from mlgen.models.unet import PRESETS as UNETS
from mlgen.nn.policy import REMAT_POLICIES, Policy, check_remat_devices
from mlgen.objectives.diffusion import DiffusionObjectiveConfig
from tests.helpers import random_lm_batch, tiny_lm_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def _lm(**kw) -> Config:
    cfg = tiny_lm_config(num_layers=2, d_model=32, mesh=MeshConfig(data=1))
    return dataclasses.replace(cfg, optim=OptimConfig(lr=3e-3, warmup_steps=0), **kw)


def _denoiser(model, **kw) -> Config:
    return Config(
        task="diffusion",
        workdir="/tmp/mlgen-test-precision",
        model=model,
        data=ImageDataConfig(source="digits", image_size=8, batch_size=8),
        objective=DiffusionObjectiveConfig(schedule="cosine", prediction="eps", label_dropout=0.0),
        mesh=MeshConfig(data=1),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(num_steps=10, progress_bar=False),
        **kw,
    )


DIT_CFG = DIT["dit-tiny"]
UNET_CFG = UNETS["unet-tiny"]


def _batch(cfg: Config) -> dict:
    if cfg.task == "lm":
        return random_lm_batch(batch=8, seq=32)
    rng = np.random.default_rng(0)
    return {
        "images": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
        "labels": np.zeros((8,), np.int32),
    }


def _train(cfg: Config, steps: int = 3):
    """Per-step losses of ``steps`` real train steps on one fixed batch, the final state, setup."""
    s = mlgen.setup(cfg, devices=jax.devices()[:1])
    step = jax.jit(s.train_step.make(s.graphdef))
    state, losses = s.state, []
    with sharding.use(s.mesh, s.rules):
        batch = sharding.put_batch(_batch(cfg), s.mesh, s.task.batch_axes, s.rules)
        for _ in range(steps):
            state, metrics = step(state, batch, jax.random.key(0))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state, s


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it (scan, remat, pjit bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jcore.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def _loss_jaxpr(s):
    loss = s.task.make_loss(s.graphdef)
    batch = jax.tree.map(jnp.asarray, _batch(s.config))
    with sharding.use(s.mesh, s.rules):
        return jax.make_jaxpr(loss)(
            s.state["params"], s.state["model_state"], batch, jax.random.key(0)
        )


def _adam_states(opt_state) -> list:
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    "cfg",
    [
        _lm(precision=PrecisionConfig(compute="bfloat16", optimizer="bfloat16")),
        _denoiser(DIT_CFG, precision=PrecisionConfig(compute="bfloat16", optimizer="bfloat16")),
        _denoiser(UNET_CFG, precision=PrecisionConfig(compute="bfloat16", optimizer="bfloat16")),
    ],
    ids=["lm", "dit", "unet"],
)
def test_bf16_compute_keeps_f32_weights_norms_softmax_loss_and_bf16_moments(cfg):
    """``precision.compute=bfloat16``: every matmul / conv of the blocks takes bf16 operands,
    while exp / log / rsqrt (softmax, norms, loss) run in f32, the model's output and the loss
    are f32; after real train steps the f32 parameters moved and both Adam moments are bf16."""
    losses, state, s = _train(cfg, steps=2)
    closed = _loss_jaxpr(s)
    eqns = list(_eqns(closed.jaxpr))
    mm = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    bf16_mm = [e for e in mm if all(v.aval.dtype == BF16 for v in e.invars)]
    assert len(bf16_mm) >= 6, [tuple(v.aval.dtype for v in e.invars) for e in mm]
    for e in eqns:
        if e.primitive.name in ("exp", "log", "rsqrt"):
            assert all(v.aval.dtype == F32 for v in e.outvars), (e.primitive.name, e)
    assert closed.out_avals[0].dtype == F32  # the loss

    def forward(params):
        model = nnx.merge(s.graphdef, params)
        if cfg.task == "lm":
            return model(jnp.zeros((2, 8), jnp.int32))
        return model(jnp.zeros((2, 8, 8, 1)), jnp.ones((2,)))

    with sharding.use(s.mesh, s.rules):
        out = jax.eval_shape(forward, s.state["params"])
    assert out.dtype == F32  # logits / denoiser prediction
    assert np.all(np.isfinite(losses))
    assert {a.dtype for a in jax.tree.leaves(state["params"])} == {F32}
    leaves = zip(jax.tree.leaves(state["params"]), jax.tree.leaves(s.state["params"]))
    assert any(np.any(a != b) for a, b in leaves)  # (zero-initialised layers wait a step)
    (adam,) = _adam_states(state["opt_state"])
    assert {a.dtype for a in jax.tree.leaves((adam.mu, adam.nu))} == {BF16}


def test_bf16_params_with_f32_optimizer_state():
    """``params=bfloat16, compute=bfloat16, optimizer=float32`` (a fine combination): bf16
    master weights that move, f32 moments."""
    cfg = _lm(precision=PrecisionConfig(params="bfloat16", compute="bfloat16"))
    losses, state, s = _train(cfg, steps=2)
    assert np.all(np.isfinite(losses))
    assert {a.dtype for a in jax.tree.leaves(state["params"])} == {BF16}
    (adam,) = _adam_states(state["opt_state"])
    assert {a.dtype for a in jax.tree.leaves((adam.mu, adam.nu))} == {F32}
    leaves = zip(jax.tree.leaves(state["params"]), jax.tree.leaves(s.state["params"]))
    assert all(np.any(a != b) for a, b in leaves)


def test_default_optimizer_is_optax_adamw_bit_for_bit():
    """float32 everywhere: the optimizer (moments stored in ``precision.optimizer``) is optax's
    adamw chain, same state tree (old checkpoints restore) and same numbers."""
    from mlgen.train.optim import decay_mask, lr_schedule, make_optimizer

    cfg = OptimConfig(warmup_steps=2)
    params = {"w": jnp.ones((3, 4)), "norm": {"scale": jnp.ones((4,))}}
    ours = make_optimizer(cfg, 10)[0]
    theirs = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            lr_schedule(cfg, 10),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.no_decay),
        ),
    )
    a, b = ours.init(params), theirs.init(params)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    grads = jax.tree.map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    for _ in range(3):
        ua, a = ours.update(grads, a, params)
        ub, b = theirs.update(grads, b, params)
        for x, y in zip(jax.tree.leaves((ua, a)), jax.tree.leaves((ub, b))):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- remat
def _remat_primitives(s) -> int:
    closed = _loss_jaxpr(s)
    return sum(e.primitive.name in ("remat", "checkpoint", "remat2") for e in _eqns(closed.jaxpr))


@pytest.fixture(scope="module")
def lm_baseline():
    losses, state, s = _train(_lm())
    assert _remat_primitives(s) == 0
    return losses, state


@pytest.mark.parametrize("remat", [r for r in REMATS if r != "none"])
def test_lm_remat_policy_trains_to_the_same_loss(remat, lm_baseline):
    """Each remat policy (offload too: the CPU devices have a pinned_host memory space; XLA:CPU
    drops the transfers) rematerialises every block and trains to the losses of ``none``."""
    losses, state, s = _train(_lm(remat=remat))
    assert _remat_primitives(s) > 0
    np.testing.assert_allclose(losses, lm_baseline[0], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(lm_baseline[1]["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "model, remat", [(DIT_CFG, "dots"), (UNET_CFG, "full")], ids=["dit-dots", "unet-full"]
)
def test_denoiser_remat_trains_to_the_same_loss(model, remat):
    base, _, s0 = _train(_denoiser(model))
    losses, _, s = _train(_denoiser(model, remat=remat))
    assert _remat_primitives(s0) == 0 and _remat_primitives(s) > 0
    np.testing.assert_allclose(losses, base, atol=1e-5, rtol=0)


def test_remat_names_are_the_configs():
    assert tuple(REMAT_POLICIES) == REMATS
    with pytest.raises(ValueError, match="remat"):
        Policy(remat="sometimes")


class _Memory:
    def __init__(self, kind):
        self.kind = kind


class _DeviceWithoutHost:
    platform = "metal"

    def addressable_memories(self):
        return [_Memory("device")]


def test_offload_needs_host_memory_on_the_devices():
    check_remat_devices("offload", jax.devices())  # CPU: a pinned_host memory space
    check_remat_devices("full", [_DeviceWithoutHost()])
    with pytest.raises(ConfigError) as e:
        check_remat_devices("offload", [_DeviceWithoutHost()])
    msg = str(e.value)
    assert msg.startswith("remat: offload needs host memory") and "\n" not in msg
    assert "metal" in msg and "dots_no_batch" in msg


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, field",
    [
        (["precision.params=bfloat16"], "precision.params"),  # bf16 weights upcast: no gain
        (["precision.compute=float16"], "precision.compute"),
        (["precision.optimizer=int8"], "precision.optimizer"),
        (["precision.dtype=bfloat16"], "precision.dtype"),
        (["remat=sometimes"], "remat"),
        (["model.remat=sometimes"], "remat"),  # the old name: set at the new place
        (["model.param_dtype=bfloat16"], "precision.params"),
    ],
)
def test_bad_precision_or_remat_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        config_lib.load("configs/lm/tiny.py", ["workdir=/tmp/x", *overrides])
    msg = str(e.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg


def test_bad_values_set_in_python_are_config_errors_too():
    cfg = _lm()
    for bad, field in [
        (dict(precision=PrecisionConfig(params="bfloat16")), "precision.params"),
        (dict(precision=PrecisionConfig(compute="half")), "precision.compute"),
        (dict(remat="everything"), "remat"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            dataclasses.replace(cfg, **bad).validate(1)
    # fine combinations
    for ok in [
        PrecisionConfig(params="bfloat16", compute="bfloat16", optimizer="float32"),
        PrecisionConfig(compute="bfloat16", optimizer="bfloat16"),
        PrecisionConfig(params="bfloat16", compute="bfloat16", optimizer="bfloat16"),
    ]:
        dataclasses.replace(cfg, precision=ok).validate(1)


def test_short_overrides():
    cfg = config_lib.load(
        "configs/lm/tiny.py",
        [
            "workdir=/tmp/x",
            "precision.compute=bfloat16",
            "precision.optimizer=bfloat16",
            "remat=full",
        ],
    )
    assert cfg.precision == PrecisionConfig(compute="bfloat16", optimizer="bfloat16")
    assert cfg.remat == "full"
    assert config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(cfg)))) == cfg


def test_old_model_dtype_and_remat_load_into_precision_and_remat():
    """Saved configs (and overrides) with the models' old ``dtype`` / ``param_dtype`` / ``remat``
    land in ``precision.compute`` / ``precision.params`` / ``remat``."""
    old = json.loads((FIXTURES / "legacy_lm_config.json").read_text())
    old["model"].update(dtype="bfloat16", param_dtype="bfloat16", remat="dots")
    before = json.dumps(old, sort_keys=True)
    cfg = config_lib.from_dict(old)
    assert json.dumps(old, sort_keys=True) == before  # the caller's dict is left alone
    assert cfg.precision == PrecisionConfig(params="bfloat16", compute="bfloat16")
    assert cfg.remat == "dots"
    assert cfg.validate() is cfg
    d = config_lib.to_dict(cfg)
    assert not {"dtype", "param_dtype", "remat"} & set(d["model"])

    dit = json.loads((FIXTURES / "legacy_dit_config.json").read_text())
    dit["model"]["dtype"] = "bfloat16"  # the denoisers' compute dtype (parameters were f32)
    cfg = config_lib.from_dict(dit)
    assert cfg.precision == PrecisionConfig(compute="bfloat16") and cfg.remat == "none"

    for run in ("legacy_lm_config.json", "legacy_dit_config.json"):  # as saved: the defaults
        cfg = config_lib.from_dict(json.loads((FIXTURES / run).read_text()))
        assert cfg.precision == PrecisionConfig() and cfg.remat == "none"

    cfg = config_lib.load(
        "configs/lm/tiny.py", ["workdir=/tmp/x", "model.dtype=bfloat16", "model.remat=full"]
    )
    assert cfg.precision.compute == "bfloat16" and cfg.remat == "full"
