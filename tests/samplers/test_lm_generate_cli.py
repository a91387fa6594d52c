"""``mlgen generate WORKDIR``: restore a run (config, checkpoint, tokenizer) and print completions."""

import dataclasses

from mlgen.config import TrainConfig
from mlgen.samplers.lm import generate_main
from mlgen.train.trainer import train
from tests.helpers import replace, tiny_lm_config


def test_generate_cli_prints_completions_of_a_trained_run(tmp_path, capsys):
    cfg = tiny_lm_config(str(tmp_path), num_layers=1, d_model=32)
    cfg = replace(cfg, train=dataclasses.replace(cfg.train, num_steps=1, eval_every=0, checkpoint_every=1))
    train(cfg)
    capsys.readouterr()
    argv = [str(tmp_path), "--prompt", "def ", "--prompt", "import", "--max-new-tokens", "12", "--top-k", "20",
            "--temperature", "0.8", "--num-samples", "2", "--seed", "3"]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- 'def ' sample") == 2 and out.count("--- 'import' sample") == 2
    assert generate_main(argv + ["--best-of", "2"]) == 0  # the same samples, ranked: same compilation
    ranked = capsys.readouterr().out
    assert ranked.count("(best of 2 by mean log-prob)") == 4
    assert {ln for ln in ranked.splitlines() if not ln.startswith("---")} == \
        {ln for ln in out.splitlines() if not ln.startswith("---")}
