"""Hugging Face import of state-space and hybrid LMs (Mamba-2, Jamba) against transformers'
pure-torch paths (tiny random float32 models)."""
# ruff: noqa: E402  (torch through importorskip before the imports that need it)

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from tests.convert import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.convert import ConvertError, export_hf, import_hf, layout, reader
from mlgen.samplers.lm import generate
from tests.convert import hf_models

ARCHS = sorted(hf_models.SSM_BUILDERS)
# 21 tokens: no multiple of the Mamba-2 models' chunk_size (8), so the chunked scan pads.
TOKENS = np.random.default_rng(1).integers(3, hf_models.VOCAB, (2, 21))


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def mlgen_logits(model, tokens=TOKENS) -> np.ndarray:
    graphdef, state = nnx.split(model)  # one compiled forward rather than op-by-op dispatch
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (directory, transformers model)."""
    root = tmp_path_factory.mktemp("hf_ssm")
    return {a: (root / a, hf_models.save(a, root / a)) for a in ARCHS}


@pytest.fixture(scope="module")
def imported(saved):
    """arch -> ``import_hf``'s ``(config, model)``, imported once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = import_hf(saved[arch][0])
        return cache[arch]

    return get


# The bias / tied variants cost a compile each for a few more table entries: slow.
@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a.endswith("_tied") else a for a in ARCHS],
)
def test_logits_match_transformers(saved, imported, arch):
    _, model = imported(arch)
    ours = mlgen_logits(model)
    assert ours.shape == (*TOKENS.shape, hf_models.VOCAB)
    diff = float(np.abs(ours - hf_logits(saved[arch][1])).max())
    print(f"{arch}: max |logit difference| {diff:.3g}")
    assert diff <= 1e-4


# The bias / tied variants decode through the same code; their logits cover their tables.
@pytest.mark.parametrize("arch", ["mamba2", "jamba"])
def test_greedy_tokens_match_transformers(saved, imported, arch):
    """mlgen's sampler (conv + SSM states, KV caches) vs transformers' generate."""
    _, model = imported(arch)
    hf = saved[arch][1]
    prompt = [int(t) for t in TOKENS[0, :6]]
    new = 10
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
    assert len(ref) > 1 and gen.completions()[0] == ref


def test_configs_map_onto_mlgens_layer_kinds(saved):
    _, m2 = layout.to_mlgen(reader.read_config(saved["mamba2"][0]))
    assert (m2.pattern, m2.ssm, m2.ssm_mlp, m2.ssm_groups, m2.ssm_heads) == (
        "m",
        "mamba2",
        False,
        2,
        8,
    )
    _, jamba = layout.to_mlgen(reader.read_config(saved["jamba"][0]))
    assert (jamba.pattern, jamba.moe_every, jamba.period, jamba.rope_theta) == ("mma", 3, 3, 0.0)
    assert not jamba.moe_renormalize
    # HF's layer kinds, layer by layer: attention iff i % 3 == 2, MoE iff i % 3 == 2.
    assert jamba.kinds == tuple((("a" if i % 3 == 2 else "m"), i % 3 == 2) for i in range(6))
    _, other = layout.to_mlgen(reader.read_config(saved["jamba_bias_tied"][0]))
    assert other.kinds == (("a", False), ("m", True)) * 2 and other.tied


def test_stacked_runs_hold_the_right_layers(saved, imported):
    """Each tensor of a layer group's runs comes from layer period * g + start + k."""
    path, _ = saved["jamba"]
    _, model = imported("jamba")
    params = layout.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = load_file(os.path.join(path, reader.WEIGHTS))
    stacked = params["blocks/runs/0/ssm/a_log"]  # layers 0 and 1 of each group of 3
    assert stacked.shape == (2, 2, 128, 8)
    for g in range(2):
        for k in range(2):
            want = tensors[f"model.layers.{3 * g + k}.mamba.A_log"]
            np.testing.assert_array_equal(np.asarray(stacked[g, k]), want)
    experts = params["blocks/runs/1/moe/up"]  # layer 2 of each group: [g, expert, D, F]
    want = tensors["model.layers.5.feed_forward.experts.2.up_proj.weight"].T
    np.testing.assert_array_equal(np.asarray(experts[1, 2]), want)
    q = params["blocks/runs/1/attn/q/kernel"]  # layers 2 and 5
    want = tensors["model.layers.5.self_attn.q_proj.weight"].T.reshape(64, 4, 16)
    np.testing.assert_array_equal(np.asarray(q[1]), want)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _with_config(src, dst, **changes):
    """``dst``: a copy of the model directory ``src`` whose config.json has ``changes``."""
    os.makedirs(dst, exist_ok=True)
    os.symlink(os.path.join(src, reader.WEIGHTS), os.path.join(dst, reader.WEIGHTS))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize(
    "arch, changes, field",
    [
        ("mamba2", {"time_step_limit": [0.0, 0.5]}, "time_step_limit"),
        ("mamba2", {"hidden_act": "gelu"}, "hidden_act"),
        ("mamba2", {"num_heads": 4}, "num_heads"),
        ("jamba", {"expert_layer_offset": 1}, "expert_layer_offset"),
        ("jamba", {"expert_layer_period": 4, "expert_layer_offset": 3}, "expert_layer_period"),
        ("jamba", {"sliding_window": 8}, "sliding_window"),
    ],
)
def test_unsupported_fields_are_one_line_errors(saved, tmp_path, arch, changes, field):
    path = _with_config(saved[arch][0], tmp_path / "bad", **changes)
    with pytest.raises(ConvertError) as err:
        import_hf(path)
    assert _one_line(err).startswith(f"config.json: {field}:")


def test_infinite_time_step_limit_as_transformers_writes_it_is_the_default(saved):
    cfg = json.loads((saved["mamba2"][0] / "config.json").read_text())
    assert cfg["time_step_limit"] == [0.0, {"__float__": "Infinity"}]  # what we parse
    assert layout.to_mlgen(cfg)[1].ssm == "mamba2"


def test_a_tensor_of_the_wrong_shape_is_named(saved, tmp_path):
    path = _with_config(saved["jamba"][0], tmp_path / "bad", mamba_d_state=4)
    with pytest.raises(ConvertError) as err:
        import_hf(path)
    text = _one_line(err)
    assert text.startswith("model.layers.0.mamba.") and "config.json gives" in text


@pytest.mark.parametrize("arch", ["mamba2", "jamba"])
def test_export_is_refused_in_one_line(imported, tmp_path, arch):
    cfg, model = imported(arch)
    with pytest.raises(ConvertError) as err:
        export_hf(cfg, model, tmp_path / "out")
    assert _one_line(err).startswith("model.pattern:")
    assert not (tmp_path / "out").exists()


# The 4-layer Jamba (biases, tied embeddings; its logits otherwise only in the slow run).
@pytest.mark.parametrize(
    "arch", ["jamba_bias_tied", pytest.param("mamba2", marks=pytest.mark.slow)]
)
def test_sharded_import_reads_each_devices_slices(saved, arch, monkeypatch):
    """fsdp x tensor: the fused in_proj / x_proj / conv1d rows are sliced per shard (heads or
    the inner width over ``tensor``), and the logits stay those of transformers."""
    reads = []
    real_read = reader.Checkpoint.read

    def spy(self, name, slices):
        out = real_read(self, name, slices)
        reads.append((name, out.shape, self.shape(name)))
        return out

    monkeypatch.setattr(reader.Checkpoint, "read", spy)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rows = np.tile(TOKENS, (2, 1))  # the batch is split over fsdp too
    with sharding.use(mesh, "fsdp_tp"):
        _, model = import_hf(saved[arch][0])
        logits = mlgen_logits(model, rows)
    assert np.abs(logits - hf_logits(saved[arch][1], rows)).max() <= 1e-4
    name = "mixer.in_proj.weight" if arch == "mamba2" else "mamba.in_proj.weight"
    fused = [(got, full) for n, got, full in reads if n.endswith(name)]
    assert fused and all(got[0] < full[0] and got[1] < full[1] for got, full in fused)
