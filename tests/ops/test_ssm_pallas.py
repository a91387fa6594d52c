"""mlgen.ops.ssm_pallas: the Mosaic SSD kernel = the step-by-step recurrence; dispatch; TPU compile.

In the Mosaic interpreter on CPU: values and gradients (float32) against ``ssd_reference`` with
lengths that are not a multiple of the chunk, an initial state, several b/c groups and heads,
one head per grid step, resets inside chunks, a sequence shorter than the chunk, bfloat16
inputs. Dispatch: ``ssd(impl=...)`` picks the jnp path on CPU for ``auto``, the kernel when
named, one-line errors. With libtpu: libtpu's ahead-of-time compiler takes the kernel for a
TPU v5e (one chip, and four with the batch split by ``shard_map``) and ``auto`` picks it
there; the compiler sees the kernel's FLOPs.

Not covered: running on a TPU (speed, VMEM pressure at large ``block_heads``), the Mosaic
interpreter's fidelity to the chip, and a Pallas backward (the backward is the jnp path's VJP,
whose correctness ``tests/ops/test_ssm.py`` checks).
"""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # we only compile

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mlgen.ops import ssm, ssm_pallas  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(B=2, T=37, N=4, H=3, R=2, S=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 7)
    return dict(
        x=jax.random.normal(k[0], (B, T, N, H)),
        dt=jax.nn.softplus(jax.random.normal(k[1], (B, T, N))),
        a=-jnp.exp(jax.random.normal(k[2], (N,))),
        b=jax.random.normal(k[3], (B, T, R, S)),
        c=jax.random.normal(k[4], (B, T, R, S)),
        d=jax.random.normal(k[5], (N,)),
    ), jax.random.normal(k[6], (B, N, H, S))


def _kernel(block_heads=8):
    """The kernel in the interpreter, called directly (so block sizes can be set), jitted."""

    def run(inputs, h0, reset, chunk):
        return ssm_pallas.ssd(
            **inputs,
            chunk=chunk,
            initial_state=h0,
            reset=reset,
            recompute=lambda *a, **kw: ssm.ssd(*a, **kw, impl="xla"),
            interpret=True,
            block_sizes=ssm_pallas.BlockSizes(block_heads=block_heads),
        )

    return jax.jit(run, static_argnums=3)


def _close(got, want, **tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **(tol or TOL))


@pytest.mark.parametrize(
    "shape,chunk,block_heads,resets",
    [
        # 3 heads per group, one per grid step: the group's b/c index map and scratch rows;
        # chunk 12 runs as 16 (Mosaic's 8 sublanes): 20 = 16 + 4
        pytest.param(dict(B=1, T=20, N=6, H=4), 12, 1, (), id="one-head-per-step-chunk12"),
        # 37 = 2 chunks of 16 + 5; 2 groups of 2 heads, both heads of a group in one step;
        # resets inside a chunk (13), at a chunk start (16) and twice in one chunk (33, 35)
        pytest.param(dict(), 16, 8, ((0, 13), (0, 16), (1, 33), (1, 35)), id="odd-T-groups-resets"),
    ],
)
def test_kernel_equals_the_recurrence(shape, chunk, block_heads, resets):
    inputs, h0 = _inputs(**shape)
    B, T = inputs["x"].shape[:2]
    reset = None
    if resets:
        reset = jnp.zeros((B, T), bool).at[tuple(zip(*resets))].set(True)
    want = ssm.ssd_reference(**inputs, initial_state=h0, reset=reset)
    got = _kernel(block_heads)(inputs, h0, reset, chunk)
    _close(got, want)


def _loss(fn, wy, wh):
    """Fixed random weights on y and the final state: the cotangents do not depend on the
    forward values (a curved loss would amplify the kernel's ~1e-7 forward differences)."""

    def f(inputs, h0):
        y, h = fn(**inputs, initial_state=h0)
        return jnp.sum(y * wy) + jnp.sum(h * wh)

    return f


def test_value_and_gradients_through_the_public_api_equal_the_recurrence():
    """``ssd(impl="pallas")``: the loss from the kernel's forward, every input's gradient (the
    initial state's and ``d``'s included) from the jnp path's VJP."""
    inputs, h0 = _inputs(T=21)
    k1, k2 = jax.random.split(jax.random.key(3))
    wy, wh = jax.random.normal(k1, inputs["x"].shape), jax.random.normal(k2, h0.shape)
    ref = jax.value_and_grad(_loss(ssm.ssd_reference, wy, wh), argnums=(0, 1))(inputs, h0)

    def pallas(**kw):
        return ssm.ssd(**kw, chunk=8, impl="pallas", interpret=True)

    got = jax.jit(jax.value_and_grad(_loss(pallas, wy, wh), argnums=(0, 1)))(inputs, h0)
    _close(got, ref)


def test_bfloat16_inputs_and_a_sequence_shorter_than_the_chunk():
    """bf16 x, b, c: bf16 matmul operands, f32 accumulation; against the recurrence on the same
    (bf16-rounded) values, to bf16's precision. 13 tokens with chunk 256 run as one chunk of 16."""
    inputs, h0 = _inputs(B=1, T=13, H=8, S=8)
    inputs = {k: v.astype(jnp.bfloat16) if k in "xbc" else v for k, v in inputs.items()}
    want = ssm.ssd_reference(**inputs, initial_state=h0)
    got = _kernel()(inputs, h0, None, 256)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        assert err < 2e-2, err


def _has_kernel(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_auto_runs_the_jnp_path_on_cpu_and_pallas_runs_the_kernel():
    inputs, h0 = _inputs(T=8)

    def run(impl, interpret=False):
        return lambda inp: ssm.ssd(**inp, chunk=8, impl=impl, interpret=interpret)

    assert not _has_kernel(run("auto"), inputs)
    assert not _has_kernel(run("auto", True), inputs)  # interpret does not change auto's choice
    assert not _has_kernel(run("xla"), inputs)
    assert _has_kernel(run("pallas", True), inputs)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(impl="fast"), r"^impl: must be one of \('auto', 'xla', 'pallas'\), got 'fast'$"),
        (
            dict(impl="pallas"),
            r"^impl: 'pallas' is a TPU \(Mosaic\) kernel and the platform is cpu",
        ),
        (
            dict(impl="pallas", interpret=True, x=jnp.zeros((1, 8, 4, 3), jnp.float16)),
            r"^impl: the SSD kernel takes float32/bfloat16 x, got float16$",
        ),
    ],
)
def test_bad_impl_is_one_line_naming_it(change, message):
    inputs, _ = _inputs(B=1, T=8)
    kw = dict(chunk=8)
    for k in ("impl", "interpret"):
        if k in change:
            kw[k] = change.pop(k)
    with pytest.raises(ValueError, match=message):
        ssm.ssd(**{**inputs, **change}, **kw)


@pytest.mark.parametrize("R", [1, 2], ids=["one-group", "groups-split"])
def test_per_shard_splits_batch_and_heads_and_equals_one_device(R):
    """The kernel's ``shard_map`` wrapper on 8 CPU devices (data 2 x tensor 2 x seq 2), with the
    jnp path standing in for the kernel (the interpreter runs without the wrapper): batch over
    ``data``, heads, ``a``, ``d`` (and groups when R > 1) over ``tensor``; the same numbers."""
    inputs, h0 = _inputs(B=2, T=16, N=4, R=R)
    reset = jnp.zeros((2, 16), bool).at[1, 5].set(True)
    args = [inputs[k] for k in ("x", "dt", "a", "b", "c", "d")] + [h0, reset]
    seen = []

    def jnp_path(x, dt, a, b, c, d, h0, reset):
        seen.append((x.shape, b.shape, a.shape))
        return ssm.ssd(x, dt, a, b, c, d, chunk=8, initial_state=h0, reset=reset, impl="xla")

    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "tensor", "seq"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: ssm_pallas._per_shard(jnp_path, *a))(*args)
    assert seen == [((1, 16, 2, 3), (1, 16, R // 2 or 1, 5), (2,))]
    _close(got, jnp_path(*args))


def test_block_heads_must_be_positive():
    with pytest.raises(ValueError, match=r"^BlockSizes\.block_heads must be a positive int"):
        ssm_pallas.BlockSizes(block_heads=0)


# -- libtpu: the real TPU compiler ------------------------------------------------------------
def _tpu_mesh(chips):
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    devices = np.array(topo.devices[:chips]).reshape(chips)
    return Mesh(devices, ("data",), axis_types=(AxisType.Auto,))


def _tpu_args(mesh, B, T, N, H, R, S, dtype, reset):
    row, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), dtype, sharding=row),
        jax.ShapeDtypeStruct((B, T, N), jnp.float32, sharding=row),
        jax.ShapeDtypeStruct((N,), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((B, T, R, S), dtype, sharding=row),
        jax.ShapeDtypeStruct((B, T, R, S), dtype, sharding=row),
        jax.ShapeDtypeStruct((B, N, H, S), jnp.float32, sharding=row),
    ]
    if reset:
        args.append(jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=row))
    return args


def _fwd(chunk, impl):
    def f(x, dt, a, b, c, h0, *reset):
        r = reset[0] if reset else None
        return ssm.ssd(x, dt, a, b, c, chunk=chunk, initial_state=h0, reset=r, impl=impl)

    return f


@pytest.mark.parametrize(
    "chips,dtype,chunk,R,reset,impl",
    [
        pytest.param(1, jnp.float32, 256, 1, False, "pallas", id="f32-L256-1group"),
        pytest.param(
            4, jnp.bfloat16, 128, 2, True, "auto", id="auto-bf16-L128-2groups-resets-4chips"
        ),
    ],
)
def test_kernel_compiles_for_tpu(chips, dtype, chunk, R, reset, impl):
    """libtpu compiles the forward (Mosaic kernel + the XLA around it); ``auto`` picks the
    kernel when the inputs live on TPU chips; four chips split the batch per chip."""
    pytest.importorskip("libtpu")
    B, T, N, H, S = 4, 600, 8, 64, 128
    mesh = _tpu_mesh(chips)
    args = _tpu_args(mesh, B, T, N, H, R, S, dtype, reset)
    compiled = jax.jit(_fwd(chunk, impl)).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 1
    assert compiled.memory_analysis() is not None
    # The kernel's declared work reaches XLA's cost analysis (per chip: B / chips rows).
    nc, Bc = -(-T // chunk), B // chips
    kernel = Bc * nc * (N // 8 * 2 * chunk**2 * S + N * (2 * chunk**2 * H + 4 * chunk * H * S))
    assert kernel <= compiled.cost_analysis()["flops"] < 1.2 * kernel


@pytest.mark.slow
def test_gradient_compiles_for_tpu():
    """The training step's shape: the kernel forward and the jnp VJP backward (~40 s unloaded)."""
    pytest.importorskip("libtpu")
    args = _tpu_args(_tpu_mesh(1), 2, 1000, 8, 64, 1, 128, jnp.bfloat16, False)

    def loss(*a):
        y, h = _fwd(256, "pallas")(*a)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h**2)

    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 1
