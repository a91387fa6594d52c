"""The seq2seq task through ``mlgen train`` and the one trainer: loss, evals, checkpoints,
resume onto another mesh."""

import json
from pathlib import Path

import jax

import mlgen
from mlgen.cli import main


def _logged(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]


def test_seq2seq_trains_with_mlgen_train_and_resumes(tmp_path):
    """``mlgen train`` on a config (8 simulated devices, the fsdp rules): the loss falls, evals
    run, checkpoints are written; a longer run resumes from the last one (on one device: the
    checkpoint, data iterator included, restores onto another mesh)."""
    path = tmp_path / "cfg.py"
    path.write_text(
        "from tests.tasks.test_encoder_tasks import _seq2seq\n\n\n"
        f"def get_config():\n    return _seq2seq({str(tmp_path / 'run')!r})\n"
    )
    assert main(["--compilation-cache", "off", "train", str(path)]) == 0
    rows = _logged(tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    assert any("eval_sequence_accuracy" in r for r in rows)
    ckpts = tmp_path / "run" / "checkpoints"
    assert {"15", "30"} <= {p.name for p in ckpts.iterdir()}
    result = mlgen.train(str(path), ["train.num_steps=35"], devices=jax.devices()[:1])
    assert result.final_metrics["step"] == 35
    resumed = _logged(tmp_path / "run")[len(rows) :]
    assert resumed and all(r["step"] > 30 for r in resumed)  # from the checkpoint, not step 0
    assert "35" in {p.name for p in ckpts.iterdir()}
