"""mlgen.ops.ssm: chunked SSD = selective-scan reference = step-by-step recurrence.

Values and gradients in float32, lengths that are not a multiple of the chunk, an initial state,
grouped b/c, document resets (packed rows) and the causal conv with its carried state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlgen.ops import ssm

TOL = dict(rtol=2e-5, atol=2e-5)


def _ssd_inputs(B=2, T=37, N=4, H=3, R=2, S=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 7)
    return dict(
        x=jax.random.normal(k[0], (B, T, N, H)),
        dt=jax.nn.softplus(jax.random.normal(k[1], (B, T, N))),
        a=-jnp.exp(jax.random.normal(k[2], (N,))),
        b=jax.random.normal(k[3], (B, T, R, S)),
        c=jax.random.normal(k[4], (B, T, R, S)),
        d=jax.random.normal(k[5], (N,)),
    ), jax.random.normal(k[6], (B, N, H, S))


def _sel_inputs(B=2, T=37, C=6, S=5, seed=1):
    k = jax.random.split(jax.random.key(seed), 7)
    return dict(
        x=jax.random.normal(k[0], (B, T, C)),
        dt=jax.nn.softplus(jax.random.normal(k[1], (B, T, C))),
        a=-jnp.exp(jax.random.normal(k[2], (C, S))),
        b=jax.random.normal(k[3], (B, T, S)),
        c=jax.random.normal(k[4], (B, T, S)),
        d=jax.random.normal(k[5], (C,)),
    ), jax.random.normal(k[6], (B, C, S))


def _close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


def _loss(fn):
    """A scalar of every output (y and the final state), so gradients reach every input."""

    def f(inputs, h0):
        y, h = fn(**inputs, initial_state=h0)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(h**2)

    return f


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
def test_ssd_chunked_equals_the_recurrence(chunk):
    inputs, h0 = _ssd_inputs()
    want = ssm.ssd_reference(**inputs, initial_state=h0)
    _close(ssm.ssd(**inputs, chunk=chunk, initial_state=h0), want)


def test_ssd_gradients_equal_the_recurrence():
    inputs, h0 = _ssd_inputs(T=21)
    ref = jax.grad(_loss(ssm.ssd_reference), argnums=(0, 1))(inputs, h0)
    got = jax.grad(_loss(lambda **kw: ssm.ssd(**kw, chunk=8)), argnums=(0, 1))(inputs, h0)
    _close(got, ref)


def test_ssd_with_one_head_per_channel_is_the_selective_scan():
    """SSD with H = 1 per head and one state decay per head is Mamba's scan with a [C, S] decay
    that is constant over S: the two references agree, so they check each other."""
    inputs, h0 = _ssd_inputs(N=6, H=1, R=1)
    y, h = ssm.ssd_reference(**inputs, initial_state=h0)
    sel = dict(
        x=inputs["x"][..., 0],
        dt=inputs["dt"],
        a=jnp.broadcast_to(inputs["a"][:, None], (6, 5)),
        b=inputs["b"][:, :, 0],
        c=inputs["c"][:, :, 0],
        d=inputs["d"],
    )
    ys, hs = ssm.selective_scan_reference(**sel, initial_state=h0[:, :, 0])
    _close((y[..., 0], h[:, :, 0]), (ys, hs))


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_selective_scan_chunked_equals_the_recurrence(chunk):
    inputs, h0 = _sel_inputs()
    want = ssm.selective_scan_reference(**inputs, initial_state=h0)
    _close(ssm.selective_scan(**inputs, chunk=chunk, initial_state=h0), want)


def test_selective_scan_gradients_equal_the_recurrence():
    inputs, h0 = _sel_inputs(T=19)
    ref = jax.grad(_loss(ssm.selective_scan_reference), argnums=(0, 1))(inputs, h0)
    got = jax.grad(_loss(lambda **kw: ssm.selective_scan(**kw, chunk=8)), argnums=(0, 1))(
        inputs, h0
    )
    _close(got, ref)


def _split_rows(inputs, cut):
    per_token = [k for k in inputs if k not in ("a", "d")]
    return {k: inputs[k][:, :cut] for k in per_token}, {k: inputs[k][:, cut:] for k in per_token}


@pytest.mark.parametrize(
    "op,make,chunk",
    [
        (ssm.ssd, _ssd_inputs, 8),
        (ssm.ssd_reference, _ssd_inputs, None),
        (ssm.selective_scan, _sel_inputs, 8),
        (ssm.selective_scan_reference, _sel_inputs, None),
    ],
)
def test_reset_starts_a_document_from_zero(op, make, chunk):
    """A reset at token 13 (inside a chunk of 8): the tokens after it equal running the second
    document alone from a zero state; the tokens before it are unchanged."""
    inputs, h0 = make(T=30)
    kw = {} if chunk is None else dict(chunk=chunk)
    reset = jnp.zeros((2, 30), bool).at[:, 13].set(True)
    y, h = op(**inputs, initial_state=h0, reset=reset, **kw)
    first, second = _split_rows(inputs, 13)
    shared = dict(a=inputs["a"], d=inputs["d"])
    y1, _ = op(**first, **shared, initial_state=h0, **kw)
    y2, h2 = op(**second, **shared, **kw)
    _close((y[:, :13], y[:, 13:], h), (y1, y2, h2))


def test_step_by_step_decoding_continues_a_chunked_prefix():
    """A prompt through the chunked op, then tokens one at a time from its final state."""
    inputs, _ = _ssd_inputs(T=20)
    y_full, h_full = ssm.ssd(**inputs, chunk=8)
    y, h = ssm.ssd(**{k: v[:, :12] if v.ndim > 1 else v for k, v in inputs.items()}, chunk=8)
    outs = [y]
    for t in range(12, 20):
        yt, h = ssm.ssd_step(
            h, *(inputs[k][:, t] for k in ("x", "dt")), inputs["a"],
            inputs["b"][:, t], inputs["c"][:, t], inputs["d"],
        )  # fmt: skip
        outs.append(yt[:, None])
    _close((jnp.concatenate(outs, 1), h), (y_full, h_full))


def test_padding_with_zero_dt_and_x_leaves_the_state_unchanged():
    inputs, h0 = _ssd_inputs(T=9)
    padded = {
        k: jnp.concatenate([jnp.zeros_like(v[:, :4]), v], 1) if v.ndim > 1 else v
        for k, v in inputs.items()
    }
    padded["dt"] = padded["dt"].at[:, :4].set(0.0)
    y, h = ssm.ssd(**padded, chunk=4, initial_state=h0)
    want = ssm.ssd(**inputs, chunk=4, initial_state=h0)
    _close((y[:, 4:], h), want)


def test_causal_conv1d():
    """Against numpy's full convolution, split with a carried state, and with packed documents."""
    k1, k2 = jax.random.split(jax.random.key(3))
    x = jax.random.normal(k1, (2, 11, 5))
    w = jax.random.normal(k2, (4, 5))
    bias = jnp.arange(5.0)
    y, state = ssm.causal_conv1d(x, w, bias)
    xs, ws = np.asarray(x), np.asarray(w)
    want = np.zeros((2, 11, 5)) + np.arange(5.0)
    for b in range(2):
        for ch in range(5):
            want[b, :, ch] += np.convolve(xs[b, :, ch], ws[::-1, ch])[:11]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state, x[:, -3:])
    y1, s1 = ssm.causal_conv1d(x[:, :6], w, bias)
    y2, _ = ssm.causal_conv1d(x[:, 6:], w, bias, s1)
    _close(jnp.concatenate([y1, y2], 1), y)
    seg = jnp.array([[1] * 6 + [2] * 5, [1] * 11])
    yp, _ = ssm.causal_conv1d(x, w, bias, segment_ids=seg)
    alone, _ = ssm.causal_conv1d(x[:1, 6:], w, bias)
    _close((yp[0, 6:], yp[0, :6], yp[1]), (alone[0], y[0, :6], y[1]))


def test_bad_arguments_are_one_line_errors():
    inputs, h0 = _ssd_inputs()
    with pytest.raises(ValueError, match="chunk"):
        ssm.ssd(**inputs, chunk=0)
    with pytest.raises(ValueError, match="initial_state"):
        ssm.ssd(**inputs, initial_state=h0[:, :2])
    bad = dict(inputs, b=inputs["b"][:, :, :1].repeat(3, 2), c=inputs["c"][:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="groups"):
        ssm.ssd(**bad)
