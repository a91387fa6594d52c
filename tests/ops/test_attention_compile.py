"""The Pallas kernels on their real compilers, from this CPU.

TPU: libtpu's ahead-of-time compiler for v5e and v5p topologies (Mosaic + XLA TPU), forward
and backward. GPU: lowering to CUDA (the Pallas -> Triton lowering of all three kernels).
"""

from __future__ import annotations

import os

# Other processes (a training run, another test worker) may have libtpu loaded; we only compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import (
    AbstractDevice,
    AbstractMesh,
    AxisType,
    Mesh,
    NamedSharding,
)  # noqa: E402
from jax.sharding import (
    PartitionSpec as P,
)

from mlgen.ops.attention import BlockSizes, pallas_gpu, pallas_tpu  # noqa: E402

_TPU_CASES = [
    pytest.param(jnp.bfloat16, 128, None, dict(causal=True), id="bf16-H128-default-causal"),
    pytest.param(
        jnp.float32,
        64,
        BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128),
        dict(causal=True, sliding_window=200),
        id="f32-H64-b128-window",
    ),
    pytest.param(
        jnp.bfloat16,
        256,
        BlockSizes(block_q=256, block_k=256, block_q_bwd=128, block_k_bwd=256),
        dict(causal=False, segments=True),
        id="bf16-H256-b256-segments",
    ),
    pytest.param(jnp.float32, 80, None, dict(causal=True, cross=True), id="f32-H80padded-decode"),
]


def _grad_fn(module, kw, seg):
    def loss(q, k, v, *ids):
        extra = dict(kw)
        if ids:
            extra["segment_ids"] = ids[0]
        return module.attention(q, k, v, **extra).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("dtype,H,block_sizes,opts", _TPU_CASES)
def test_pallas_tpu_compiles_for_tpu(topology, dtype, H, block_sizes, opts):
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    sh = NamedSharding(Mesh(topo.devices[:1], ("x",)), P())
    B, N, K = 2, 4, 2
    T = 384 if opts.get("cross") else 640
    S = 640
    kw = dict(
        causal=opts["causal"], sliding_window=opts.get("sliding_window"), block_sizes=block_sizes
    )
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), dtype, sharding=sh),
        jax.ShapeDtypeStruct((B, S, K, H), dtype, sharding=sh),
        jax.ShapeDtypeStruct((B, S, K, H), dtype, sharding=sh),
    ]
    if opts.get("segments"):
        args.append(jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh))
    fwd = jax.jit(
        lambda q, k, v, *ids: pallas_tpu.attention(
            q, k, v, segment_ids=ids[0] if ids else None, **kw
        )
    )
    compiled_fwd = fwd.lower(*args).compile()
    compiled_bwd = jax.jit(_grad_fn(pallas_tpu, kw, opts.get("segments"))).lower(*args).compile()
    for c in (compiled_fwd, compiled_bwd):
        assert c.memory_analysis() is not None
    hlo = compiled_bwd.as_text()
    assert hlo.count("tpu_custom_call") >= 3, (
        "forward, dK/dV and dQ kernels should all be Mosaic calls"
    )


def _abstract_cuda_gpu():
    """A context in which Pallas GPU kernels lower for an H100 (sm_90) with no GPU here.

    jax >= 0.12's Triton lowering reads the target GPU from the abstract mesh in context (its
    device kind gives the compute capability) and raises "No supported GPU devices found"
    without one; jax 0.10 falls back to sm_90 by itself and accepts the same context. The
    mesh must be in context while tracing, not only while lowering.
    """
    gpu = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Explicit,), abstract_device=gpu)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize(
    "dtype,H,opts",
    [
        pytest.param(jnp.bfloat16, 64, dict(causal=True), id="bf16-H64-causal"),
        pytest.param(
            jnp.float32,
            128,
            dict(causal=True, sliding_window=64, cross=True),
            id="f32-H128-window-decode",
        ),
        pytest.param(
            jnp.bfloat16, 256, dict(causal=False, segments=True), id="bf16-H256-segments-gqa"
        ),
    ],
)
def test_pallas_gpu_lowers_for_cuda(dtype, H, opts):
    B, N, K = 2, 4, 2
    T, S = (200, 300) if opts.get("cross") else (256, 256)
    kw = dict(causal=opts["causal"], sliding_window=opts.get("sliding_window"))
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), dtype),
        jax.ShapeDtypeStruct((B, S, K, H), dtype),
        jax.ShapeDtypeStruct((B, S, K, H), dtype),
    ]
    if opts.get("segments"):
        args.append(jax.ShapeDtypeStruct((B, T), jnp.int32))
    fwd = jax.jit(
        lambda q, k, v, *ids: pallas_gpu.attention(
            q, k, v, segment_ids=ids[0] if ids else None, **kw
        )
    )
    with _abstract_cuda_gpu():
        assert "triton" in fwd.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        text = (
            jax.jit(_grad_fn(pallas_gpu, kw, opts.get("segments")))
            .trace(*args)
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert text.count("mlgen_flash_") >= 3, (
        "forward, dK/dV and dQ kernels should all lower to Triton"
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal-zigzag", "bidir"])
def test_ring_with_pallas_tpu_local_backend_compiles_for_a_tpu_slice(causal):
    """Ring attention over 4 TPU v5e chips with our Mosaic kernels per block, forward and backward.

    The causal ring switches between three static kernel calls per block (full, diagonal,
    skipped); this checks that libtpu compiles that program for a real slice. Not covered:
    running it (no TPU here).
    """
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    from mlgen.ops.attention.ring import ring_attention

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(topo.devices, ("seq",))
    sh = NamedSharding(mesh, P(None, "seq"))
    B, T, N, K, H = 1, 4 * 512, 4, 2, 128
    args = [
        jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=sh),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=sh),
        jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=sh),
    ]

    def loss(q, k, v):
        out = ring_attention(q, k, v, mesh=mesh, causal=causal, local_backend="pallas_tpu")
        return out.astype(jnp.float32).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    hlo = compiled.as_text()
    assert "collective-permute" in hlo
    # forward kernel calls (2 per causal block: full and diagonal) and the backward's dK/dV
    # and dQ kernels
    assert hlo.count("tpu_custom_call") >= (6 if causal else 3)
