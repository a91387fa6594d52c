"""Hybrid stacks (``model.pattern``: attention "a" and state-space "m" layers, with MoE): scanned
= unrolled, decoding through each layer's own cache (KV or conv + SSM state) equals the full
pass with left-padded prompts, packed documents do not see each other, the program does not grow
with depth, the decode cache of an SSM layer does not grow with the context, FLOPs by formula,
and pattern errors name the field."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen import planner
from mlgen.config import ConfigError, load
from mlgen.models.transformer import Transformer, TransformerConfig, transformer_flops_per_token
from mlgen.nn.ssm import SSMState
from mlgen.samplers.lm import generate

BASE = dict(
    vocab_size=64,
    num_layers=4,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    ssm_head_dim=16,
    ssm_state=8,
    ssm_chunk=4,
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)))

VARIANTS = {
    "mamba2": dict(pattern="m", ssm_mlp=False, num_layers=2),  # a Mamba-2 LM: mixer layers only
    "mamba": dict(pattern="m", ssm="mamba"),
    "jamba": dict(pattern="mmam", ssm="mamba", moe_every=2, num_experts=4, rope_theta=0.0),
    "nvidia": dict(pattern="mmma", ssm_groups=2),  # a stacked run of three SSM layers
    # Infini-attention in the attention layers (segments of 4: the memory path is exercised)
    "infini": dict(pattern="ma", infini_segment=4, infini_delta=True),
}


def _model(**kw) -> Transformer:
    return Transformer(TransformerConfig(**{**BASE, **kw}), rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, kw):
    return nnx.merge(graphdef, state)(tokens, **kw)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, positions, cache):
    return nnx.merge(graphdef, state).decode(tokens, positions, cache)


def _forward(model, tokens, **kw):
    """``model(tokens, **kw)`` compiled (eager NNX runs op by op: slow on 2 cores), once per
    model config and shapes: equal graphdefs share the compiled program across tests."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, tokens, kw)


@pytest.mark.parametrize("name", ["mamba2", "jamba", "nvidia", "infini"])
def test_scanned_equals_unrolled_and_decoding_equals_the_full_pass(name):
    model = _model(**VARIANTS[name])
    full = _forward(model, TOKENS)
    unrolled = Transformer(dataclasses.replace(model.cfg, scan_layers=False), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_forward(unrolled, TOKENS), full, atol=1e-5)

    # A prompt of 5, then one token at a time, row 1 left-padded by 3 (negative positions).
    pad = 3
    tokens = jnp.concatenate([jnp.zeros((2, pad), TOKENS.dtype), TOKENS], 1)
    positions = jnp.stack([jnp.arange(pad, pad + 14), jnp.arange(14) - pad])
    tokens = tokens.at[0].set(jnp.concatenate([TOKENS[0], jnp.zeros(pad, TOKENS.dtype)]))
    positions = positions.at[0].set(jnp.arange(14))  # row 0 unpadded: its first 11 tokens
    graphdef, state = nnx.split(model)
    decode = functools.partial(_decode, graphdef)
    cache = model.init_cache(2, 16)
    kinds = {type(c).__name__ for c in cache}
    attention = "InfiniCache" if model.cfg.infini_segment else "KVCache"
    assert ("SSMState" in kinds) and ((attention in kinds) == ("a" in model.cfg.pattern))
    want = full
    logits, cache = decode(state, tokens[:, : pad + 5], positions[:, : pad + 5], cache)
    got0, got1 = [], []
    for t in range(pad + 5, 14):
        got0.append(logits[0])
        got1.append(logits[1])
        logits, cache = decode(state, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
    # row 0's step t predicts after token t-1 of its 11; row 1's after token t-1-pad.
    for k, t in enumerate(range(pad + 5, 14)):
        if t - 1 < 11:
            np.testing.assert_allclose(got0[k], want[0][t - 1], atol=2e-5)
        np.testing.assert_allclose(got1[k], want[1][t - 1 - pad], atol=2e-5)


def test_the_sampler_decodes_a_hybrid_greedily():
    model = _model(**VARIANTS["jamba"])
    prompts = [list(map(int, TOKENS[0, :5])), list(map(int, TOKENS[1, :3]))]
    out = generate(model, prompts, max_new_tokens=4, eos_id=-1)
    # Both rows in one causal pass, right-padded with zeros to TOKENS' shape (one compiled
    # program, shared with the full pass above): the padding is after every position read.
    rows = [p + c for p, c in zip(prompts, out.completions(), strict=True)]
    full = np.asarray(_forward(model, jnp.asarray([r + [0] * (11 - len(r)) for r in rows])))
    for i, (prompt, completion) in enumerate(zip(prompts, out.completions(), strict=True)):
        n = len(prompt)
        assert completion == [int(t) for t in full[i, n - 1 : n + 3].argmax(-1)]


@pytest.mark.parametrize("name", ["mamba2", "jamba"])
def test_packed_documents_do_not_see_each_other(name):
    """Two documents in one packed row (segment ids 1, 2): the second's logits equal its own
    forward pass from position 0 (the SSM state and the conv restart at the boundary)."""
    model = _model(**VARIANTS[name])
    row = TOKENS[:1]
    seg = jnp.asarray([[1] * 6 + [2] * 5])
    pos = jnp.asarray([list(range(6)) + list(range(5))])
    packed = _forward(model, row, positions=pos, segment_ids=seg)
    # Each document alone from position 0, both in one (causal) pass: the second right-padded.
    alone = jnp.concatenate([row[:, :6], jnp.pad(row[:, 6:], ((0, 0), (0, 1)))])
    first, second = _forward(model, alone)
    np.testing.assert_allclose(packed[0, :6], first, atol=2e-5)
    np.testing.assert_allclose(packed[0, 6:], second[:5], atol=2e-5)


def test_the_program_does_not_grow_with_depth():
    def ops(layers):
        m = _model(pattern="mmam", ssm="mamba", moe_every=2, num_experts=4, num_layers=layers)
        graphdef, state = nnx.split(m)
        text = jax.jit(lambda s: nnx.merge(graphdef, s)(TOKENS)).lower(state).as_text()
        return text.count(" = ")

    assert ops(4) == ops(8)


def test_gradients_flow_through_every_ssm_parameter():
    model = _model(**{**VARIANTS["nvidia"], "num_layers": 2, "pattern": "m"})
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(TOKENS) ** 2)

    grads = jax.tree.leaves_with_path(jax.jit(jax.grad(loss))(params))
    ssm = [(jax.tree_util.keystr(k), g) for k, g in grads if "ssm" in jax.tree_util.keystr(k)]
    assert len(ssm) == 17  # ssm_norm; z, x, b, c, dt, o; 3 convs + 3 biases; dt_bias, a, d, norm
    for name, g in ssm:
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, name


def test_decode_cache_of_ssm_layers_does_not_grow_with_the_context():
    tiny = load("configs/lm/tiny.py")

    def cache(context, **kw):
        model = TransformerConfig(**{**BASE, "vocab_size": 256, **kw})
        cfg = dataclasses.replace(tiny, model=model)
        return planner.decode_cache(cfg, context=context)

    short, long = cache(1024, pattern="mmma"), cache(32768, pattern="mmma")
    ssm = "ssm (conv + state)"
    assert short.layers == {ssm: 3, "attention (KV)": 1}
    assert short.by_kind[ssm] == long.by_kind[ssm]
    # conv (3 past inputs of x, b, c) + state [N=4, H=16, S=8], float32, one sequence
    assert short.by_kind[ssm] == 3 * 4 * (3 * (64 + 8 + 8) + 4 * 16 * 8)
    # K and V [2 kv heads, context, 8] float32 + the kv ids + the write index
    assert long.by_kind["attention (KV)"] == 32768 * (2 * 2 * 8 * 4 + 4) + 4
    assert cache(1024, pattern="m").layers == {ssm: 4}


def test_flops_count_ssm_layers_by_formula():
    dense = TransformerConfig(**BASE)
    hybrid = TransformerConfig(**{**BASE, "pattern": "mmma"})
    T, D, N, H = 64, 32, 4, 8
    C, S, Nh = 64, 8, 4  # inner width, states, SSM heads (64 / 16)
    attn_w, mlp_w = D * H * (2 * N + 2 * 2), 3 * D * 64
    ssm_w = D * (2 * C + 2 * S + Nh) + C * D
    ssm_fwd = 2 * 4 * (S + C) + 4 * C * S  # chunk 4, one group
    want = 6 * (attn_w + 4 * mlp_w + 3 * ssm_w + D * 64) + 6 * T * N * H + 3 * 3 * ssm_fwd
    assert transformer_flops_per_token(hybrid, T) == pytest.approx(want)
    # Doubling T adds the attention layer's quadratic term only: the SSM layers' cost is linear.
    grow = transformer_flops_per_token(hybrid, 2 * T) - transformer_flops_per_token(hybrid, T)
    assert grow == pytest.approx(6 * T * N * H)
    assert transformer_flops_per_token(dense, 2 * T) - transformer_flops_per_token(
        dense, T
    ) == pytest.approx(4 * 6 * T * N * H)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(pattern="max"), "pattern"),
        (dict(pattern=""), "pattern"),
        (dict(pattern="mma"), "pattern"),  # 3 does not divide 4 layers
        (dict(pattern="ma", moe_every=3), "moe_every"),  # 3 does not divide 4 layers
        (dict(pattern="m", ssm="s4"), "ssm"),
        (dict(pattern="m", ssm_head_dim=24), "ssm_head_dim"),
        (dict(pattern="m", ssm_groups=3), "ssm_groups"),
        (dict(pattern="m", ssm_chunk=0), "ssm_chunk"),
        (dict(pattern="m", flavour="gpt2", max_len=16, num_kv_heads=4), "pattern"),
        (dict(pattern="am", moe_every=2, ssm_mlp=False, num_experts=4), "moe_every"),
        (dict(infini_segment=-1), "infini_segment"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    cfg = TransformerConfig(**{**BASE, **kw})
    with pytest.raises(ConfigError, match=f"^{field}: "):
        cfg.validate()


def test_ssm_state_is_a_plain_pytree():
    state = _model(**VARIANTS["mamba"]).init_cache(3, 8)[0]
    assert isinstance(state, SSMState)
    repeated = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), state)  # as best-of-N does
    assert repeated.ssm.shape[0] == 6 and repeated.conv[0].shape[0] == 6


def test_sequence_parallel_step_equals_the_data_parallel_one(tmp_path):
    """One train step of a tiny hybrid LM (Mamba-2 + attention, packed rows) on data=8 and on
    data=2 x seq=4: the SSM layers scan each device's quarter of every row and pass their states
    across the seq axis (mlgen.ops.ssm_parallel), attention is ring attention; the same loss,
    gradient norm and updated parameters."""
    import mlgen
    from mlgen.config import MeshConfig
    from mlgen.convert.layout import flatten
    from mlgen.ops.attention import AttentionConfig
    from tests.helpers import replace, tiny_lm_config

    def run(name, mesh, backend):
        cfg = tiny_lm_config(
            str(tmp_path / name),
            mesh=mesh,
            num_layers=2,
            d_model=32,
            pattern="ma",
            ssm_head_dim=16,
            ssm_state=8,
            ssm_chunk=4,
            attention=AttentionConfig(backend=backend),
        )
        # eval_steps=0: no eval program to compile (the test reads the train step only)
        t = replace(cfg.train, num_steps=1, log_every=1, eval_every=0, eval_steps=0)
        return mlgen.train(replace(cfg, train=t))

    results = [
        run("dp", MeshConfig(data=-1), "reference"),
        run("sp", MeshConfig(data=2, seq=4), "ring"),
    ]
    (a, b) = [r.final_metrics for r in results]
    for k in ("loss", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    pa, pb = (flatten(jax.tree.map(np.asarray, r.state["params"])) for r in results)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)
