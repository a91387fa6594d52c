"""``mlgen.ops.ssm_parallel``: the sequence-parallel SSD, selective scan and causal conv against
the one-device ops of ``mlgen.ops.ssm`` on 2, 4 and 8 simulated devices along ``seq`` and on
``data=2 x seq=4`` (and ``data x seq x tensor`` with the heads on an automatic axis): outputs,
final states and the gradients of every input, float32, with an initial state, with and
without resets / segment ids, per-device lengths not a multiple of the chunk (and shorter than
one). The compiled HLO of the gradient moves only states across devices. Argument errors."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mlgen.ops import ssm, ssm_parallel

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, CHUNK = 2, 48, 7  # 24, 12 or 6 tokens per device: never a multiple of the chunk
N, H, R, S, C, K = 4, 2, 2, 2, 6, 4  # one device's states are smaller than its activations


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


MESHES = {
    "seq2": ((2,), ("seq",)),
    "seq4": ((4,), ("seq",)),
    "seq8": ((8,), ("seq",)),
    "data2xseq4": ((2, 4), ("data", "seq")),
    "data2xseq2xtensor2": ((2, 2, 2), ("data", "seq", "tensor")),
}


def _rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _problem(kind: str, with_reset: bool):
    """Inputs in the order the op takes them, then the keyword arrays (initial state, reset)."""
    f = functools.partial(_rand)
    if kind == "ssd":
        args = (
            f(0, B, T, N, H),
            jax.nn.softplus(f(1, B, T, N)),
            -jnp.exp(0.5 * f(2, N)),
            f(3, B, T, R, S),
            f(4, B, T, R, S),
            f(5, N),
        )
        state = f(6, B, N, H, S)
    elif kind == "selective":
        args = (
            f(0, B, T, C),
            jax.nn.softplus(f(1, B, T, C)),
            -jnp.exp(0.5 * f(2, C, S)),
            f(3, B, T, S),
            f(4, B, T, S),
            f(5, C),
        )
        state = f(6, B, C, S)
    else:  # conv: x, w, bias
        args = (f(0, B, T, C), f(1, K, C), f(2, C))
        state = f(6, B, K - 1, C)
    # Resets at device boundaries (6, 12, 24) and inside shards; one row without any.
    reset = np.zeros((B, T), bool)
    reset[0, [6, 9, 12, 20, 24, 40]] = True
    return args, state, (reset if with_reset else None)


def _call(kind, args, state, reset, **kw):
    """One op (the one-device op with no ``kw``, else the sequence-parallel one)."""
    if kind == "conv":
        ids = None if reset is None else jnp.asarray(np.cumsum(reset, axis=1), jnp.int32)
        fn = ssm_parallel.causal_conv1d_seq_parallel if kw else ssm.causal_conv1d
        return fn(*args, state, ids, **kw)
    if kind == "ssd":
        fn = ssm_parallel.ssd_seq_parallel if kw else ssm.ssd
    else:
        fn = ssm_parallel.selective_scan_seq_parallel if kw else ssm.selective_scan
    reset = None if reset is None else jnp.asarray(reset)
    return fn(*args, chunk=CHUNK, initial_state=state, reset=reset, **kw)


def _loss_and_grads(kind, reset, **kw):
    """``jit(value_and_grad)`` of a loss reading every output and the final state."""

    def loss(args, state):
        y, h = _call(kind, args, state, reset, **kw)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h * jnp.cos(h)), (y, h)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@functools.lru_cache(maxsize=None)
def _one_device(kind: str, with_reset: bool):
    args, state, reset = _problem(kind, with_reset)
    return jax.device_get(_loss_and_grads(kind, reset)(args, state))


def _specs(kind, names):
    """Input shardings: B over ``data``, T over ``seq``, heads / channels over ``tensor``."""
    b = "data" if "data" in names else None
    t = "tensor" if "tensor" in names else None
    tokens = {"ssd": (P(b, "seq", t), P(b, "seq", t)), "selective": (P(b, "seq", t),) * 2}
    if kind == "conv":
        return (P(b, "seq", t), P(None, t), P(t)), P(b, None, t)
    bc = P(b, "seq")
    return (*tokens[kind], P(t), bc, bc, P(t)), P(b, t)


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"
    r"(-start)?\("
)


def _collective_sizes(hlo: str) -> list[tuple[str, int]]:
    """Every array a collective of a compiled HLO module moves, with its element count."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            # XLA combines collectives into tuples: each array is counted on its own.
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1)):
                out.append((m.group(2), math.prod(int(v) for v in dims.split(",") if v)))
    return out


# Each case compiles a sharded gradient (~3-10 s here): a default set covering every op on 2, 4
# and 8 devices, both exchanges, data x seq, an automatic tensor axis, and resets or not; the
# rest of the grid is marked slow. (all_gather on 8 devices is left out: its n gathered states
# are not smaller than one device's activations at these sizes, so the HLO check cannot tell.)
DEFAULT = [  # (op, mesh, exchange, resets / segment ids)
    ("ssd", "seq4", "ppermute", True),
    ("ssd", "data2xseq4", "all_gather", True),
    ("ssd", "data2xseq2xtensor2", "ppermute", False),
    ("selective", "seq8", "ppermute", True),
    ("selective", "seq2", "all_gather", True),
    ("conv", "seq8", "ppermute", True),
    ("conv", "data2xseq4", "ppermute", False),
]
GRID = [
    (kind, mesh, exchange, reset)
    for kind in ("ssd", "selective", "conv")
    for mesh in ("seq2", "seq4", "seq8", "data2xseq4")
    for exchange in (("ppermute",) if kind == "conv" else ("ppermute", "all_gather"))
    for reset in (False, True)
    if not (exchange == "all_gather" and mesh == "seq8")
]
CASES = DEFAULT + [pytest.param(*c, marks=pytest.mark.slow) for c in GRID if c not in DEFAULT]


@pytest.mark.parametrize("kind, mesh_name, exchange, with_reset", CASES)
def test_seq_parallel_matches_one_device(kind, mesh_name, exchange, with_reset):
    """Values, final state and every input's gradient equal the one-device op's (float32), and
    no collective of the compiled gradient moves more than one state (``n`` of them for
    ``all_gather``), less than one device's activations."""
    shape, names = MESHES[mesh_name]
    mesh = _mesh(shape, names)
    (want_loss, (want_y, want_h)), want_g = _one_device(kind, with_reset)
    args, state, reset = _problem(kind, with_reset)
    arg_specs, state_spec = _specs(kind, names)
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    args = tuple(map(put, args, arg_specs))
    state = put(state, state_spec)
    # One case takes the active mesh (jax.set_mesh), as the layers call it.
    active = mesh_name == "data2xseq2xtensor2"
    kw = dict(batch_axes=("data",) if "data" in names else (), mesh=None if active else mesh)
    if kind != "conv":
        kw["exchange"] = exchange
    with jax.set_mesh(mesh):
        step = _loss_and_grads(kind, reset, **kw).lower(args, state).compile()
        (loss, (y, h)), g = step(args, state)
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(h, want_h, **TOL)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-4)  # a sum of ~500 terms
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(got, want, **TOL)

    n = mesh.shape["seq"]
    local_rows = B // mesh.shape.get("data", 1)
    bound = local_rows * math.prod(want_h.shape[1:]) * (n if exchange == "all_gather" else 1)
    activation = local_rows * (T // n) * math.prod(want_y.shape[2:])  # one device's outputs
    assert bound < activation  # the problem is one where the check below can tell
    sizes = _collective_sizes(step.as_text())
    assert any(op != "all-reduce" for op, _ in sizes), sizes  # the states did cross
    assert max(size for _, size in sizes) <= bound, (sizes, bound)


def test_hlo_check_sees_an_activation_gather():
    """The collective scan of the test above would notice a gathered ``[B, T, ...]``."""
    mesh = _mesh((4,), ("seq",))
    x = jax.device_put(jnp.ones((B, T, N, H)), NamedSharding(mesh, P(None, "seq")))
    gathered = jax.jit(
        lambda x: jnp.cumsum(x, axis=1), out_shardings=NamedSharding(mesh, P())
    ).lower(x)
    sizes = _collective_sizes(gathered.compile().as_text())
    assert max(size for _, size in sizes) >= B * T * N * H // 4, sizes


def test_a_single_device_axis_is_the_one_device_op():
    args, state, reset = _problem("conv", True)
    mesh = _mesh((1, 8), ("seq", "data"))
    y, h = _call("conv", args, state, reset, mesh=mesh)
    want_y, want_h = _call("conv", args, state, reset)
    np.testing.assert_allclose(y, want_y, **TOL)
    np.testing.assert_allclose(h, want_h, **TOL)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a, m: ssm_parallel.ssd_seq_parallel(*a, chunk=4), "seq_axis='seq'"),
        (lambda a, m: ssm_parallel.ssd_seq_parallel(*a, mesh=m, seq_axis="length"), "seq_axis"),
        (lambda a, m: ssm_parallel.ssd_seq_parallel(*a, mesh=m, batch_axes=("seq",)), "batch_axes"),
        (lambda a, m: ssm_parallel.ssd_seq_parallel(*a, mesh=m, exchange="ring"), "exchange"),
        (lambda a, m: ssm_parallel.ssd_seq_parallel(*a, mesh=m, chunk=0), "chunk"),
        (
            lambda a, m: ssm_parallel.ssd_seq_parallel(*(t[:, :6] for t in a[:2]), *a[2:], mesh=m),
            "T=6",
        ),
        (
            lambda a, m: ssm_parallel.ssd_seq_parallel(*a, mesh=m, initial_state=jnp.zeros(3)),
            "initial_state",
        ),
        (
            lambda a, m: ssm_parallel.causal_conv1d_seq_parallel(
                jnp.zeros((B, 8, C)), jnp.zeros((4, C)), mesh=m
            ),
            "K - 1 = 3",
        ),
        (
            lambda a, m: ssm_parallel.causal_conv1d_seq_parallel(
                jnp.zeros((B, 8, C)), jnp.zeros((2, C)), state=jnp.zeros((B, 2, C)), mesh=m
            ),
            "state",
        ),
    ],
    ids=["no-mesh", "axis", "batch-axes", "exchange", "chunk", "length", "state", "halo", "cstate"],
)
def test_argument_errors_name_the_argument(call, match):
    args, _, _ = _problem("ssd", False)
    mesh = _mesh((2, 4), ("data", "seq"))
    with pytest.raises(ValueError, match=re.escape(match)):
        call(args, mesh)
