"""LoRA through the one train step: only the adapters train (the base is bitwise unchanged and
has no optimizer state), a LoRA run resumes from its checkpoint, and ``mlgen convert
merge-lora`` writes a plain run that computes the same logits."""

import jax
import numpy as np
import pytest

import mlgen
from mlgen import runs
from mlgen.cli import main as cli_main
from mlgen.convert.layout import ConvertError, flatten
from mlgen.convert.run import merge_lora_run
from mlgen.models.transformer import transformer_flops_per_token
from mlgen.nn.core import is_adapter
from mlgen.train import trainer
from tests.helpers import replace, tiny_lm_config


def _lora_config(workdir, **train):
    cfg = tiny_lm_config(str(workdir), num_layers=2)
    model = replace(cfg.model, lora_rank=4, lora_alpha=8.0, lora_targets="q,v,mlp")
    t = dict(num_steps=4, eval_every=0, checkpoint_every=2, log_every=2)
    t.update(train)
    return replace(cfg, model=model, train=replace(cfg.train, **t))


def _host(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten(jax.tree.map(np.asarray, tree)).items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run trained 2 steps, then resumed to 4; its step-0 parameters (read from the
    first run's own setup before it trains: one random init fewer than a separate setup)."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    cfg = _lora_config(workdir)
    s = runs.setup(replace(cfg, train=replace(cfg.train, num_steps=2)))
    initial = _host(s.state["params"])  # host copies: fit donates the state
    first = trainer.fit(s)
    result = mlgen.train(cfg)
    return cfg, initial, first, result


def test_only_adapters_train_and_the_base_has_no_optimizer_state(lora_run):
    cfg, initial, first, result = lora_run
    final = _host(result.state["params"])
    assert sorted(final) == sorted(initial)
    adapters = [k for k in final if is_adapter(k)]
    assert len(adapters) == 2 * 5  # lora_a + lora_b on q, v, gate, up, down (stacked layers)
    for k in final:
        if is_adapter(k):
            if k.endswith("lora_b"):  # zero at init, trained since
                assert not np.array_equal(final[k], initial[k]), k
        else:
            assert np.array_equal(final[k], initial[k]), k  # frozen: bit for bit

    # Adam's two moments exist for the adapters alone: their size, not the model's.
    moments = [x for x in jax.tree.leaves(result.state["opt_state"]) if np.ndim(x) > 0]
    adapter_size = sum(final[k].size for k in adapters)
    assert sum(m.size for m in moments) == 2 * adapter_size
    assert adapter_size < 0.2 * sum(v.size for v in final.values())
    # The 2-step run was resumed (not restarted), and its loss moved.
    assert [h["step"] for h in first.history] == [2]
    assert [h["step"] for h in result.history] == [4]
    assert result.final_metrics["grad_norm"] > 0


def test_merge_lora_gives_a_plain_run_with_the_same_logits(lora_run, tmp_path, capsys):
    cfg, *_ = lora_run
    dst = tmp_path / "merged"
    assert cli_main(["convert", "merge-lora", cfg.workdir, str(dst)]) == 0
    assert "lora_rank=0" in capsys.readouterr().out
    merged = runs.restore(str(dst))
    assert merged.config.model.lora_rank == 0
    assert not any(is_adapter(k) for k in flatten(merged.state["params"]))
    assert int(merged.state["step"]) == 0

    tokens = np.arange(2 * 24).reshape(2, 24) % 256
    lora = runs.restore(cfg.workdir)
    want = np.asarray(lora.model(ema=False)(tokens))
    got = np.asarray(merged.model()(tokens))
    np.testing.assert_allclose(got, want, atol=1e-5)

    with pytest.raises(ConvertError, match="^model.lora_rank: the run in .* has 0") as err:
        merge_lora_run(str(dst), str(tmp_path / "again"))
    assert "\n" not in str(err.value)


def test_lora_flops_count_the_frozen_base_without_its_weight_gradient():
    cfg = _lora_config("/tmp/unused").model
    full = transformer_flops_per_token(replace(cfg, lora_rank=0), 32)
    D, F, H = cfg.d_model, cfg.hidden, cfg.head_size
    q, v = D * cfg.num_heads * H, D * cfg.kv_heads * H
    weights = cfg.num_layers * (2 * q + 2 * v + 3 * D * F) + D * cfg.vocab_size
    attention = full - 6 * weights
    r = cfg.lora_rank
    adapters = cfg.num_layers * r * ((D + cfg.num_heads * H) + (D + cfg.kv_heads * H) + 3 * (D + F))
    assert transformer_flops_per_token(cfg, 32) == pytest.approx(
        4 * weights + 6 * adapters + attention
    )
