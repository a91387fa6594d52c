"""``mlgen bench NAME``: every benchmark runs end to end at tiny shapes and reports what
it measured.

These check that the benchmarks work (argument parsing, the real train / sample / attention
paths, the JSON a user compares against a peer); they assert no speed. Timings are taken on
the test's 8 simulated CPU devices and mean nothing.
"""

from __future__ import annotations

import json
import re

import pytest

from mlgen.bench import BENCHES, long, run
from mlgen.config import InputError


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_diffusion_dit_bf16(capsys):
    # The UNet at float32 runs in test_all_quick.
    run(
        "diffusion",
        [
            "--size",
            "8",
            "--channels",
            "32",
            "--layers-per-block",
            "1",
            "--batch",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--model",
            "dit",
            "--dtype",
            "bfloat16",
        ],
    )
    (r,) = _json_lines(capsys.readouterr().out)
    assert r["bench"] == "mlgen-diffusion" and r["devices"] == 8
    assert r["model"] == "dit" and r["dtype"] == "bfloat16"
    assert r["images_per_s"] > 0 and abs(r["images_per_s"] * r["step_s"] - 8) < 1e-6
    assert r["params"] > 10_000


def test_train(capsys, tmp_path):
    run(
        "train",
        [
            "--layers",
            "1",
            "--width",
            "32",
            "--heads",
            "2",
            "--seq",
            "16",
            "--batch",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--loss-chunk",
            "8",
            "--profile",
            str(tmp_path / "prof"),
        ],
    )
    out, err = capsys.readouterr()
    (r,) = _json_lines(out)
    assert r["bench"] == "mlgen-train" and r["tokens_per_s"] > 0 and r["loss_chunk"] == 8
    # --profile: the op-time table by kind, whose ops are the compiled step's own instructions.
    hlo = (tmp_path / "prof" / "step.hlo.txt").read_text()
    rows = [line for line in err.splitlines() if line.startswith("matmul ")]
    assert len(rows) == 1, err
    shares = [float(m) for m in re.findall(r" ([0-9.]+)%  ", err)]
    assert shares and sum(shares) == pytest.approx(100, abs=0.5)
    top_matmul = rows[0].split("%  ")[1].split(",")[0].rsplit(" ", 1)[0]
    assert f"%{top_matmul} = " in hlo
    assert abs(r["tokens_per_s"] * r["step_s"] - 8 * 16) < 1e-6
    # gpt2, D=32, 2 heads of 16, MLP 128, V=512, one layer, T=16: 6 * (4*32*32 + 2*32*128 +
    # 32*512) weights + causal attention 6 * 16 * 32 (tests/train/test_throughput.py counts)
    assert r["model_flops_per_token"] == 6 * (4096 + 8192 + 16384) + 3072
    assert r["peak_flops"] > 0 and "CPU host" in r["peak_source"]
    assert 0 < r["mfu"] < 1
    assert r["mfu"] == pytest.approx(
        r["tokens_per_s"] * r["model_flops_per_token"] / r["peak_flops"]
    )


def test_all_quick(capsys):
    run("all", ["--quick"])
    rows = _json_lines(capsys.readouterr().out)
    assert [r["bench"] for r in rows] == [
        "mlgen-train",
        "mlgen-generate",
        "mlgen-diffusion",
        "mlgen-attention",
    ]
    assert all(r["quick"] for r in rows)
    train, gen, diff, att = rows
    assert train["tokens_per_s"] > 0 and train["flavour"] == "gpt2" and train["devices"] == 8
    assert gen["new_tokens_per_s"] > 0
    assert diff["model"] == "unet" and diff["dtype"] == "float32" and diff["devices"] == 8
    assert diff["images_per_s"] > 0 and abs(diff["images_per_s"] * diff["step_s"] - 8) < 1e-6
    assert diff["params"] > 10_000
    assert (att["batch"], att["lengths"], att["heads"], att["head_dim"]) == (1, [16], 2, 16)
    assert [p["backend"] for p in att["points"]] == ["reference", "xla", "blockwise"]
    assert all(p["T"] == 16 and p["time_s"] > 0 and p["peak_bytes"] > 0 for p in att["points"])


def test_all_only_names_the_flag():
    with pytest.raises(InputError, match="--only: unknown benchmark"):
        run("all", ["--only", "train,nope"])


def test_attention(capsys, tmp_path):
    png = tmp_path / "att.png"
    run(
        "attention",
        [
            "--lengths",
            "16,40",
            "--backends",
            "xla,blockwise",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--repeats",
            "1",
            "--png",
            str(png),
        ],
    )
    out = capsys.readouterr().out
    assert "T=40: blockwise speed / xla speed" in out
    assert png.stat().st_size > 0


def test_ring(capsys):
    run(
        "ring",
        [
            "--T",
            "16",
            "--devices",
            "1,2",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "16",
            "--steps",
            "1",
            "--warmup",
            "1",
        ],
    )
    rows = _json_lines(capsys.readouterr().out)
    assert [r["devices"] for r in rows] == [1, 2] and [r["context"] for r in rows] == [16, 32]
    assert all(r["step_s"] > 0 for r in rows)


def test_peak(capsys):
    run("peak", [])
    (r,) = _json_lines(capsys.readouterr().out)
    assert r["bench"] == "mlgen-peak" and r["platform"] == "cpu" and r["devices"] == 8
    assert r["cpu_gflops"] > 0 and r["cpu_probe"].startswith("float32 ")
    assert r["chip"] is None  # CPUs are measured, not in the table
    assert r["peak_flops"] == pytest.approx(r["cpu_gflops"] * 1e9)


def test_moe(capsys):
    run(
        "moe",
        ["--tokens", "16", "--d-model", "8", "--mlp-dim", "8", "--experts", "4"]
        + ["--block-size", "4", "--rounds", "1"],
    )
    rows = _json_lines(capsys.readouterr().out)
    assert [(r["path"], r.get("block_size")) for r in rows] == [
        ("ragged", None),
        ("blocked", 4),
        ("capacity", None),
    ]
    assert all(r["bench"] == "mlgen-moe" and r["median_s"] > 0 for r in rows)


def test_moe_layer_on_expert_meshes(capsys):
    run(
        "moe",
        ["--tokens", "32", "--d-model", "8", "--mlp-dim", "8", "--experts", "4"]
        + ["--paths", "capacity", "--expert-shards", "1", "4", "--rounds", "1"],
    )
    rows = _json_lines(capsys.readouterr().out)
    assert [(r["bench"], r["expert_shards"], r["mesh"]["data"]) for r in rows] == [
        ("mlgen-moe-layer", 1, 8),
        ("mlgen-moe-layer", 4, 2),
    ]
    # 4 tokens per device: [n, E / n, G = ceil(1.25 * 4 * 2 / 4), D]
    assert "exchange_s" not in rows[0] and rows[1]["exchange"] == [4, 1, 3, 8]


def test_unknown_bench_is_named():
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        run("nope", [])
    assert set(BENCHES) == {
        "train",
        "generate",
        "attention",
        "ring",
        "diffusion",
        "peak",
        "all",
        "compare",
        "moe",
        "long",
    }


def test_train_moe_counts_active_flops(capsys):
    """``bench train --moe``: every layer MoE; its model FLOPs per token are the dense model's of
    the same active width (k x --moe-mlp) plus the router's."""
    shape = ["--layers", "1", "--width", "32", "--heads", "2", "--seq", "16", "--batch", "8"]
    shape += ["--vocab", "512", "--steps", "1", "--warmup", "1", "--flavour", "llama"]
    run("train", shape + ["--moe", "--experts", "4", "--top-k", "2", "--moe-mlp", "32"])
    run("train", shape + ["--mlp", "64"])
    moe, dense = _json_lines(capsys.readouterr().out)
    assert moe["moe"]["num_experts"] == 4 and dense["moe"] is None
    assert moe["model_flops_per_token"] == dense["model_flops_per_token"] + 6 * 32 * 4
    assert moe["params"] > dense["params"] and moe["tokens_per_s"] > 0


def test_bench_long_builds_the_three_models_at_any_length():
    """``mlgen bench long``'s configs (the timing itself is a benchmark, not a test)."""
    for name in long.MODELS:
        cfg = long.model_config(name, 4096).validate()
        assert cfg.data.seq_len == 4096 and cfg.data.batch_size == 1
        assert cfg.model.attention.backend == "blockwise"
        want = {"transformer": "a", "hybrid": "mmma", "mamba2": "m"}[name]
        assert cfg.model.pattern == want
