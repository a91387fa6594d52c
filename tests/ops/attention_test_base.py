"""Shared test base for attention backends: forward and dq/dk/dv against ``reference``.

A backend's test class only subclasses ``AttentionTestBase`` and sets ``backend`` (and, for
Pallas kernels run in the interpreter, ``interpret``, small ``block_sizes`` and the subset of
``CASES`` it can afford on CPU; the full grid runs under ``-m slow``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlgen.ops.attention import BACKENDS, reference
from mlgen.ops.attention import attention as public_attention

# Lengths are deliberately not multiples of any block size (8, 16, 128).
CASES: dict[str, dict] = {
    "causal_gqa2_b2": dict(B=2, T=37, S=37, N=4, K=2, causal=True),
    "full_mha": dict(B=1, T=40, S=40, N=2, K=2, causal=False),
    "causal_decode_mqa": dict(B=1, T=19, S=45, N=4, K=1, causal=True),
    "cross_gqa2": dict(B=2, T=24, S=50, N=4, K=2, causal=False),
    "causal_segments_gqa4": dict(B=2, T=40, S=40, N=4, K=1, causal=True, segments="docs"),
    "segment_pair_empty_rows": dict(B=1, T=24, S=33, N=2, K=1, causal=False, segments="pair"),
    "window_causal": dict(B=1, T=45, S=45, N=4, K=2, causal=True, window=9),
    "window_bidir_segments": dict(
        B=1, T=33, S=33, N=2, K=1, causal=False, window=7, segments="docs"
    ),
    "bf16_causal_gqa2": dict(B=1, T=40, S=40, N=4, K=2, causal=True, dtype="bfloat16"),
    # Between 64 and 128, no power of two: Pallas GPU's default blocks must fit (77 -> 128).
    "causal_gqa2_t77": dict(B=1, T=77, S=77, N=2, K=1, causal=True),
}


def make_inputs(B, T, S, N, K, H=16, dtype="float32", segments=None, seed=0, **_):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q, k, v, do = (
        jnp.asarray(rng.standard_normal(shape, np.float32), dt)
        for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))
    )
    seg = None
    if segments == "docs":  # several packed documents per row, different per batch element
        assert T == S
        cuts = [
            np.sort(np.random.default_rng(b).choice(np.arange(1, T), 3, replace=False))
            for b in range(B)
        ]
        seg = jnp.asarray(
            np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts]), jnp.int32
        )
    elif segments == "pair":  # q ids 0..3, kv ids 0..2: queries with id 3 see nothing -> zeros
        seg = (
            jnp.asarray(np.arange(T)[None] * 4 // T, jnp.int32).repeat(B, 0),
            jnp.asarray(np.arange(S)[None] * 3 // S, jnp.int32).repeat(B, 0),
        )
    return q, k, v, do, seg


def fwd_and_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of ``fn`` under one jit, for the cotangent ``do``."""

    def f(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))

    return jax.jit(f)(q, k, v, do)


class AttentionTestBase:
    backend: str = "reference"
    interpret: bool = False
    block_sizes = None  # BlockSizes passed to the backend directly when set
    cases: tuple[str, ...] | None = None  # None = all of CASES
    slow_cases: tuple[str, ...] = ()  # more cases, run only with -m slow

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            names = list(CASES) if self.cases is None else list(self.cases)
            params = [pytest.param(n, id=n) for n in names]
            params += [
                pytest.param(n, id=n, marks=pytest.mark.slow)
                for n in self.slow_cases
                if n not in names
            ]
            metafunc.parametrize("case", params)

    def attention(self, q, k, v, **kw):
        if self.block_sizes is None:
            return public_attention(q, k, v, backend=self.backend, interpret=self.interpret, **kw)
        return BACKENDS[self.backend].fn(
            q, k, v, interpret=self.interpret, block_sizes=self.block_sizes, **kw
        )

    def test_matches_reference(self, case):
        c = CASES[case]
        q, k, v, do, seg = make_inputs(**c)
        kw = dict(causal=c["causal"], segment_ids=seg, sliding_window=c.get("window"))
        want = fwd_and_grads(lambda q, k, v: reference.attention(q, k, v, **kw), q, k, v, do)
        got = fwd_and_grads(lambda q, k, v: self.attention(q, k, v, **kw), q, k, v, do)
        bf16 = c.get("dtype") == "bfloat16"
        if bf16:  # compare against the float32 reference of the same (rounded) inputs
            f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
            want = fwd_and_grads(
                lambda q, k, v: reference.attention(q, k, v, **kw), *f32[:3], f32[3]
            )
        for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
            assert g.shape == w.shape and g.dtype == (jnp.bfloat16 if bf16 else jnp.float32), name
            w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
            err = np.max(np.abs(w - g)) / max(1.0, np.max(np.abs(w)))
            assert err <= (2e-2 if bf16 else 1e-5), (
                f"{self.backend} {case} {name}: relative error {err:.2e}"
            )
        if c.get("segments") == "pair":  # queries whose id no key has return exact zeros
            empty = np.asarray(seg[0] == 3)
            assert empty.any() and np.all(np.asarray(got[0], np.float32)[empty] == 0)
