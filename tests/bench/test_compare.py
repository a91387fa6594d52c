"""``mlgen bench compare`` and the peers' shapes: the table, the README rewrite and the
alternating driver, with fake peers (tiny scripts that print a JSON line), so no torch runs.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

import pytest

from mlgen.bench import compare, run
from mlgen.bench.shapes import LM_GENERATE, LM_TRAIN, UNET_TRAIN
from mlgen.config import InputError
from mlgen.train.errors import RunError

SHAPES = {"lm_train.py": LM_TRAIN, "lm_generate.py": LM_GENERATE, "unet_train.py": UNET_TRAIN}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_shape_argv_parses_back_to_the_defaults(shape):
    ap = argparse.ArgumentParser()
    shape.add_flags(ap)
    assert vars(ap.parse_args(shape.argv())) == vars(ap.parse_args([]))
    assert vars(ap.parse_args([])) == {
        k: list(v) if isinstance(v, tuple) else v for k, v in shape.flags
    }


def _defaults(script: pathlib.Path) -> dict:
    """``--flag`` -> default of each ``add_argument`` call in a peer script."""
    out = {}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            default = [k.value for k in node.keywords if k.arg == "default"]
            if default:
                out[node.args[0].value] = ast.literal_eval(default[0])
    return out


@pytest.mark.parametrize("script", [*SHAPES, "jax_minimal_lm_train.py"])
def test_shapes_are_the_peers_defaults(script):
    path = compare.DEFAULT_PEERS / script
    if not path.is_file():
        # Not covered then: that the peers' argparse defaults still equal bench/shapes.py. The
        # peers live in ../shared beside the checkout (CI has them); a bare clone does not.
        pytest.skip(
            f"no peer scripts at {compare.DEFAULT_PEERS} (../shared is not beside this checkout); "
            "not covered: that the peers' default shapes equal mlgen.bench.shapes"
        )
    shape = SHAPES.get(script, LM_TRAIN)
    defaults = _defaults(path)
    for name, v in shape.flags:
        assert defaults["--" + name.replace("_", "-")] == (list(v) if isinstance(v, tuple) else v)


def _pairing(name: str, peer_cmd, mlgen_cmd) -> compare.Pairing:
    return compare.Pairing(
        name=name,
        bench="train (GPT-2)",
        peer="transformers `lm_train.py`",
        shape="layers 6, width 384",
        unit="tokens/s",
        key="tokens_per_s",
        peer_cmd=tuple(peer_cmd),
        mlgen_cmd=tuple(mlgen_cmd),
    )


MACHINE = compare.Machine(
    cpu="AMD EPYC",
    cores=2,
    date="2026-12-02 10:00 UTC",
    commit="abc1234+dirty",
    versions=(("jax", "0.10.2"), ("torch", "2.13.0")),
)


def test_render():
    c = compare.Comparison(
        pairing=_pairing("a", ["p"], ["m"]),
        mlgen=(1600.0, 1400.0, 1500.0),
        peer=(2000.0, 1900.0, 2100.0),
        loads=(3.2, 1.5, 2.0),
    )
    out = compare.render([c], MACHINE, command="mlgen bench compare --rounds 3")
    lines = out.splitlines()
    assert lines[0].startswith("Measured 2026-12-02 10:00 UTC on AMD EPYC, 2 cores, ")
    assert "load average 1.5-3.2 over the runs" in lines[0]
    assert "mlgen abc1234+dirty, jax 0.10.2, torch 2.13.0." in lines[0]
    assert "median of 3 runs" in lines[0]
    assert "Regenerate: `mlgen bench compare --rounds 3`" in lines
    assert lines[-2].startswith("| --- |")
    assert lines[-1] == (
        "| train (GPT-2) | transformers `lm_train.py` | layers 6, width 384 | 1,500 | 2,000 | "
        "tokens/s | 0.75 | 1,600 1,400 1,500 / 2,000 1,900 2,100 |"
    )


def test_rewrite_section():
    s, e = compare.START, compare.END
    text = f"# R\n\n## Benchmarks\n\nintro\n\n{s}\nold table\nmore\n{e}\n\n## Next\n"
    new = compare.rewrite_section(text, "| new |\n")
    assert new == f"# R\n\n## Benchmarks\n\nintro\n\n{s}\n| new |\n{e}\n\n## Next\n"
    assert compare.rewrite_section(new, "| new |\n") == new  # regenerated in place
    for bad in ("no markers", f"{e}\n{s}\n", f"{s}\n{s}\n{e}\n", f"{s}\n"):
        with pytest.raises(ValueError, match="bench-table:start"):
            compare.rewrite_section(bad, "x")


FAKE = """
import json, pathlib, sys
side, log, values = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3].split(",")
runs = log.read_text().split() if log.exists() else []
log.write_text(" ".join([*runs, side]))
print("some output that is no JSON")
print(json.dumps({"tokens_per_s": float(values[runs.count(side)])}))
"""


def test_measure_alternates_and_takes_medians(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]

    def cmd(log, side, values):
        return [sys.executable, str(fake), side, str(log), values]

    rows = [
        _pairing("a", cmd(logs[0], "peer", "10,30,20"), cmd(logs[0], "mlgen", "5,1,3")),
        _pairing("b", cmd(logs[1], "peer", "4,4,4"), cmd(logs[1], "mlgen", "8,2,6")),
    ]
    seen = []
    a, b = compare.measure(rows, 3, log=seen.append)
    assert logs[0].read_text() == "peer mlgen peer mlgen peer mlgen"
    assert logs[1].read_text() == "peer mlgen peer mlgen peer mlgen"
    assert [(d["pairing"], d["round"], d["side"]) for d in seen[:3]] == [
        ("a", 1, "peer"),
        ("a", 1, "mlgen"),
        ("a", 2, "peer"),
    ]
    assert a.peer == (10, 30, 20) and a.mlgen == (5, 1, 3) and a.ratio == pytest.approx(3 / 20)
    assert b.ratio == pytest.approx(6 / 4) and len(b.loads) == 6


def test_measure_says_which_run_failed(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('boom: no torch', file=sys.stderr)\nsys.exit(3)\n")
    rows = [_pairing("a", [sys.executable, str(bad)], ["unused"])]
    with pytest.raises(RunError, match=r"bad\.py: exit status 3: boom: no torch"):
        compare.measure(rows, 1)
    other = tmp_path / "other.py"
    other.write_text("print('{\"images_per_s\": 3.0}')\n")
    with pytest.raises(RunError, match=r"reported tokens_per_s=None, not a rate > 0"):
        compare.measure([_pairing("a", [sys.executable, str(other)], ["unused"])], 1)


@pytest.fixture
def peers(tmp_path) -> pathlib.Path:
    d = tmp_path / "peers"
    d.mkdir()
    for script in [*SHAPES, "jax_minimal_lm_train.py", "maxtext_train_cpu.sh"]:
        (d / script).write_text("")
    return d


def test_flag_errors_name_the_flag(peers, tmp_path):
    def error(*argv):
        with pytest.raises(InputError) as e:
            run("compare", list(argv))
        return str(e.value)

    py = sys.executable
    assert error("--peers", str(tmp_path / "nope")).startswith("--peers: ")
    (peers / "unet_train.py").unlink()
    assert error("--peers", str(peers), "--peers-python", py) == (
        f"--peers: no unet_train.py in {str(peers)!r}"
    )
    (peers / "unet_train.py").write_text("")
    assert error("--peers", str(peers), "--peers-python", str(tmp_path / "py")).startswith(
        "--peers-python: no python at "
    )
    assert error("--peers", str(peers), "--peers-python", py, "--rounds", "0") == (
        "--rounds: must be >= 1, got 0"
    )
    assert error("--peers", str(peers), "--peers-python", py, "--only", "train-x").startswith(
        "--only: got 'train-x'; choose from ['train-transformers', "
    )
    mt = ["--maxtext", "--maxtext-venv", str(tmp_path / "venv")]
    assert error("--peers", str(peers), "--peers-python", py, *mt).startswith(
        "--maxtext-venv: no python at "
    )
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    assert error("--peers", str(peers), "--peers-python", py, "--readme", str(readme)).startswith(
        f"--readme: {readme}: needs one <!-- bench-table:start -->"
    )
