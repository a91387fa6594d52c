"""``mlgen convert import-hf SRC WORKDIR`` -> a run directory that ``mlgen generate`` samples
from (greedy: transformers' tokens) and training resumes from; ``export-hf`` back."""
# ruff: noqa: E402  (torch through importorskip before the imports that need it)

import json

import numpy as np
import pytest

from tests.convert import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)
from transformers import AutoModelForCausalLM

from mlgen import config as config_lib
from mlgen import runs
from mlgen.cli.convert import convert_main
from mlgen.cli.generate import generate_main
from mlgen.data.pretrained import load_pretrained
from mlgen.train.checkpoint import Checkpointer
from tests.convert import hf_models


def test_import_hf_run_generates_as_transformers_and_exports_back(tmp_path, capsys):
    src, wd, dst = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    hf = hf_models.save("llama", src)
    tok = hf_models.write_tokenizer(src)
    assert convert_main(["import-hf", str(src), str(wd)]) == 0
    assert (wd / "config.json").is_file() and (wd / "tokenizer.json").is_file()
    assert "wrote" in capsys.readouterr().out

    # mlgen generate WORKDIR, greedy, against transformers' greedy tokens.
    argv = [str(wd), "--prompt", "hello world", "--temperature", "0", "--max-new-tokens", "10"]
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    prompt = [1, *tok.encode("hello world", add_special_tokens=False).ids]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=2
        )[0, len(prompt) :].tolist()
    assert len(ref) > 1
    want = "hello world" + load_pretrained(wd).decode(ref)
    assert "\n".join(printed) == want

    # What `mlgen train WORKDIR` does before its first step: the saved config loads from the
    # directory and the step-0 checkpoint fits it.
    cfg = config_lib.load(wd)
    assert cfg.data.tokenizer == "pretrained" and cfg.model.vocab_size == hf_models.VOCAB
    s = runs.setup(cfg, abstract=True)
    ckpt = Checkpointer(wd, async_save=False)
    try:
        step, state, _ = ckpt.restore_good(s.state, config=cfg, with_data=False)
    finally:
        ckpt.close()
    assert step == 0 and int(state["step"]) == 0

    assert convert_main(["export-hf", str(wd), str(dst)]) == 0
    back = AutoModelForCausalLM.from_pretrained(dst).eval()
    tokens = torch.tensor(np.arange(3, 27)[None])
    with torch.no_grad():
        assert np.abs(back(tokens).logits.numpy() - hf(tokens).logits.numpy()).max() <= 1e-5
    assert (dst / "tokenizer.json").is_file()
    # The tokenizer's special ids travel in config.json and generation_config.json.
    ids = json.loads((dst / "generation_config.json").read_text())
    assert ids["bos_token_id"] == 1 and ids["eos_token_id"] == 2
    assert back.config.eos_token_id == 2 and back.generation_config.bos_token_id == 1
