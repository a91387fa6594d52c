"""``mlgen.nn.moe.MoE``: the layer against a per-token loop over its own parameters, its
auxiliary outputs, its config errors, its logical axes, sharded on 8 simulated devices, and
against Hugging Face's ``MixtralSparseMoeBlock`` with the same weights copied in. On meshes
with and without expert parallelism: the one-device numbers, all-to-all in the compiled step
and no gather of the experts (what this does not cover: speed on real interconnects)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from mlgen import sharding
from mlgen.config import ConfigError, MeshConfig
from mlgen.nn.moe import MoE, MoEConfig, check_expert_mesh

TOL = dict(rtol=1e-5, atol=1e-5)
D, F = 8, 12


def _layer(**cfg) -> MoE:
    return MoE(D, F, MoEConfig(**{"num_experts": 4, **cfg}), rngs=nnx.Rngs(0))


def _x(B=2, T=5, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, D)), jnp.float32)


def _loop(model: MoE, x):
    """The spec: softmax router, top-k, renormalised, each token through its k experts."""
    cfg = model.config
    gate, up, down = model.gate[...], model.up[...], model.down[...]

    def token(xt):
        p = jax.nn.softmax(xt @ model.router.kernel[...])
        w, e = jax.lax.top_k(p, cfg.experts_per_token)
        w = w / w.sum()
        y = jnp.zeros_like(xt)
        for j in range(cfg.experts_per_token):
            h = jax.nn.silu(xt @ gate[e[j]]) * (xt @ up[e[j]])
            y = y + w[j] * (h @ down[e[j]])
        return y

    y = jax.vmap(jax.vmap(token))(x)
    if model.shared is not None:
        s = model.shared
        y = y + (jax.nn.silu(x @ s.gate.kernel[...]) * (x @ s.up.kernel[...])) @ s.down.kernel[...]
    return y


def test_layer_matches_per_token_loop_values_and_grads():
    shared = 2  # routed experts plus a shared SwiGLU of width 2 * F
    model = _layer(num_shared_experts=shared)
    graphdef, params = nnx.split(model, nnx.Param)
    x = _x()

    def loss(params, x, ref):
        m = nnx.merge(graphdef, params)
        y = _loop(m, x) if ref else m(x)[0]
        return jnp.sum(jnp.sin(y)), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, y), g = grad(params, x, False)
    (_, y_ref), g_ref = grad(params, x, True)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL)
    assert model.shared.up.kernel.shape == (D, shared * F) and _layer().shared is None


def test_capacity_with_room_for_everything_equals_dropless_and_aux():
    x = _x(B=2, T=6)
    dropless = _layer()
    roomy = _layer(dispatch="capacity", capacity_factor=2.0)  # E / k: every choice fits
    tight = _layer(dispatch="capacity", capacity_factor=0.5)
    run = jax.jit(lambda m, x: m(x))
    (y_d, aux_d), (y_c, aux_c), (_, aux_t) = (run(m, x) for m in (dropless, roomy, tight))
    np.testing.assert_allclose(y_c, y_d, **TOL)
    assert float(aux_d["dropped_fraction"]) == 0.0 and float(aux_c["dropped_fraction"]) == 0.0
    # The same routing gives the same losses and loads whatever the dispatch.
    for name in ("lb_loss", "z_loss", "expert_load_max", "expert_load_min"):
        np.testing.assert_allclose(aux_c[name], aux_d[name], **TOL)
        np.testing.assert_allclose(aux_t[name], aux_d[name], **TOL)
    # 24 choices over 4 experts, capacity ceil(0.5 * 24 / 4) = 3 each: all past 3 dropped.
    _, experts, _ = _route(dropless, x)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=4)
    want = np.maximum(counts - 3, 0).sum() / 24
    np.testing.assert_allclose(aux_t["dropped_fraction"], want, **TOL)
    assert want > 0
    np.testing.assert_allclose(aux_d["expert_load_max"], counts.max() / 6, **TOL)
    np.testing.assert_allclose(aux_d["expert_load_min"], counts.min() / 6, **TOL)
    cfg = dropless.config
    np.testing.assert_allclose(
        aux_d["loss"],
        cfg.load_balance_weight * aux_d["lb_loss"] + cfg.router_z_weight * aux_d["z_loss"],
        **TOL,
    )


def _route(model, x):
    from mlgen.ops import moe

    logits = x.reshape(-1, D) @ model.router.kernel[...]
    return moe.route(logits, model.config.experts_per_token, renormalize=True)


def test_aux_losses_follow_the_mask():
    from mlgen.ops import moe

    model = _layer()
    x = _x()
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], jnp.float32)
    _, aux = jax.jit(lambda m, x, mask: m(x, mask=mask))(model, x, mask)
    logits = x.reshape(-1, D) @ model.router.kernel[...]
    _, experts, probs = _route(model, x)
    flat = mask.reshape(-1)
    np.testing.assert_allclose(aux["lb_loss"], moe.load_balancing_loss(probs, experts, flat), **TOL)
    np.testing.assert_allclose(aux["z_loss"], moe.router_z_loss(logits, flat), **TOL)


@pytest.mark.parametrize(
    "field, value, msg",
    [
        ("experts_per_token", 5, "must be in [1, num_experts=4], got 5"),
        ("experts_per_token", 0, "must be in [1, num_experts=4], got 0"),
        ("num_experts", 0, "must be >= 1"),
        ("capacity_factor", 0.0, "must be > 0, got 0.0"),
        ("score", "relu", "must be one of ('softmax', 'sigmoid')"),
        ("dispatch", "dense", "must be one of ('dropless', 'capacity')"),
        ("grouped_impl", "pallas", "must be one of"),
        ("num_shared_experts", -1, "must be >= 0"),
        ("block_size", 0, "must be > 0"),
        ("load_balance_weight", -0.1, "must be >= 0"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(field, value, msg):
    cfg = dataclasses.replace(MoEConfig(num_experts=4), **{field: value})
    with pytest.raises(ConfigError) as e:
        MoE(D, F, cfg, rngs=nnx.Rngs(0))
    assert str(e.value).startswith(f"{field}: ") and "\n" not in str(e.value)
    assert msg in str(e.value)


def test_parameters_carry_logical_axes():
    model = _layer(num_shared_experts=1)
    names = {
        "/".join(map(str, path)): v.get_metadata()["out_sharding"]
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert names["router/kernel"] == ("embed", "expert")
    assert names["gate"] == ("expert", "embed", "mlp") and names["up"] == names["gate"]
    assert names["down"] == ("expert", "mlp", "embed")
    assert names["shared/up/kernel"] == ("embed", "mlp")
    assert model.gate.shape == (4, D, F) and model.down.shape == (4, F, D)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_experts_sharded_over_a_mesh_axis_give_the_same_output(dispatch):
    cfg = MoEConfig(num_experts=8, dispatch=dispatch, capacity_factor=4.0)
    x = _x(B=8, T=4)
    ref_model = MoE(D, F, cfg, rngs=nnx.Rngs(0))
    y_ref, _ = jax.jit(lambda m, x: m(x))(ref_model, x)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    # auto rules of a data-only mesh (batch over data) plus the experts split 8 ways
    rules = sharding.get_rules("auto", {"data": 8}, fragments=(("expert", "data"),))
    with sharding.use(mesh, rules):
        graphdef, params, shardings = sharding.sharded_init(
            lambda: MoE(D, F, cfg, rngs=nnx.Rngs(0)), mesh
        )
        assert shardings["gate"].spec == jax.sharding.PartitionSpec("data", None, None)
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        y, aux = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, xs)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert float(aux["dropped_fraction"]) == 0.0


def test_matches_transformers_mixtral_sparse_moe_block():
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig

    E, k = 4, 2
    hf_cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k
    )
    torch.manual_seed(0)
    block = mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
    experts = block.experts
    if not hasattr(experts, "gate_up_proj"):
        # Not covered then: the layer against this block (the pinned transformers 5.24 has the
        # fused layout, so CI runs it); Mixtral parity is still tested end to end by
        # tests/convert/test_hf.py[mixtral], which reads the per-expert w1/w2/w3 checkpoint.
        pytest.skip(
            "this transformers keeps Mixtral's experts as w1/w2/w3 modules, not gate_up_proj; "
            "the layer-level comparison is written for the fused layout; not covered here: the "
            "layer against transformers (the Mixtral logits test in tests/convert/test_hf.py "
            "still compares the whole model)"
        )
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    model = MoE(D, F, MoEConfig(num_experts=E, experts_per_token=k), rngs=nnx.Rngs(0))
    t = lambda p: jnp.asarray(p.detach().numpy())  # noqa: E731
    gate_up = t(experts.gate_up_proj)  # [E, 2F, D]: w1 (gate) rows, then w3 (up) rows
    model.router.kernel[...] = t(block.gate.weight).T  # [E, D] -> [D, E]
    model.gate[...] = jnp.swapaxes(gate_up[:, :F], 1, 2)
    model.up[...] = jnp.swapaxes(gate_up[:, F:], 1, 2)
    model.down[...] = jnp.swapaxes(t(experts.down_proj), 1, 2)  # w2 [E, D, F] -> [E, F, D]
    x = np.random.default_rng(2).standard_normal((2, 7, D)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    y, _ = jax.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    np.testing.assert_allclose(y, want, **TOL)


# ----------------------------------------------------------------------------- on meshes
def _step_on(mesh_cfg: MeshConfig | None, devices: int, cfg: MoEConfig, x, mask):
    """Loss (``sum(sin(y)) + aux["loss"]``), output, aux and gradients w.r.t. every parameter
    and the input, on a mesh under ``rules="auto"`` (None: no mesh, one device); and the
    compiled step's HLO text."""
    ctx = contextlib.nullcontext()
    if mesh_cfg is not None:
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:devices])
        ctx = sharding.use(mesh, "auto")
    with ctx:
        if mesh_cfg is None:
            graphdef, params = nnx.split(MoE(D, F, cfg, rngs=nnx.Rngs(0)), nnx.Param)
            params = nnx.to_pure_dict(params)
        else:
            graphdef, params, _ = sharding.sharded_init(
                lambda: MoE(D, F, cfg, rngs=nnx.Rngs(0)), mesh
            )
            put = lambda a, names: jax.device_put(a, NamedSharding(mesh, sharding.spec(names)))  # noqa: E731
            x, mask = put(x, ("batch", "length", None)), put(mask, ("batch", "length"))

        def loss(params, x, mask):
            y, aux = nnx.merge(graphdef, params)(x, mask=mask)
            return jnp.sum(jnp.sin(y)) + aux["loss"], (y, aux)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        compiled = step.lower(params, x, mask).compile()
        out = compiled(params, x, mask)
    return jax.device_get(out), compiled.as_text()


def _collectives(hlo: str, op: str) -> list[tuple[int, ...]]:
    """The result shapes of every ``op`` (e.g. ``all-gather``) in compiled HLO text."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(rf"=\s*(.*?)\s{op}(-start)?\(", line)
        if m:
            shapes += [
                tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
            ]
    return shapes


_MESHES = {
    "expert4": (MeshConfig(data=1, expert=4), 4),
    "data2-expert4": (MeshConfig(data=2, expert=4), 8),
    "fsdp2-expert4": (MeshConfig(data=1, fsdp=2, expert=4), 8),
    "data4": (MeshConfig(data=4), 4),  # experts whole on every device: data parallel, no exchange
}


def _mesh_problem(dispatch: str):
    cfg = MoEConfig(
        num_experts=8,
        dispatch=dispatch,
        capacity_factor=4.0,  # E / k: room for every choice, nothing drops on any mesh
        num_shared_experts=1,
        block_size=4,
    )
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 4, D)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 4)) > 0.3, jnp.float32)
    return cfg, x, mask


@functools.cache
def _one_device(dispatch: str):
    return _step_on(None, 1, *_mesh_problem(dispatch))


@pytest.mark.parametrize("mesh", list(_MESHES))
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sharded_layer_matches_one_device_and_exchanges_by_all_to_all(dispatch, mesh):
    """On expert=1 and expert=4 meshes (alone, with data, with fsdp) the layer gives the
    one-device loss, output, aux and gradients (w.r.t. the input and every parameter) to 1e-5;
    the compiled step moves tokens by all-to-all and never gathers the stacked experts."""
    E = 8
    cfg, x, mask = _mesh_problem(dispatch)
    ((loss_1, (y_1, aux_1)), grads_1), _ = _one_device(dispatch)
    ((loss, (y, aux)), grads), hlo = _step_on(*_MESHES[mesh], cfg, x, mask)
    np.testing.assert_allclose(loss, loss_1, **TOL)
    np.testing.assert_allclose(y, y_1, **TOL)
    for name in aux:
        np.testing.assert_allclose(aux[name], aux_1[name], **TOL, err_msg=name)
    assert float(aux["dropped_fraction"]) == 0.0 and float(aux["lb_loss"]) > 0
    flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    flat_1 = dict(jax.tree_util.tree_flatten_with_path(grads_1)[0])
    assert flat.keys() == flat_1.keys() and len(flat) == 8  # router, 3 experts, 3 shared, x
    for path, g in flat.items():
        np.testing.assert_allclose(g, flat_1[path], **TOL, err_msg=jax.tree_util.keystr(path))
    gathered = _collectives(hlo, "all-gather")
    if mesh == "data4":  # each device routes and dispatches its own tokens; nothing gathered
        assert not gathered and not _collectives(hlo, "all-to-all")
        return
    assert _collectives(hlo, "all-to-all")
    # The only [E, ., .] weights gathered are fsdp's gathers of a device's E / 4 experts.
    stacked = [s for s in gathered if len(s) == 3 and s[1:] in ((D, F), (F, D))]
    assert all(s[0] == E // 4 for s in stacked), gathered
    assert bool(stacked) == (mesh == "fsdp2-expert4"), gathered


def test_batch_that_does_not_split_over_the_expert_axis_takes_the_plain_path():
    """B=2 on data=2 x expert=4 (a decode batch): the tokens cannot reach every expert shard,
    so XLA's partitioner places the plain layer; the output is still the one-device one."""
    cfg = MoEConfig(num_experts=8)
    x = _x(B=2, T=3)
    want, _ = jax.jit(lambda m, x: m(x))(MoE(D, F, cfg, rngs=nnx.Rngs(0)), x)
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    with sharding.use(mesh, "auto"):
        graphdef, params, _ = sharding.sharded_init(lambda: MoE(D, F, cfg, rngs=nnx.Rngs(0)), mesh)
        got, _ = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
    np.testing.assert_allclose(got, want, **TOL)


def test_experts_not_divisible_by_the_expert_shards_are_a_config_error():
    check_expert_mesh(8, 4)
    with pytest.raises(ConfigError) as e:
        check_expert_mesh(6, 4)
    assert str(e.value) == (
        "num_experts: 6 is not divisible by the 4 shards of the expert axis (mesh.expert)"
    )
    # The layer says the same when it meets such a mesh.
    model = MoE(D, F, MoEConfig(num_experts=6), rngs=nnx.Rngs(0))
    with sharding.use(sharding.make_mesh(MeshConfig(data=2, expert=4)), "auto"):
        with pytest.raises(ConfigError, match="^num_experts: 6 is not divisible by the 4"):
            jax.jit(lambda m, x: m(x))(model, _x(B=8, T=2))


def test_bfloat16_experts_on_an_expert_mesh():
    """bfloat16 compute: the weights' gradients are summed over the data axis in float32 (a
    bfloat16 all-reduce there crashed XLA:CPU); close to one device at bfloat16's precision."""
    cfg = MoEConfig(num_experts=8, block_size=4)
    x = _x(B=8, T=2)

    def grads(mesh_cfg):
        ctx = contextlib.nullcontext()
        if mesh_cfg is not None:
            mesh = sharding.make_mesh(mesh_cfg)
            ctx = sharding.use(mesh, "auto")
        with ctx:
            make = lambda: MoE(D, F, cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # noqa: E731
            if mesh_cfg is None:
                graphdef, params = nnx.split(make(), nnx.Param)
                params = nnx.to_pure_dict(params)
            else:
                graphdef, params, _ = sharding.sharded_init(make, mesh)

            def loss(p, x):
                y, aux = nnx.merge(graphdef, p)(x)
                return jnp.sum(jnp.sin(y.astype(jnp.float32))) + aux["loss"]

            return jax.device_get(jax.jit(jax.grad(loss))(params, x))

    want, got = grads(None), grads(MeshConfig(data=2, expert=4))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2)
