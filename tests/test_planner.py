"""``mlgen plan``: the train step compiled ahead of time for the local devices and for TPU slices.

TPU plans run libtpu's real compiler on this CPU (no TPU here): they cover what the compiler
says (memory, FLOPs, its step-time estimate) and which kernels it compiled, not a run on
hardware, and the roofline is only as good as the chip table and the cost analysis.
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # we only compile

import pytest  # noqa: E402

from mlgen import planner  # noqa: E402
from mlgen.cli import main  # noqa: E402
from mlgen.config import ConfigError, MeshConfig  # noqa: E402
from mlgen.ops.attention import AttentionConfig  # noqa: E402

from .helpers import tiny_lm_config  # noqa: E402


def _tiny(**model):
    return tiny_lm_config(mesh=MeshConfig(data=-1), **model)


def test_plan_on_local_devices():
    p = planner.plan(_tiny(scan_layers=False, attention=AttentionConfig(backend="auto")))
    assert p.problems == [] and p.target == "local" and p.chips == 8
    assert p.compiled is not None and p.compiled.compile_s > 0
    assert "xla" in p.compiled.attention
    sb = p.state_bytes
    # 2 Adam moments per parameter, float32: the optimizer is twice the parameters
    assert sb["optimizer"] >= 2 * sb["params"] > 0
    assert p.total_bytes >= sb["params"] + sb["optimizer"]
    assert p.flops_per_chip > 0 and p.model_flops_per_chip > 0 and p.roofline_s > 0
    assert p.tokens_per_step == 8 * 32
    assert "problems: none" in p.report()


def test_unrolled_extrapolation_counts_every_layer():
    """A scanned stack's compiled cost counts one layer; the 2/4-layer unrolled compiles give
    the per-layer cost, so the extrapolated FLOPs of 6 layers grow with depth as they should."""
    p6 = planner.plan(_tiny(num_layers=6), unrolled_flops=True)
    assert set(p6.unrolled) == {2, 4}
    per_layer = (p6.unrolled[4].flops - p6.unrolled[2].flops) / 2
    assert per_layer > 0
    assert p6.flops_per_chip == pytest.approx(p6.unrolled[2].flops + 4 * per_layer)
    assert p6.flops_per_chip > 2 * p6.compiled.flops  # the scan body counted once
    # compiled / model FLOPs: > 1 (softmax, norms, optimizer), but not wildly off the formula
    assert 1.0 < p6.flops_per_chip / p6.model_flops_per_chip < 2.0


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["data.batch_size=6"], "data.batch_size"),
        (["mesh.data=3"], "mesh."),
        (["model.num_kv_heads=3"], "model.num_kv_heads"),
    ],
)
def test_planned_problem_is_one_line_naming_the_field(overrides, field):
    p = planner.plan(_tiny(), overrides)
    assert len(p.problems) == 1 and p.problems[0].startswith(field), p.problems
    assert "\n" not in p.problems[0]


def test_memory_over_budget_is_a_problem():
    p = planner.plan(_tiny(), budget_gib=1e-4, unrolled_flops=False)
    assert len(p.problems) == 1 and p.problems[0].startswith("memory: ")


def test_cli_exit_status_and_json(tmp_path, capsys):
    cfg = tmp_path / "c.py"
    cfg.write_text(
        "from tests.helpers import tiny_lm_config\n"
        "from mlgen.config import MeshConfig\n"
        "def get_config():\n    return tiny_lm_config(mesh=MeshConfig(data=-1))\n"
    )
    assert main(["plan", str(cfg), "--json", "--unrolled-flops", "off"]) == 0  # 1 compile
    out = capsys.readouterr().out
    assert '"problems": []' in out
    assert main(["plan", str(cfg), "data.batch_size=6"]) == 1
    out = capsys.readouterr().out
    assert "problems (1):" in out and "data.batch_size:" in out


def test_plan_for_a_tpu_slice_picks_the_pallas_kernels():
    """A small bf16 LM for v5e:2x2 through libtpu: ``auto`` attention compiles to our Mosaic
    kernels (the host is a CPU), and the roofline uses the v5e row of the chip table."""
    pytest.importorskip("libtpu")
    cfg = _tiny(
        num_layers=1,
        d_model=128,
        num_heads=2,
        num_kv_heads=1,
        scan_layers=False,  # every layer counted in one compile
        attention=AttentionConfig(backend="auto"),
    )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=128))
    p = planner.plan(cfg, ["precision.compute=bfloat16"], topology="v5e:2x2")
    assert p.problems == [] and p.chips == 4 and p.device_kind == "TPU v5 lite"
    assert p.compiled.attention.startswith("pallas_tpu")
    # libtpu's own estimate, where it gives one (it answers -9 for some programs: then None)
    assert p.optimal_seconds is None or p.optimal_seconds > 0
    assert p.flops_per_chip > 0 and p.bytes_per_chip > 0
    assert p.peak_flops == pytest.approx(197e12) and p.hbm_bytes_per_s == pytest.approx(819e9)
    assert p.budget_bytes == pytest.approx(16e9)
    assert 0 < p.mfu < 1


def test_tpu_kernel_that_cannot_take_the_head_dim_is_a_problem():
    pytest.importorskip("libtpu")
    cfg = _tiny(  # head dim 1024 > the kernels' 512
        d_model=1024, num_heads=1, num_kv_heads=1, attention=AttentionConfig(backend="pallas_tpu")
    )
    p = planner.plan(cfg, ["precision.compute=bfloat16"], topology="v5e:2x2")
    assert len(p.problems) == 1
    assert p.problems[0].startswith("model.attention.backend: "), p.problems


def test_unknown_topology_is_a_config_error():
    pytest.importorskip("libtpu")
    with pytest.raises(ConfigError, match=r"--topology: cannot describe TPU slice 'v9z:1x1'"):
        planner.plan(_tiny(), topology="v9z:1x1")


@pytest.mark.slow
def test_llama3_8b_plans_for_v5p_128_within_budget():
    """configs/lm/llama3_8b.py on 64 v5p chips: one compile of the scanned model (211 s on 2
    cores here, jax 0.10.2 / libtpu 0.0.42.1), no unrolled counting compiles."""
    pytest.importorskip("libtpu")
    t = time.perf_counter()
    p = planner.plan("configs/lm/llama3_8b.py", topology="v5p:4x4x4", unrolled_flops=False)
    assert p.problems == [], p.problems
    assert p.chips == 64 and p.tokens_per_step >= 2**20
    assert p.total_bytes <= 95 * 2**30
    assert p.compiled.attention.startswith("pallas_tpu")
    assert 7.9e9 < p.params < 8.1e9
    print(f"llama3_8b plan: {time.perf_counter() - t:.0f} s")


def test_mesh_that_does_not_fit_the_torus_is_one_line():
    """expert=8 x fsdp=8 on v5p:4x4x4: 8 is no product of the torus's sides (4, 4, 4)."""
    pytest.importorskip("libtpu")
    overrides = ["mesh.data=1", "mesh.fsdp=8", "mesh.expert=8", "data.batch_size=64"]
    p = planner.plan(_tiny(), overrides, topology="v5p:4x4x4")
    assert len(p.problems) == 1 and "\n" not in p.problems[0]
    assert p.problems[0].startswith("mesh: {'fsdp': 8, 'expert': 8} does not map onto"), p.problems
