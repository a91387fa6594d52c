"""Ring attention over the mesh 'seq' axis: forward and gradients against the reference.

8 simulated CPU devices. Per-device lengths (12, 6-long zigzag chunks) are deliberately not
multiples of the local block size (8).
"""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen import ops
from mlgen.ops.attention import BlockSizes, reference
from mlgen.ops.attention import ring as ring_lib
from mlgen.ops.attention.ring import _Ring, ring_attention
from tests.ops.attention_test_base import fwd_and_grads, make_inputs

BS = BlockSizes(block_q=8, block_k=8, block_q_bwd=8, block_k_bwd=8)


def _mesh(n: int, data: int = 1) -> Mesh:
    devs = np.asarray(jax.devices()[: n * data]).reshape(data, n)
    return Mesh(devs, ("data", "seq"), axis_types=(AxisType.Auto,) * 2)


def _check(want, got, tol=1e-5):
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        assert g.shape == w.shape, name
        w, g = np.asarray(w), np.asarray(g)
        err = np.max(np.abs(w - g)) / max(1.0, np.max(np.abs(w)))
        assert err <= tol, f"{name}: relative error {err:.2e}"


def _run(mesh, q, k, v, do, *, kv_sharded=True, **kw):
    """Ring forward + grads on inputs placed sharded over (data, seq) as a model would hold them."""
    sh = NamedSharding(mesh, P("data", "seq"))
    kv_sh = sh if kv_sharded else NamedSharding(mesh, P("data"))
    ids = kw.pop("segment_ids", None)
    q, do = jax.device_put(q, sh), jax.device_put(do, sh)
    k, v = jax.device_put(k, kv_sh), jax.device_put(v, kv_sh)
    with jax.set_mesh(mesh):
        return fwd_and_grads(
            lambda q, k, v: ring_attention(q, k, v, segment_ids=ids, block_sizes=BS, **kw),
            q,
            k,
            v,
            do,
        )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_matches_reference_segments_gqa(n, causal):
    data = 2 if n < 8 else 1
    q, k, v, do, seg = make_inputs(B=2, T=12 * n, S=12 * n, N=4, K=2, H=8, segments="docs", seed=n)
    want = fwd_and_grads(
        lambda q, k, v: reference.attention(q, k, v, causal=causal, segment_ids=seg), q, k, v, do
    )
    got = _run(_mesh(n, data), q, k, v, do, causal=causal, segment_ids=seg)
    _check(want, got)
    assert got[0].sharding.spec[:2] == ("data", "seq")  # batch and length stay sharded


def test_load_balanced_equals_unbalanced_and_reference():
    q, k, v, do, _ = make_inputs(B=1, T=48, S=48, N=2, K=1, H=8, seed=3)
    mesh = _mesh(4)
    lb = _run(mesh, q, k, v, do, causal=True, load_balance=True)
    flat = _run(mesh, q, k, v, do, causal=True, load_balance=False)
    _check(flat, lb, tol=1e-6)
    _check(
        fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, causal=True), q, k, v, do), lb
    )


def test_zigzag_gives_every_device_equal_work():
    """Unmasked (query chunk, key chunk) pairs per device per step: equal with zigzag,
    not without."""
    for n in (2, 4, 8):
        for chunks, want_equal in ((2, True), (1, False)):
            cfg = _Ring(
                axis="seq",
                n=n,
                chunks=chunks,
                chunk=1,
                causal=True,
                window=None,
                scale=1.0,
                local="blockwise",
                block_sizes=None,
            )
            work = np.zeros((n, n), int)
            for d in range(n):
                for s in range(n):
                    src = (d - s) % n
                    ids_q, ids_k = cfg.chunk_ids(d), cfg.chunk_ids(src)
                    seen = {
                        (a, b) for a in range(chunks) for b in range(chunks) if ids_q[a] >= ids_k[b]
                    }
                    assert seen <= set(
                        cfg.pairs()
                    )  # the pair left out of the program is never needed
                    work[d, s] = len(seen)
            assert (work.sum(1) == work.sum(1)[0]).all() == want_equal, (n, chunks, work)


def test_causal_odd_chunks_falls_back_and_sliding_window():
    # T/n = 5 is odd: no zigzag; the sliding window crosses device boundaries.
    q, k, v, do, _ = make_inputs(B=1, T=20, S=20, N=2, K=2, H=8, seed=4)
    for kw in (dict(causal=True, sliding_window=7), dict(causal=False, sliding_window=6)):
        want = fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, do)
        _check(want, _run(_mesh(4), q, k, v, do, **kw))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cross_attention_with_replicated_kv(causal):
    # Queries sharded over seq, K/V replicated (T != S): queries are the last T of S positions.
    q, k, v, do, seg = make_inputs(
        B=2, T=16, S=24, N=4, K=2, H=8, segments=None if causal else "pair", seed=5
    )
    kw = dict(causal=causal, segment_ids=seg)
    want = fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, do)
    _check(want, _run(_mesh(4, 2), q, k, v, do, kv_sharded=False, **kw))


@pytest.mark.parametrize("kv_sharded", [True, False], ids=["self", "cross-replicated-kv"])
def test_eager_call_on_a_mesh_with_a_data_axis(kv_sharded):
    """Outside ``jit``, on a (data, seq) mesh (a partial-manual ``shard_map``): values and
    gradients, for inputs placed over both axes and for plain host arrays; a repeated eager
    call reuses the compiled ring."""
    S = 24 if kv_sharded else 32
    q, k, v, do, seg = make_inputs(B=2, T=24, S=S, N=4, K=2, H=8, seed=7)
    kw = dict(causal=True, segment_ids=seg)
    want = fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, do)
    mesh = _mesh(4, 2)
    sh = NamedSharding(mesh, P("data", "seq"))
    kv_sh = sh if kv_sharded else NamedSharding(mesh, P("data"))
    placed = (jax.device_put(q, sh), jax.device_put(k, kv_sh), jax.device_put(v, kv_sh))
    for inputs in (placed, (np.asarray(q), np.asarray(k), np.asarray(v))):
        with jax.set_mesh(mesh):
            out, vjp = jax.vjp(
                lambda q, k, v: ring_attention(q, k, v, block_sizes=BS, **kw), *inputs
            )
            grads = vjp(jax.device_put(do, sh))
        _check(want, (out, *grads))
    hits = ring_lib._sharded.cache_info().hits
    with jax.set_mesh(mesh):
        ring_attention(*placed, block_sizes=BS, **kw)
    assert ring_lib._sharded.cache_info().hits > hits


def test_attention_backend_ring_and_errors():
    q, k, v, do, seg = make_inputs(B=1, T=32, S=32, N=2, K=1, H=8, segments="docs", seed=6)
    want = fwd_and_grads(
        lambda q, k, v: reference.attention(q, k, v, causal=True, segment_ids=seg), q, k, v, do
    )
    with jax.set_mesh(_mesh(8)):
        got = fwd_and_grads(
            lambda q, k, v: ops.attention(q, k, v, causal=True, segment_ids=seg, backend="ring"),
            q,
            k,
            v,
            do,
        )
        with pytest.raises(ValueError, match="not divisible"):
            ops.attention(q[:, :30], k[:, :30], v[:, :30], backend="ring")
    _check(want, got)
    with pytest.raises(ValueError, match="ring: needs an active mesh"):
        ops.attention(q, k, v, backend="ring")
    with pytest.raises(ValueError, match="local_backend"):
        ring_attention(q, k, v, mesh=_mesh(2), local_backend="xla")


@pytest.mark.parametrize(
    "causal,zigzag",
    [(True, True), (True, False), (False, False)],
    ids=["causal-zigzag", "causal-contiguous", "bidir"],
)
def test_pallas_tpu_kernels_as_the_local_backend(causal, zigzag):
    """The ring around our Mosaic kernels, run in the Mosaic interpreter on CPU.

    Causal blocks go through ``lax.switch`` over three static kernel calls (full, diagonal,
    skipped); the backward is the kernel's own from the global lse. Covers values and grads
    with segments and GQA on 2 devices; not covered here: more devices (the interpreted kernels
    of 4 devices on 2 cores outrun XLA's 40 s collective rendezvous timeout), Mosaic's real TPU
    compile of the ring (the AOT test in test_attention_compile does that) and TPU timings.
    """
    n = 2
    T = 32
    q, k, v, do, seg = make_inputs(B=1, T=T, S=T, N=2, K=1, H=8, segments="docs", seed=n)
    want = fwd_and_grads(
        lambda q, k, v: reference.attention(q, k, v, causal=causal, segment_ids=seg), q, k, v, do
    )
    # The interpreter runs host callbacks, which need every mesh axis manual: a 'seq'-only mesh.
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("seq",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P(None, "seq"))
    q, k, v, do = (jax.device_put(x, sh) for x in (q, k, v, do))
    with jax.set_mesh(mesh):
        # zigzag: chunks of 8 (two per device); contiguous: one block of 16 per device.
        got = fwd_and_grads(
            lambda q, k, v: ring_attention(
                q,
                k,
                v,
                causal=causal,
                segment_ids=seg,
                block_sizes=BS,
                local_backend="pallas_tpu",
                interpret=True,
                load_balance=zigzag,
            ),
            q,
            k,
            v,
            do,
        )
    _check(want, got)


def test_pallas_tpu_local_backend_refuses_what_it_cannot_run():
    q, k, v, *_ = make_inputs(B=1, T=16, S=16, N=2, K=1, H=8)
    with pytest.raises(ValueError, match="local_backend='pallas_tpu' takes no sliding_window"):
        ring_attention(
            q, k, v, mesh=_mesh(2), causal=True, sliding_window=4, local_backend="pallas_tpu"
        )
    with pytest.raises(ValueError, match="takes no causal cross-attention"):
        ring_attention(
            q,
            k[:, :8],
            v[:, :8],
            mesh=_mesh(2),
            causal=True,
            kv_sharded=False,
            local_backend="pallas_tpu",
        )
