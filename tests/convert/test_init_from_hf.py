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
    with torch.no_grad():
        for p in hf.parameters():
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
