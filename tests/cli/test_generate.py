"""``mlgen generate WORKDIR``: restore a run (config, checkpoint, tokenizer)
and print completions."""

from mlgen.cli.generate import generate_main
from mlgen.runs import setup
from mlgen.train.checkpoint import Checkpointer
from tests.helpers import tiny_lm_config


def _saved_run(workdir: str) -> None:
    """A run's workdir as the trainer leaves it (config + checkpoint),
    without compiling a train step."""
    import jax

    cfg = tiny_lm_config(workdir, num_layers=1, d_model=32)
    s = setup(
        cfg.validate(1), devices=jax.devices()[:1]
    )  # mesh data=-1: restored onto all 8 devices
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, s.state, config=cfg, force=True)
    ckpt.close()


def test_generate_cli_prints_completions_of_a_saved_run(tmp_path, capsys):
    _saved_run(str(tmp_path))
    argv = [
        str(tmp_path),
        "--prompt",
        "def ",
        "--prompt",
        "import",
        "--max-new-tokens",
        "12",
        "--top-k",
        "20",
        "--temperature",
        "0.8",
        "--num-samples",
        "2",
        "--seed",
        "3",
    ]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- 'def ' sample") == 2 and out.count("--- 'import' sample") == 2
    assert (
        generate_main(argv + ["--best-of", "2"]) == 0
    )  # the same samples, ranked: same compilation
    ranked = capsys.readouterr().out
    assert ranked.count("(best of 2 by mean log-prob)") == 4
    assert {ln for ln in ranked.splitlines() if not ln.startswith("---")} == {
        ln for ln in out.splitlines() if not ln.startswith("---")
    }
