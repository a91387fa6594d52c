"""``init_from=HF_DIR``: a new run's parameters are ``import_hf``'s, bitwise, in its shards."""
# ruff: noqa: E402  (torch through importorskip before the imports that need it)

import jax
import numpy as np
import pytest
from flax import nnx

from tests.convert import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)
from transformers import LlamaConfig, LlamaForCausalLM

import mlgen
from mlgen import init_from, runs
from mlgen.config import ConfigError
from mlgen.convert import import_hf, layout
from mlgen.convert.reader import read_config
from mlgen.convert.run import export_run
from tests.helpers import replace, tiny_lm_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (vocab 256: the byte tokenizer's) saved as safetensors."""
    path = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    with torch.no_grad():  # random weights, the norms' scales kept at 1 (a model LoRA can adapt)
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.copy_(0.08 * torch.randn_like(p))
    hf.save_pretrained(path, safe_serialization=True)
    return path


def _config(llama_dir, workdir):
    _, model = layout.to_mlgen(read_config(str(llama_dir)))
    cfg = tiny_lm_config(str(workdir))
    model = replace(model, attention=cfg.model.attention)
    return replace(cfg, model=model, init_from=str(llama_dir))


def test_params_are_import_hf_s_bitwise_in_the_run_s_shards_at_step_0(llama_dir, tmp_path):
    cfg = _config(llama_dir, tmp_path / "ft")
    kind = init_from.check_source(cfg)
    assert kind == init_from.HF
    s = runs.setup(cfg)
    state = init_from.initial_state(s, kind)
    _, model = import_hf(llama_dir)
    want = layout.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    got = layout.flatten(state["params"])
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(np.asarray(got[k]), want[k]), k
    # Sharded as the run's own state (fsdp over 8 devices), not one device.
    for k, v in got.items():
        assert v.sharding == layout.flatten(s.state_shardings["params"])[k], k
    assert int(state["step"]) == 0
    assert all(not np.asarray(m).any() for m in jax.tree.leaves(state["opt_state"]))


def test_hf_model_mismatch_names_the_field(llama_dir, tmp_path):
    cfg = _config(llama_dir, tmp_path / "ft")
    cfg = replace(cfg, model=replace(cfg.model, num_kv_heads=4))
    with pytest.raises(
        ConfigError, match=rf"^model.num_kv_heads: init_from {llama_dir} has 2, the config has 4$"
    ):
        mlgen.train(cfg)


def _held_out_loss(model, tokens: np.ndarray) -> float:
    logits = np.asarray(model(tokens[:, :-1]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, tokens[:, 1:, None], -1).mean())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_imported_model_fine_tunes_and_its_loss_falls(llama_dir, tmp_path, lora):
    """Fine-tuning from the Hugging Face directory, all weights or LoRA adapters only (then
    exported: transformers computes the adapted model's logits, the adapters folded in)."""
    cfg = _config(llama_dir, tmp_path / "ft")
    if lora:
        cfg = replace(cfg, model=replace(cfg.model, lora_rank=8, lora_targets="all"))
    lr = 2e-2 if lora else 1e-2
    cfg = replace(
        cfg,
        optim=replace(cfg.optim, lr=lr, warmup_steps=1),
        train=replace(cfg.train, num_steps=12, eval_every=0, checkpoint_every=12, log_every=12),
    )
    text = open(np.__file__, "rb").read()[: 4 * 65]  # numpy's source: not in the training docs
    held = np.frombuffer(text, np.uint8).astype(np.int32).reshape(4, 65)
    _, imported = import_hf(llama_dir)
    before = _held_out_loss(imported, held)
    result = mlgen.train(cfg)
    after = _held_out_loss(result.model(ema=False), held)
    assert after < before - 0.1, (before, after)

    got = layout.flatten(result.state["params"])
    want = layout.flatten(nnx.to_pure_dict(nnx.state(imported, nnx.Param)))
    frozen = all(np.array_equal(np.asarray(got[k]), want[k]) for k in want)
    assert frozen == lora  # LoRA: every imported weight bit for bit; full: they moved
    if not lora:
        return
    dst = tmp_path / "hf-out"
    export_run(cfg.workdir, str(dst), ema=False)
    back = LlamaForCausalLM.from_pretrained(dst).eval()
    with torch.no_grad():
        theirs = back(torch.tensor(held)).logits.numpy()
    ours = np.asarray(result.model(ema=False)(held))
    assert np.abs(theirs - ours).max() <= 1e-4
