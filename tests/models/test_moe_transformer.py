"""The transformer with MoE layers (``moe_every``): scanned = unrolled, KV-cache decoding equals
the full forward pass, the program does not grow with depth, the router losses reach the LM
loss, active-parameter FLOPs, and the config errors name the field."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen.config import ConfigError
from mlgen.models.transformer import Transformer, TransformerConfig, transformer_flops_per_token
from mlgen.objectives.lm import make_loss
from mlgen.samplers.lm import generate
from tests.helpers import random_lm_batch

BASE = dict(vocab_size=64, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))


def _model(**kw) -> Transformer:
    return Transformer(TransformerConfig(**{**BASE, "num_experts": 4, **kw}), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("every", [1, 2])
def test_scanned_equals_unrolled_and_decoding_equals_the_full_pass(every):
    model = _model(moe_every=every)
    logits, aux = model(TOKENS, return_aux=True)
    assert set(aux) == {
        "loss", "lb_loss", "z_loss", "dropped_fraction", "expert_load_max", "expert_load_min"
    }  # fmt: skip
    assert float(aux["dropped_fraction"]) == 0.0  # dropless
    assert float(aux["expert_load_min"]) <= 1.0 <= float(aux["expert_load_max"])
    unrolled = Transformer(dataclasses.replace(model.cfg, scan_layers=False), rngs=nnx.Rngs(0))
    logits2, aux2 = unrolled(TOKENS, return_aux=True)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=1e-5)
    for k in aux:
        np.testing.assert_allclose(float(aux2[k]), float(aux[k]), rtol=1e-5, err_msg=k)

    # The per-layer decode loop through each layer's own KV cache: the full pass's logits.
    cache = model.init_cache(2, 16)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    last, _ = model.decode(TOKENS, positions, cache)
    np.testing.assert_allclose(np.asarray(last), np.asarray(logits[:, -1]), atol=1e-5)
    # and the sampler runs it unchanged (greedy: each new token is the full pass's argmax).
    out = generate(model, [list(map(int, TOKENS[0, :5]))], max_new_tokens=4, eos_id=-1)
    seq = list(map(int, TOKENS[0, :5])) + out.completions()[0]
    full = np.asarray(model(jnp.asarray([seq])))
    assert out.completions()[0] == [int(t) for t in full[0, 4:8].argmax(-1)]


def test_the_program_does_not_grow_with_depth():
    def ops(layers):
        m = _model(moe_every=2, num_layers=layers)
        graphdef, state = nnx.split(m)
        text = jax.jit(lambda s: nnx.merge(graphdef, s)(TOKENS)).lower(state).as_text()
        return text.count(" = ")

    assert ops(8) == ops(4)


def test_router_losses_join_the_lm_loss_and_are_logged():
    model = _model(moe_every=1)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {k: jnp.asarray(v) for k, v in random_lm_batch(2, 12, 64).items()}
    loss, (metrics, _) = make_loss(graphdef, train=False)(nnx.to_pure_dict(params), {}, batch, None)
    _, aux = model(batch["inputs"], return_aux=True)
    np.testing.assert_allclose(float(loss), float(metrics["ce"]) + float(aux["loss"]), rtol=1e-6)
    assert float(metrics["moe_lb_loss"]) == pytest.approx(float(aux["lb_loss"]))
    assert float(aux["loss"]) == pytest.approx(
        0.01 * float(aux["lb_loss"]) + 0.001 * float(aux["z_loss"])
    )
    # A dense model's loss is its cross entropy alone, no moe_* metrics.
    dense = Transformer(TransformerConfig(**BASE), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(dense, nnx.Param)
    loss, (metrics, _) = make_loss(graphdef, train=False)(nnx.to_pure_dict(params), {}, batch, None)
    assert float(loss) == float(metrics["ce"]) and not any(k.startswith("moe_") for k in metrics)


def test_flops_count_active_parameters():
    dense = TransformerConfig(**BASE)
    moe = TransformerConfig(**BASE, moe_every=2, num_experts=8, experts_per_token=2, moe_mlp_dim=32)
    D, F, Fe = 32, 64, 32
    # Two of four layers swap a 3*D*F MLP for a router D*E plus 2 active experts of 3*D*Fe.
    want = transformer_flops_per_token(dense, 16) + 6 * 2 * (D * 8 + 2 * 3 * D * Fe - 3 * D * F)
    assert transformer_flops_per_token(moe, 16) == pytest.approx(want)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(moe_every=3), "moe_every"),  # does not divide 4 layers
        (dict(moe_every=1, flavour="gpt2", max_len=16, num_kv_heads=4), "moe_every"),
        (dict(moe_every=1, num_experts=4, experts_per_token=5), "experts_per_token"),
        (dict(moe_every=1, moe_score="relu"), "moe_score"),
        (dict(moe_every=1, moe_capacity_factor=0.0), "moe_capacity_factor"),
        (dict(moe_every=1, lora_rank=4, lora_targets="mlp"), "lora_targets"),
    ],
)
def test_bad_moe_fields_are_one_line_naming_the_field(fields, field):
    with pytest.raises(ConfigError) as err:
        TransformerConfig(**{**BASE, **fields}).validate()
    assert str(err.value).startswith(f"{field}:") and "\n" not in str(err.value)


def _tiny_moe_run(workdir, mesh):
    from tests.helpers import replace, tiny_lm_config

    cfg = tiny_lm_config(str(workdir), mesh=mesh, num_layers=2, d_model=32)
    model = replace(cfg.model, moe_every=1, num_experts=4, experts_per_token=2, mlp_dim=32)
    t = replace(cfg.train, num_steps=1, log_every=1, eval_every=0, checkpoint_every=1)
    return replace(cfg, model=model, train=t)


def test_expert_parallel_step_equals_the_data_parallel_one(tmp_path):
    """One train step of a tiny MoE LM on data=8 and on data=2 x expert=4 (experts sharded,
    tokens exchanged all-to-all): the same loss, gradient norm and updated parameters."""
    import mlgen
    from mlgen.config import MeshConfig
    from mlgen.convert.layout import flatten

    results = [
        mlgen.train(_tiny_moe_run(tmp_path / name, mesh))
        for name, mesh in (("dp", MeshConfig(data=-1)), ("ep", MeshConfig(data=-1, expert=4)))
    ]
    (a, b) = [r.final_metrics for r in results]
    for k in ("loss", "grad_norm", "moe_lb_loss", "moe_z_loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    pa, pb = (flatten(jax.tree.map(np.asarray, r.state["params"])) for r in results)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)
    gate = results[1].state["params"]["blocks"]["moe"]["gate"]  # [L, E, D, F], E over expert
    assert gate.sharding.shard_shape(gate.shape)[1] == 1


def test_experts_not_divisible_by_the_expert_axis_is_one_line(tmp_path):
    from mlgen.config import MeshConfig
    from tests.helpers import replace

    cfg = _tiny_moe_run(tmp_path / "x", MeshConfig(data=-1, expert=4))
    cfg = replace(cfg, model=replace(cfg.model, num_experts=6))
    with pytest.raises(ConfigError, match=r"^model\.num_experts: 6 is not divisible by the 4 "):
        cfg.validate(8)
