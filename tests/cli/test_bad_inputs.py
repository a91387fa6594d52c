# ruff: noqa: E501  (the table of cases: one case a line)
"""Bad input to the ``mlgen`` CLI: one line naming the culprit, exit status 2, no traceback, and
nothing created on disk. In process (``mlgen.cli.main``) except one subprocess case.

Runs are saved without training (``setup`` + one checkpoint): a tiny Llama and a tiny GPT-2
(``max_len=32``) language model and a tiny class-conditional UNet on 8x8 digits.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import mlgen
from mlgen.cli import main
from mlgen.config import ConfigError, InputError
from mlgen.data.text import TextDataConfig, check_corpus, split_documents
from mlgen.runs import setup
from mlgen.train.checkpoint import Checkpointer
from tests.helpers import tiny_digits_config, tiny_lm_config

TINY = "configs/lm/tiny.py"  # the tests run from the repository root (pyproject's pythonpath)


def _save(cfg) -> None:
    s = setup(cfg.validate(1), devices=jax.devices()[:1])
    ckpt = Checkpointer(cfg.workdir, async_save=False)
    ckpt.save(1, s.state, config=cfg, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-inputs")
    _save(tiny_lm_config(str(root / "lm"), num_layers=1, d_model=32))
    _save(tiny_lm_config(str(root / "gpt2"), num_layers=1, d_model=32, flavour="gpt2", max_len=32))
    _save(tiny_digits_config(str(root / "diff")))
    (root / "file").write_text("not a directory\n")
    (root / "empty").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / "empty" / name).write_text("")
    (root / "syntax.py").write_text("def get_config(:\n    pass\n")
    (root / "raises.py").write_text("def get_config():\n    return {}['model']\n")
    (root / "noconfig.py").write_text("x = 1\n")
    (root / "readonly").mkdir()
    names = ("lm", "gpt2", "diff", "file", "empty", "readonly", "new")
    files = {"syntax": "syntax.py", "raises": "raises.py", "noconfig": "noconfig.py"}
    return (
        {n: str(root / n) for n in names}
        | {k: str(root / f) for k, f in files.items()}
        | {"root": str(root)}
    )


P25 = "x" * 24  # with bos: 25 tokens of GPT-2's 32
CFG_ERR, GEN_ERR, SAMPLE_ERR = "mlgen: config error: ", "mlgen generate: error: ", "mlgen sample: "

# (id, argv, the message's first words, a path that must not exist afterwards)
CASES = [
    # generate: the workdir
    ("gen-missing-workdir", "generate {new} --prompt hi", GEN_ERR + "workdir: no such directory", "{new}"),
    ("gen-workdir-is-file", "generate {file} --prompt hi", GEN_ERR + "workdir: '{file}' is a file", None),
    ("gen-not-a-run", "generate {empty} --prompt hi", GEN_ERR + "workdir: '{empty}' holds no checkpoint", "{empty}/checkpoints"),
    ("gen-diffusion-run", "generate {diff} --prompt hi", GEN_ERR + "workdir: '{diff}' is a diffusion run", None),
    ("gen-no-such-step", "generate {lm} --prompt hi --step 7", GEN_ERR + "step: the run has no checkpoint 7; saved: [1]", None),
    # generate: the flags
    ("gen-num-samples-0", "generate {lm} --prompt hi --num-samples 0", GEN_ERR + "--num-samples: must be >= 1, got 0", None),
    ("gen-temperature-neg", "generate {lm} --prompt hi --temperature -1", GEN_ERR + "--temperature: must be >= 0", None),
    ("gen-top-p-1.5", "generate {lm} --prompt hi --top-p 1.5", GEN_ERR + "--top-p: must be in (0, 1]", None),
    ("gen-top-k-neg", "generate {lm} --prompt hi --top-k -2", GEN_ERR + "--top-k: must be >= 0", None),
    ("gen-max-new-neg", "generate {lm} --prompt hi --max-new-tokens -3", GEN_ERR + "--max-new-tokens: must be >= 1, got -3", None),
    ("gen-best-of-too-few", "generate {lm} --prompt hi --best-of 1 --num-samples 2", GEN_ERR + "--best-of: 1 draws", None),
    ("gen-bad-int", "generate {lm} --prompt hi --top-k x", GEN_ERR + "argument --top-k: invalid int value: 'x'", None),
    ("gen-no-prompt", "generate {lm}", GEN_ERR + "the following arguments are required: --prompt", None),
    ("gen-bad-override", "generate {lm} --prompt hi model.nmu_layers=1", CFG_ERR + "model.nmu_layers: unknown key", None),
    # generate: prompt lengths (refused, never truncated)
    ("gen-prompt-over-context", "generate {lm} --prompt " + "y" * 40, GEN_ERR + "--prompt: prompt 1 is 41 tokens, longer than the 32-token context", None),
    ("gen-gpt2-no-room", "generate {gpt2} --prompt " + P25 + " --max-new-tokens 10", GEN_ERR + "--max-new-tokens: 10 do not fit: prompt 1 is 25 tokens of the model's max_length=32, leaving room for 7", None),
    ("gen-gpt2-full", "generate {gpt2} --prompt " + "z" * 31, GEN_ERR + "--prompt: prompt 1 is 32 tokens and fills the model's max_length=32", None),
    # sample / eval
    ("sample-lm-run", "sample {lm} --out {root}/g.png", SAMPLE_ERR + "error: workdir: '{lm}' is a lm run", "{root}/g.png"),
    ("sample-missing-workdir", "sample {new} --out {root}/g.png", SAMPLE_ERR + "error: workdir: no such directory", "{new}"),
    ("sample-steps-0", "sample {diff} --out {root}/g.png --steps 0", SAMPLE_ERR + "error: --steps: must be in [1, max_steps=8], got 0", "{root}/g.png"),
    # (--num was read as an abbreviation of the global --num-processes: "mlgen: --num-processes: ...")
    ("sample-num-0", "sample {diff} --out {root}/g.png --num 0", SAMPLE_ERR + "error: --num: must be >= 1, got 0", None),
    ("sample-eta-2", "sample {diff} --out {root}/g.png --eta 2", SAMPLE_ERR + "error: --eta: must be in [0, 1]", None),
    ("sample-guidance-neg", "sample {diff} --out {root}/g.png --guidance -1", SAMPLE_ERR + "error: --guidance: must be >= 0", None),
    ("sample-class-12", "sample {diff} --out {root}/g.png --class 12", SAMPLE_ERR + "error: --class: must be in [0, 10), got 12", None),
    ("sample-out-jpg", "sample {diff} --out {root}/g.jpg", SAMPLE_ERR + "error: --out: must end in .png or .npz", None),
    ("sample-out-under-file", "sample {diff} --out {file}/g.png", SAMPLE_ERR + "error: --out: '{file}/g.png' cannot be created: '{file}' is a file", None),
    ("eval-lm-run", "eval {lm}", "mlgen eval: error: workdir: '{lm}' is a lm run", None),
    # train: config files, overrides, values
    ("train-missing-config", "train {root}/nope.py workdir={new}", CFG_ERR + "config: no such file", "{new}"),
    ("train-config-is-dir", "train {root} workdir={new}", CFG_ERR + "config: '{root}' is a directory", "{new}"),
    ("train-syntax-error", "train {syntax} workdir={new}", CFG_ERR + "config: {syntax}:1: SyntaxError:", "{new}"),
    ("train-config-raises", "train {raises} workdir={new}", CFG_ERR + "config: {raises}:2: KeyError: 'model'", "{new}"),
    ("train-no-get-config", "train {noconfig} workdir={new}", CFG_ERR + "config: {noconfig} defines no get_config()", "{new}"),
    ("train-bad-key", f"train {TINY} workdir={{new}} model.nmu_layers=2", CFG_ERR + "model.nmu_layers: unknown key", "{new}"),
    ("train-bad-type", f"train {TINY} workdir={{new}} model.num_layers=abc", CFG_ERR + "model.num_layers: expected an int, got 'abc'", "{new}"),
    ("train-bad-value", f"train {TINY} workdir={{new}} optim.lr=-1", CFG_ERR + "optim.lr: must be > 0", "{new}"),
    ("train-not-key-value", f"train {TINY} workdir={{new}} num_steps", CFG_ERR + "num_steps: overrides are key=value", "{new}"),
    ("train-mesh-vs-devices", f"train {TINY} workdir={{new}} mesh.data=3", CFG_ERR + "mesh.data: mesh {{'data': 3", "{new}"),
    # train: data and workdir, before the workdir is created
    ("train-missing-data", f"train {TINY} workdir={{new}} data.source=files data.paths={{root}}/none/*.txt", CFG_ERR + "data.paths: no files match", "{new}"),
    ("train-empty-corpus", f"train {TINY} workdir={{new}} data.source=files data.paths={{empty}}/*.txt", CFG_ERR + "data.paths: the 3 files matching ['{empty}/*.txt'] contain no text", "{new}"),
    ("train-lora-target", f"train {TINY} workdir={{new}} model.lora_rank=8 model.lora_targets=q,x", CFG_ERR + "model.lora_targets: unknown projection(s) ['x']", "{new}"),
    ("merge-lora-missing-workdir", "convert merge-lora {new} {root}/m", "mlgen convert: error: workdir: no such directory", "{root}/m"),
    ("export-hf-not-a-run", "convert export-hf {empty} {root}/e", "mlgen convert: error: workdir: '{empty}' holds no checkpoint", "{root}/e"),
    ("merge-lora-no-adapters", "convert merge-lora {lm} {new}", CFG_ERR + "model.lora_rank: the run in {lm} has 0: no adapters", "{new}"),
    ("train-workdir-is-file", f"train {TINY} workdir={{file}}", CFG_ERR + "workdir: '{file}' is a file, not a directory", None),
    ("train-workdir-under-file", f"train {TINY} workdir={{file}}/run", CFG_ERR + "workdir: '{file}/run' cannot be created: '{file}' is a file", None),
    ("train-workdir-readonly", f"train {TINY} workdir={{readonly}}/run", CFG_ERR + "workdir: '{readonly}/run' cannot be created: '{readonly}' is not writable", "{readonly}/run"),
    # plan, global options, commands
    ("plan-bad-topology", f"plan {TINY} --topology nonsense", "mlgen plan: error: --topology: 'nonsense' is no TPU slice name", None),
    ("plan-bad-budget", f"plan {TINY} --budget-gib -1", "mlgen plan: error: --budget-gib: must be > 0 GiB", None),
    ("unknown-command", "trian {root}", "mlgen: error: unknown command 'trian'", None),
    ("unknown-global", "--bogus train x", "mlgen: error: unknown global option '--bogus'", None),
    ("bad-world", "--num-processes 2 train x", "mlgen: --coordinator: --num-processes needs", None),
]  # fmt: skip


@pytest.fixture
def readonly(paths, monkeypatch):
    """``paths['readonly']`` reads as not writable (tests run as root, which writes anywhere)."""
    access = os.access

    def fake(path, mode, **kw):
        if os.path.abspath(path) == paths["readonly"] and mode & os.W_OK:
            return False
        return access(path, mode, **kw)

    monkeypatch.setattr(os, "access", fake)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, paths, readonly, capsys):
    _, argv, want, absent = case
    argv = [a.format(**paths) for a in argv.split()]
    code = main(["--compilation-cache", "off", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(want.format(**paths)), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if absent:
        assert not Path(absent.format(**paths)).exists()


def test_gpt2_default_new_tokens_fit_the_max_length(paths, capsys):
    """Left at its default, ``--max-new-tokens`` is as many as fit (here 7 after 25 tokens)."""
    assert main(["--compilation-cache", "off", "generate", paths["gpt2"], "--prompt", P25, "--top-k", "1"]) == 0  # fmt: skip
    assert "sample 1/1" in capsys.readouterr().out


def test_corpus_check_names_the_split_and_hosts(tmp_path):
    """The train split of empty files (validation has text), and more hosts than documents."""
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text("")
    cfg = TextDataConfig(source="files", paths=(str(tmp_path / "*.txt"),), val_fraction=0.3)
    (val,) = split_documents(cfg, "validation")[:1]
    Path(val.path).write_text("text")
    with pytest.raises(ConfigError, match=r"^paths: the \d+ files of the train split contain no"):
        check_corpus(cfg)
    with pytest.raises(
        ConfigError,
        match=r"^paths: the (train|validation) split has \d+ documents, fewer than the 64",
    ):
        check_corpus(cfg, process_count=64)


def _mlgen(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MLGEN_COMPILATION_CACHE="off")
    return subprocess.run(
        [sys.executable, "-m", "mlgen", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_command_prints_no_traceback_unless_debug(paths):
    """As a user runs it: one line and status 2. ``--debug`` raises the error (its traceback)."""
    plain = _mlgen("generate", paths["new"], "--prompt", "hi")
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.endswith(
        f"mlgen generate: error: workdir: no such directory {paths['new']!r}\n"
    )
    assert "Traceback" not in plain.stderr
    with pytest.raises(InputError, match="^workdir: no such directory"):
        main(["--debug", "--compilation-cache", "off", "generate", paths["new"], "--prompt", "hi"])
    assert not Path(paths["new"]).exists()


def test_restore_checks_the_workdir_before_orbax_creates_anything(paths):
    with pytest.raises(InputError, match="^workdir: no such directory"):
        mlgen.restore(paths["new"])
    assert not Path(paths["new"]).exists()
    with pytest.raises(InputError, match="holds no checkpoint"):
        mlgen.restore(paths["empty"])
    assert not (Path(paths["empty"]) / "checkpoints").exists()
    assert dataclasses.is_dataclass(mlgen.restore(paths["lm"]).config)
