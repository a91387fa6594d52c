"""``mlgen.ops.attention`` picks and allows backends by the platform compiled for, not the host.

On this CPU: the public API compiled ahead of time for a TPU slice (libtpu) with ``auto`` and
with ``backend="pallas_tpu"`` named, and lowered for CUDA with ``backend="pallas_gpu"``. What
this does not cover: running those programs (no TPU or GPU here).
"""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # we only compile

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mlgen  # noqa: E402
from mlgen.ops.attention import recording  # noqa: E402
from mlgen.ops.platform import target_platform  # noqa: E402


def _tpu_args(B=4, T=512, N=4, K=2, H=128, dtype=jnp.bfloat16):
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topo.devices).reshape(4), ("data",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P("data"))
    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H)]
    return mesh, [jax.ShapeDtypeStruct(s, dtype, sharding=sh) for s in shapes]


def _loss(backend):
    def loss(q, k, v):
        out = mlgen.ops.attention(q, k, v, causal=True, backend=backend)
        return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("backend", ["auto", "pallas_tpu"])
@pytest.mark.parametrize("under_mesh", [False, True], ids=["inputs-sharded", "set_mesh"])
def test_public_api_compiles_pallas_tpu_for_a_tpu_slice(backend, under_mesh):
    pytest.importorskip("libtpu")
    mesh, args = _tpu_args()
    with recording() as calls:
        if under_mesh:
            with jax.set_mesh(mesh):
                compiled = jax.jit(_loss(backend)).lower(*args).compile()
        else:
            compiled = jax.jit(_loss(backend)).lower(*args).compile()
    assert [name for name, _ in calls] == ["pallas_tpu"]
    assert calls[0][1].platform == "tpu" and calls[0][1].platform_known
    # forward, dK/dV and dQ kernels, compiled by Mosaic
    assert compiled.as_text().count("tpu_custom_call") >= 3


def test_pallas_gpu_named_lowers_for_cuda_through_the_public_api():
    """No mesh says what is compiled for: the kernel is not refused for the CPU host."""
    args = [jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)] * 1 + [
        jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    ] * 2
    gpu = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    abstract = AbstractMesh((1,), ("x",), axis_types=(AxisType.Explicit,), abstract_device=gpu)
    fwd = jax.jit(lambda q, k, v: mlgen.ops.attention(q, k, v, causal=True, backend="pallas_gpu"))
    with recording() as calls:
        if jax.__version_info__ >= (0, 11):  # newer JAX lowers Triton only under a GPU mesh
            with jax.sharding.use_abstract_mesh(abstract):
                text = fwd.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        else:
            text = fwd.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
    assert [name for name, _ in calls] == ["pallas_gpu"]


def test_target_platform_sources():
    x = jnp.ones((2, 2))
    assert target_platform(x) == ("cpu", True)  # a concrete array: its devices
    seen = []
    jax.jit(lambda y: seen.append(target_platform(y)) or y).lower(
        jax.ShapeDtypeStruct((2, 2), jnp.float32)
    )
    assert seen == [("cpu", False)]  # traced with nothing said: the host's, not known
    gpu = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    abstract = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=gpu)
    with jax.sharding.use_abstract_mesh(abstract):
        assert target_platform() == ("gpu", True)


def test_named_kernel_still_refused_where_the_platform_is_known():
    q = jnp.ones((1, 8, 4, 16))
    k = v = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"pallas_tpu needs a TPU \(platform is cpu\)"):
        mlgen.ops.attention(q, k, v, backend="pallas_tpu")


def test_tpu_kernels_tell_xla_their_cost():
    """A Mosaic call is opaque to XLA's cost analysis: the kernels declare their FLOPs (mlgen
    plan's compiled FLOPs and roofline would leave attention out otherwise)."""
    pytest.importorskip("libtpu")
    B, T, N, K, H = 4, 512, 4, 2, 128
    _, args = _tpu_args(B=B, T=T, N=N, K=K, H=H)

    def fwd(q, k, v):
        return mlgen.ops.attention(q, k, v, causal=True, backend="pallas_tpu").sum()

    per_chip = B // 4 * N * T * T * H * 2 * 2 / 2  # QK^T and PV, causal half, 1 row per chip
    flops = jax.jit(fwd).lower(*args).compile().cost_analysis()["flops"]
    assert per_chip <= flops < 1.1 * per_chip
    grad = jax.jit(_loss("pallas_tpu")).lower(*args).compile().cost_analysis()["flops"]
    assert 4.4 * per_chip <= grad < 5.0 * per_chip  # forward + dK/dV (4 matmuls) + dQ (3)
