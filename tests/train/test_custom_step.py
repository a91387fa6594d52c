"""The open train state: a task with its own step (a two-player GAN, two optimizers) and a model
with non-parameter state (a running statistic) train, checkpoint and resume through the one
trainer, defined entirely here: a new family, data source, objective and task, nothing in
``mlgen/train`` touched."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mlgen
from mlgen.config import Config, MeshConfig, TrainConfig, register
from mlgen.models.family import Family
from mlgen.models.family import register as register_family
from mlgen.nn.core import Linear
from mlgen.objectives import bind, state_after
from mlgen.tasks.base import TaskSpec, policy
from mlgen.tasks.base import register as register_task
from mlgen.train.task import Task, TrainStep

MEAN, STD = 3.0, 0.5


@register("test_gan_points")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PointsConfig:
    batch_size: int = 64

    def validate(self):
        pass


class Points:
    """Resumable stream of batches of 1-D points ~ N(MEAN, STD)."""

    def __init__(self, rows: int, seed: int):
        self.rows, self.seed, self.i = rows, seed, 0

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.i])
        self.i += 1
        return {"x": (MEAN + STD * rng.standard_normal((self.rows, 1))).astype(np.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


@register("test_gan_objective")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GANObjective:
    lr_g: float = 2e-2
    lr_d: float = 2e-2

    def validate(self):
        pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class GANConfig:
    hidden: int = 16

    def validate(self):
        pass


def _mlp(i, h, o, rngs):
    kw = dict(in_names=(None,), out_names=(None,), use_bias=True, rngs=rngs)
    return nnx.List([Linear(i, h, **kw), Linear(h, o, **kw)])


def _run(layers, x):
    return layers[1](jax.nn.leaky_relu(layers[0](x), 0.2))


class GAN(nnx.Module):
    def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
        self.generator = _mlp(1, cfg.hidden, 1, rngs)
        self.discriminator = _mlp(1, cfg.hidden, 1, rngs)
        self.data_mean = nnx.BatchStat(
            jnp.zeros(())
        )  # model state: a running mean of the real data

    def fake(self, z):
        return _run(self.generator, z)

    def critic(self, x):
        return _run(self.discriminator, x)[:, 0]

    def observe(self, x):
        self.data_mean[...] = 0.9 * self.data_mean[...] + 0.1 * jnp.mean(x)


register_family(
    Family(
        name="test_gan",
        config=GANConfig,
        kind="gan",
        build=lambda c, r, policy: GAN(c, rngs=r),  # float32, nothing to remat
        batch_axes={"x": ("batch", None)},
        logical_axes=frozenset({"batch"}),
    )
)


def _losses(graphdef):
    def d_loss(d_params, g_params, model_state, batch, rng):
        m = bind(graphdef, {"generator": g_params, "discriminator": d_params}, model_state)
        z = jax.random.normal(rng, batch["x"].shape)
        real, fake = m.critic(batch["x"]), m.critic(jax.lax.stop_gradient(m.fake(z)))
        loss = jnp.mean(
            optax.sigmoid_binary_cross_entropy(real, 1.0)
            + optax.sigmoid_binary_cross_entropy(fake, 0.0)
        )
        m.observe(batch["x"])
        return loss, state_after(m, model_state)

    def g_loss(g_params, d_params, model_state, batch, rng):
        m = bind(graphdef, {"generator": g_params, "discriminator": d_params}, model_state)
        fake = m.fake(jax.random.normal(rng, batch["x"].shape))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(m.critic(fake), 1.0)), jnp.mean(fake)

    return d_loss, g_loss


def _train_step(obj: GANObjective) -> TrainStep:
    """Two players, two optimizers: the discriminator steps, then the generator against it."""
    tx_g, tx_d = optax.adam(obj.lr_g, b1=0.5), optax.adam(obj.lr_d, b1=0.5)

    def init(params, model_state):
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": model_state,
            "opt_state": {
                "g": tx_g.init(params["generator"]),
                "d": tx_d.init(params["discriminator"]),
            },
        }

    def shardings(abstract, param_sh, model_state_sh, mesh):
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)

    def make(graphdef):
        d_loss, g_loss = _losses(graphdef)

        def step(state, batch, rng):
            rng = jax.random.fold_in(rng, state["step"])
            k_d, k_g = jax.random.split(rng)
            g, d = state["params"]["generator"], state["params"]["discriminator"]
            (ld, model_state), gd = jax.value_and_grad(d_loss, has_aux=True)(
                d, g, state["model_state"], batch, k_d
            )
            ud, opt_d = tx_d.update(gd, state["opt_state"]["d"], d)
            d = optax.apply_updates(d, ud)
            (lg, fake_mean), gg = jax.value_and_grad(g_loss, has_aux=True)(
                g, d, model_state, batch, k_g
            )
            ug, opt_g = tx_g.update(gg, state["opt_state"]["g"], g)
            g = optax.apply_updates(g, ug)
            new = {
                "step": state["step"] + 1,
                "params": {"generator": g, "discriminator": d},
                "model_state": model_state,
                "opt_state": {"g": opt_g, "d": opt_d},
            }
            return new, {"d_loss": ld, "g_loss": lg, "fake_mean": fake_mean}

        return step

    return TrainStep(init=init, shardings=shardings, make=make)


def _build(cfg, family, mesh, rules):
    def make_loss(graphdef):  # the trainer's eval / default-step interface: the generator's loss
        _, g_loss = _losses(graphdef)

        def loss(params, model_state, batch, rng):
            value, fake_mean = g_loss(
                params["generator"], params["discriminator"], model_state, batch, rng
            )
            return value, ({"fake_mean": fake_mean}, model_state)

        return loss

    rows = cfg.data.batch_size // jax.process_count()
    return Task(
        name="test_gan",
        make_model=lambda: family.build(cfg.model, nnx.Rngs(params=cfg.seed), policy(cfg)),
        make_loss=make_loss,
        train_data=lambda: Points(rows, cfg.seed),
        batch_axes={"x": ("batch", None)},
        train_step=_train_step(cfg.objective),
    )


register_task(
    TaskSpec(
        name="test_gan",
        kinds=("gan",),
        objective=GANObjective,
        data=PointsConfig,
        checks=lambda cfg, family, mesh: None,
        build=_build,
    )
)


def _config(workdir, steps):
    return Config(
        task="test_gan",
        workdir=str(workdir),
        model=GANConfig(),
        data=PointsConfig(),
        objective=GANObjective(),
        mesh=MeshConfig(data=-1),
        train=TrainConfig(
            num_steps=steps,
            log_every=10,
            eval_every=0,
            checkpoint_every=50,
            progress_bar=False,
            async_checkpoints=False,
        ),
    )


def test_a_gan_with_its_own_step_and_model_state_trains_and_resumes(tmp_path):
    first = mlgen.train(_config(tmp_path / "a", 100))
    fake = [h["fake_mean"] for h in first.history]
    assert abs(fake[-1] - MEAN) < 0.5 * abs(fake[0] - MEAN), (
        fake
    )  # the generator moved towards the data
    assert (
        abs(float(first.state["model_state"]["data_mean"]) - MEAN) < 0.1
    )  # the state ran with the data
    assert set(first.state["opt_state"]) == {"g", "d"}
    # Resume half-way: the same run, bit for bit (two optimizer states, model state, data state).
    mlgen.train(_config(tmp_path / "b", 50))
    resumed = mlgen.train(_config(tmp_path / "b", 100))
    for a, b in zip(jax.tree.leaves(first.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored = mlgen.restore(tmp_path / "b")
    assert float(restored.state["model_state"]["data_mean"]) == float(
        first.state["model_state"]["data_mean"]
    )
    assert restored.model().data_mean[...] == first.state["model_state"]["data_mean"]
