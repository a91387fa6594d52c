"""Hugging Face import / export against transformers itself (tiny random float32 models)."""
# ruff: noqa: E402  (torch through importorskip before the imports that need it)

import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tests.convert import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)
from transformers import AutoModelForCausalLM

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.convert import ConvertError, export_hf, import_hf
from mlgen.convert import reader as reader_lib
from mlgen.samplers.lm import generate
from tests.convert import hf_models

ARCHS = sorted(hf_models.BUILDERS)
TOKENS = np.random.default_rng(0).integers(3, hf_models.VOCAB, (2, 24))
MAX_DIFF = {}  # arch -> max |mlgen - transformers| of the logits (printed by -s runs)


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (directory, transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    return {a: (root / a, hf_models.save(a, root / a)) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_match_transformers(saved, arch):
    path, hf = saved[arch]
    cfg, model = import_hf(path)
    ours = np.asarray(model(TOKENS))
    assert ours.shape == (2, 24, hf_models.VOCAB)
    MAX_DIFF[arch] = diff = float(np.abs(ours - hf_logits(hf)).max())
    print(f"{arch}: max |logit difference| {diff:.3g}")
    assert diff <= 1e-4
    # Greedy decoding through mlgen's sampler (KV cache, left padding) vs transformers.
    prompt = [int(t) for t in TOKENS[0, :6]]
    new = 14  # 20 tokens in all: longer than mistral's window of 8
    gen = generate(model, [prompt], max_new_tokens=new, eos_id=2, pad_id=0)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2) + 1]
    assert gen.completions()[0] == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip_loads_in_transformers_with_same_logits(saved, arch, tmp_path):
    path, hf = saved[arch]
    cfg, model = import_hf(path)
    export_hf(cfg, model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    assert np.abs(hf_logits(back) - hf_logits(hf)).max() <= 1e-5
    cfg2, _ = import_hf(tmp_path / "out")
    assert cfg2 == cfg


def test_sharded_checkpoint_with_index(tmp_path):
    hf = hf_models.save("llama", tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / reader_lib.INDEX).is_file()
    assert not (tmp_path / reader_lib.WEIGHTS).exists()
    _, model = import_hf(tmp_path)
    assert np.abs(np.asarray(model(TOKENS)) - hf_logits(hf)).max() <= 1e-4


def test_fsdp_import_streams_each_devices_shard(saved, monkeypatch):
    path, hf = saved["qwen2"]
    reads = []
    real_read = reader_lib.Checkpoint.read

    def spy(self, name, slices):
        out = real_read(self, name, slices)
        reads.append((name, out.shape, self.shape(name)))
        return out

    monkeypatch.setattr(reader_lib.Checkpoint, "read", spy)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8))
    with sharding.use(mesh, "fsdp"):
        cfg, model = import_hf(path)
        rows = np.tile(TOKENS, (4, 1))  # the batch is split over fsdp too
        logits = np.asarray(model(rows))
    assert np.abs(logits - hf_logits(hf, rows)).max() <= 1e-4
    split = 0
    for key, leaf in _leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        want = leaf.sharding.shard_shape(leaf.shape)
        assert len(leaf.addressable_shards) == 8
        assert all(s.data.shape == want for s in leaf.addressable_shards), key
        split += want != leaf.shape
    # Every weight with an embed dimension (D = 64 over 8 devices): the embedding, the head,
    # q/k/v/o and the three MLP matrices.
    assert split == 9
    # Every read of a matrix is one device's slice of one layer's tensor, never a whole one.
    q = [(got, full) for name, got, full in reads if name.endswith("q_proj.weight")]
    assert q and all(got == (full[0], full[1] // 8) for got, full in q)
    assert len(q) == 8 * cfg.num_layers


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield prefix + k, v


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_pickled_weights_only_are_refused(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved["llama"][0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ConvertError) as err:
        import_hf(tmp_path)
    text = _one_line(err)
    assert "pytorch_model.bin" in text and "safe_serialization=True" in text


def test_unknown_architecture_is_refused(saved, tmp_path):
    cfg = json.loads((saved["llama"][0] / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError) as err:
        import_hf(tmp_path)
    assert "BertForMaskedLM" in _one_line(err)


def _copy(src, dst, *, drop=(), config=None):
    tensors = load_file(os.path.join(src, reader_lib.WEIGHTS))
    save_file({k: v for k, v in tensors.items() if k not in drop}, dst / reader_lib.WEIGHTS)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))


def test_missing_tensor_is_named(saved, tmp_path):
    name = "model.layers.1.self_attn.k_proj.bias"
    _copy(saved["qwen2"][0], tmp_path, drop=(name,))
    with pytest.raises(ConvertError) as err:
        import_hf(tmp_path)
    assert name in _one_line(err) and "missing" in str(err.value)


def test_shape_that_does_not_match_the_config_is_named(saved, tmp_path):
    _copy(saved["llama"][0], tmp_path, config={"intermediate_size": 128})
    with pytest.raises(ConvertError) as err:
        import_hf(tmp_path)
    text = _one_line(err)
    assert "model.layers.0.mlp.gate_proj.weight: shape (96, 64)" in text and "(128, 64)" in text
