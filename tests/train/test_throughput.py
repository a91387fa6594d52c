"""Throughput accounting: model FLOPs by hand count, the chip table against libtpu's devices,
the CPU probe, and MFU in a tiny run's metrics."""

import json
import logging
import types

import jax
import pytest

import mlgen
from mlgen.models import dit, transformer
from mlgen.models.dit import PRESETS as DIT_PRESETS
from mlgen.models.family import family_of
from mlgen.models.transformer import TransformerConfig
from mlgen.train import throughput
from tests.helpers import replace, tiny_lm_config


def test_llama_flops_by_hand():
    cfg = TransformerConfig(
        flavour="llama", vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2
    )
    # head dim 64 / 4 = 16; MLP width: 8/3 * 64 = 170, rounded up to 64 -> 192; T = 32.
    q = 64 * (4 * 16)  # D x N*H
    k = 64 * (2 * 16)  # D x K*H (grouped-query: 2 kv heads)
    v = 64 * (2 * 16)
    o = (4 * 16) * 64
    gate, up, down = 64 * 192, 64 * 192, 192 * 64  # SwiGLU: three matrices
    per_layer = q + k + v + o + gate + up + down
    assert per_layer == 49152
    head = 64 * 256  # the untied output layer D x V (the embedding gather is not counted)
    weights = 2 * per_layer + head
    # 2 FLOPs per weight per token forward, 4 backward; causal attention: Q K^T and P V,
    # 2 * T * N*H FLOPs each per token and layer forward, x3 for training, halved.
    attention = 2 * (2 * 2 * 32 * 64) * 3 // 2
    assert transformer.transformer_flops_per_token(cfg, 32) == 6 * weights + attention == 712704
    assert family_of(cfg).flops_per_token is transformer.transformer_flops_per_token


def test_gpt2_flops_by_hand():
    cfg = TransformerConfig(
        flavour="gpt2", vocab_size=512, num_layers=3, d_model=48, num_heads=3, max_len=64
    )
    # head dim 16, no GQA, MLP width 4 * 48 = 192, tied embeddings; T = 64.
    qkvo = 4 * (48 * 48)
    up, down = 48 * 192, 192 * 48  # GELU MLP: two matrices (biases not counted)
    logits = 48 * 512  # tied: embed.attend is still a D x V matmul per token
    weights = 3 * (qkvo + up + down) + logits
    causal = 3 * (2 * 2 * 64 * 48) * 3 // 2
    assert transformer.transformer_flops_per_token(cfg, 64) == 6 * weights + causal == 700416
    assert (
        transformer.transformer_flops_per_token(cfg, 64, causal=False) == 6 * weights + 2 * causal
    )


def test_dit_flops_by_hand():
    cfg = DIT_PRESETS["dit-tiny"]  # 8x8x1 images, 2x2 patches -> P = 16, D = 32, 2 layers
    assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.num_layers) == (8, 2, 32, 2)
    per_token = (
        2 * (4 * 32 * 32 + 2 * 32 * 128)  # q, k, v, o and the MLP (width 4 * 32)
        + (2 * 2 * 1) * 32  # patch embedding p*p*C x D
        + 32 * (2 * 2 * 1)  # output projection D x p*p*C_out
    )
    per_image = 2 * 32 * 6 * 32 + 32 * 2 * 32 + (256 * 32 + 32 * 32)  # adaLN, final, time MLP
    attention = 2 * (2 * 2 * 16 * 32) * 3  # bidirectional: the full 16 x 16
    expect = 6 * (per_token + per_image / 16) + attention
    assert dit.dit_flops_per_token(cfg) == expect == 170112
    assert dit.dit_flops_per_pixel(cfg, 64) == expect / 4
    assert family_of(cfg).flops_per_token is dit.dit_flops_per_pixel


@pytest.mark.parametrize(
    "topology,name,chips,kind",
    [("v5p:2x2x1", "v5p", 4, "TPU v5"), ("v5e:2x2", "v5e", 4, "TPU v5 lite")],
)
def test_chip_of_libtpu_devices(topology, name, chips, kind):
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    assert devices[0].device_kind == kind
    chip = throughput.chip_of(devices[0])
    assert chip is not None and chip.name == name
    peak, source = throughput.peak_flops(devices)
    assert peak == chips * chip.bf16_flops and f"{chips} x {name}" in source


def test_v4_counts_chips_not_tensorcores():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices
    assert len(devices) == 8  # two TensorCores per chip in libtpu's topology
    peak, source = throughput.peak_flops(devices)
    assert peak == 4 * 275e12 and source.startswith("4 x v4 ")


def _gpu(kind: str):
    return types.SimpleNamespace(platform="gpu", device_kind=kind, process_index=0)


def test_gpu_peaks_by_dtype_and_precision():
    h100 = [_gpu("NVIDIA H100 80GB HBM3")] * 8
    assert throughput.peak_flops(h100)[0] == 8 * 989.5e12
    with jax.default_matmul_precision("default"):  # float32 matmuls on TF32 tensor cores
        assert throughput.peak_flops(h100, "float32")[0] == 8 * 494.5e12
    with jax.default_matmul_precision("highest"):
        assert throughput.peak_flops(h100, "float32")[0] == 8 * 67e12
    assert throughput.chip_of(_gpu("NVIDIA H200")).hbm_bytes == 141e9
    peak, why = throughput.peak_flops([_gpu("NVIDIA GeForce GTX 480")])
    assert peak == 0.0 and "GTX 480" in why


def test_cpu_peak_measured_once():
    peak = throughput.measured_cpu_peak()
    assert 1e8 < peak < 1e14
    total, source = throughput.peak_flops(jax.devices())  # 8 simulated devices, one host
    assert total == peak and "8 devices share it" in source
    assert throughput.measured_cpu_peak() == peak
    assert throughput._cpu_probe.cache_info().misses == 1


def test_trainer_logs_mfu(tmp_path, caplog):
    cfg = tiny_lm_config(str(tmp_path))
    cfg = replace(
        cfg, train=replace(cfg.train, num_steps=3, log_every=1, eval_every=0, checkpoint_every=10)
    )
    with caplog.at_level(logging.INFO, logger="mlgen"):
        mlgen.train(cfg)
    said = [r.getMessage() for r in caplog.records if "for MFU" in r.getMessage()]
    assert len(said) == 1 and "CPU host" in said[0]
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "mfu" not in lines[0] and "tokens_per_s" not in lines[0]  # only the compiling step
    per_token = transformer.transformer_flops_per_token(cfg.model, 32)
    for line in lines[1:]:
        assert 0 < line["mfu"] < 1, line
        assert line["tokens_per_s"] > 0
        assert line["model_flops_per_s"] == pytest.approx(line["tokens_per_s"] * per_token)
        assert line["step_s"] == pytest.approx(8 / line["examples_per_s"])
