"""``mlgen bench compare``: mlgen against its peers, side by side, as a README table.

Each pairing is one of mlgen's benchmarks and the peer script (``../shared/peers``) that
times the same work in the library a user would otherwise pick, both on the same
:mod:`mlgen.bench.shapes` flags. The two run alternately, peer then mlgen, ``--rounds`` times,
each run a fresh process: neither side inherits the other's threads, allocator or compiled
code, and alternating spreads the drift of a shared machine's load over both sides instead of
handing it to whichever ran second. Each run reports its own median step; the table shows the
median of each side's runs and their ratio, mlgen ÷ peer (all values are rates: above 1, mlgen
is faster), with the machine, its load average over the runs, the date and mlgen's commit.

``--readme FILE`` rewrites the part of FILE between :data:`START` and :data:`END` with it, so
the published table is regenerated in place by one command. Rendering and rewriting are pure
functions (:func:`render`, :func:`rewrite_section`); :func:`measure` takes the runner, so a
test drives it with fake peers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from mlgen.bench.shapes import LM_GENERATE, LM_TRAIN, UNET_TRAIN
from mlgen.config import InputError
from mlgen.train.errors import RunError

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_PEERS = REPO.parent / "shared" / "peers"
# setup.sh's and maxtext_setup.sh's own defaults
DEFAULT_PEERS_PYTHON = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mlgen-peers-venv/bin/python")
DEFAULT_MAXTEXT_VENV = "/tmp/maxtext-venv"
# MaxText's median over its own per-step log after SKIP steps (the peers README's setting);
# the script's own 30/10 adds a minute per run for no steadier a median.
MAXTEXT_ENV = (("STEPS", "20"), ("SKIP", "6"))

Runner = Callable[[Sequence[str], Mapping[str, str]], dict]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pairing:
    """One row of the table: an mlgen benchmark and the peer it is measured against.

    Attributes:
      name: what ``--only`` calls it.
      bench, peer, shape, unit: the row's cells.
      key: the JSON field that both sides' last JSON line reports (a rate).
      peer_cmd, mlgen_cmd: the two commands, each run as its own process.
      peer_env: environment variables added for the peer.
    """

    name: str
    bench: str
    peer: str
    shape: str
    unit: str
    key: str
    peer_cmd: tuple[str, ...]
    mlgen_cmd: tuple[str, ...]
    peer_env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Comparison:
    """A pairing's measured values, one per round and side, and the 1-minute load average
    after each run."""

    pairing: Pairing
    mlgen: tuple[float, ...]
    peer: tuple[float, ...]
    loads: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        """median(mlgen) / median(peer)."""
        return statistics.median(self.mlgen) / statistics.median(self.peer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Machine:
    """Where and with what the table was measured (its header line)."""

    cpu: str
    cores: int
    date: str
    commit: str
    versions: tuple[tuple[str, str], ...]


def pairings(
    peers: pathlib.Path,
    *,
    peers_python: str,
    mlgen_python: str = sys.executable,
    maxtext_venv: str | None = None,
) -> list[Pairing]:
    """The table's rows: train vs transformers and vs hand-written JAX, generate vs
    transformers, diffusion vs diffusers, and (``maxtext_venv`` given) mlgen's llama with full
    remat vs MaxText's own loop on the same model."""
    bench = (mlgen_python, "-m", "mlgen", "bench")
    lm = (*LM_TRAIN.argv(),)
    rows = [
        Pairing(
            name="train-transformers",
            bench="train (GPT-2)",
            peer="transformers `lm_train.py`",
            shape=LM_TRAIN.describe(),
            unit="tokens/s",
            key="tokens_per_s",
            peer_cmd=(peers_python, str(peers / "lm_train.py"), *lm),
            mlgen_cmd=(*bench, "train", *lm),
        ),
        Pairing(
            name="train-jax",
            bench="train (GPT-2)",
            peer="hand-written JAX + optax `jax_minimal_lm_train.py`",
            shape=LM_TRAIN.describe(),
            unit="tokens/s",
            key="tokens_per_s",
            peer_cmd=(mlgen_python, str(peers / "jax_minimal_lm_train.py"), *lm),
            mlgen_cmd=(*bench, "train", *lm),
        ),
        Pairing(
            name="generate-transformers",
            bench="generate (GPT-2, KV cache, top-k 50)",
            peer="transformers `lm_generate.py`",
            shape=LM_GENERATE.describe(),
            unit="new tokens/s",
            key="new_tokens_per_s",
            peer_cmd=(peers_python, str(peers / "lm_generate.py"), *LM_GENERATE.argv()),
            mlgen_cmd=(*bench, "generate", *LM_GENERATE.argv()),
        ),
        Pairing(
            name="diffusion-diffusers",
            bench="diffusion (UNet, DDPM eps)",
            peer="diffusers `unet_train.py`",
            shape=UNET_TRAIN.describe(),
            unit="images/s",
            key="images_per_s",
            peer_cmd=(peers_python, str(peers / "unet_train.py"), *UNET_TRAIN.argv()),
            mlgen_cmd=(*bench, "diffusion", *UNET_TRAIN.argv()),
        ),
    ]
    if maxtext_venv is not None:
        rows.append(
            Pairing(
                name="train-maxtext",
                bench="train (llama: RMSNorm, SwiGLU 1024, RoPE; remat full)",
                peer="MaxText `maxtext_train_cpu.sh base_mlp_dim=1024` (its whole loop)",
                shape=LM_TRAIN.describe(),  # the script's fixed shape
                unit="tokens/s",
                key="tokens_per_s",
                peer_cmd=("bash", str(peers / "maxtext_train_cpu.sh"), "base_mlp_dim=1024"),
                mlgen_cmd=(*bench, "train", *lm, "--flavour", "llama", "--remat", "full"),
                peer_env=(("MAXTEXT_VENV", maxtext_venv), *MAXTEXT_ENV),
            )
        )
    return rows


def run_json(cmd: Sequence[str], env: Mapping[str, str]) -> dict:
    """Runs ``cmd`` (with ``env`` added to this process's environment) and returns the last
    JSON line it printed; a failed run or one without a JSON line is a :class:`RunError`."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **env})
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise RunError(f"bench compare: {shlex.join(cmd)}: exit status {p.returncode}: {tail}")
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RunError(f"bench compare: {shlex.join(cmd)} printed no JSON line")
    return json.loads(lines[-1])


def measure(
    rows: Sequence[Pairing],
    rounds: int,
    *,
    run: Runner = run_json,
    log: Callable[[dict], None] | None = None,
) -> list[Comparison]:
    """Runs each pairing's peer and mlgen alternately, ``rounds`` times each.

    Args:
      rows: the pairings, measured one after the other.
      rounds: runs per side; the order within a pairing is peer, mlgen, peer, mlgen, ...
      run: runs one command and returns its JSON line (:func:`run_json`; a test passes a fake).
      log: called after each run with ``{"pairing", "round", "side", key, "load"}``.

    Returns:
      One :class:`Comparison` per pairing, values in run order.
    """
    out = []
    for p in rows:
        values: dict[str, list[float]] = {"peer": [], "mlgen": []}
        loads = []
        for r in range(rounds):
            for side, cmd, env in (("peer", p.peer_cmd, p.peer_env), ("mlgen", p.mlgen_cmd, ())):
                result = run(cmd, dict(env))
                v = result.get(p.key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                    raise RunError(
                        f"bench compare: {shlex.join(cmd)} reported {p.key}={v!r}, not a rate > 0"
                    )
                values[side].append(float(v))
                loads.append(os.getloadavg()[0])
                if log is not None:
                    log(
                        {
                            "pairing": p.name,
                            "round": r + 1,
                            "side": side,
                            p.key: v,
                            "load": loads[-1],
                        }
                    )
        out.append(
            Comparison(
                pairing=p, mlgen=(*values["mlgen"],), peer=(*values["peer"],), loads=(*loads,)
            )
        )
    return out


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def render(comparisons: Sequence[Comparison], machine: Machine, *, command: str) -> str:
    """The README section: a header line (machine, load, date, commit, versions), the command
    that regenerates it, and one table row per comparison."""
    loads = [x for c in comparisons for x in c.loads]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not measured"
    rounds = sorted({len(c.mlgen) for c in comparisons})
    runs_of = f"{'/'.join(map(str, rounds))} run{'' if rounds == [1] else 's'}"
    versions = ", ".join(f"{name} {v}" for name, v in machine.versions)
    lines = [
        f"Measured {machine.date} on {machine.cpu}, {machine.cores} cores, 1-minute load average "
        f"{load} over the runs (above {machine.cores}, other work competed for the cores); mlgen "
        f"{machine.commit}, {versions}. Each value is the median of "
        f"{runs_of}, each a fresh process, peer and mlgen alternated; "
        "each run reports its own median step. Ratio = mlgen ÷ peer: above 1, mlgen is faster.",
        "",
        f"Regenerate: `{command}`",
        "",
        "| bench | peer | shape | mlgen | peer | unit | mlgen ÷ peer | runs: mlgen / peer |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for c in comparisons:
        p = c.pairing
        runs = f"{' '.join(map(_num, c.mlgen))} / {' '.join(map(_num, c.peer))}"
        lines.append(
            f"| {p.bench} | {p.peer} | {p.shape} | {_num(statistics.median(c.mlgen))} | "
            f"{_num(statistics.median(c.peer))} | {p.unit} | {c.ratio:.2f} | {runs} |"
        )
    return "\n".join(lines) + "\n"


def rewrite_section(text: str, body: str) -> str:
    """``text`` with what lies between its one :data:`START` and one :data:`END` line replaced
    by ``body`` (the markers stay, so the next run finds them); ValueError if they are not
    there once each, in that order."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"needs one {START} line and, after it, one {END} line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{body.strip(chr(10))}\n{END}{tail}"


def _versions(python: str, names: Sequence[str]) -> list[tuple[str, str]]:
    code = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    p = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    if p.returncode != 0:
        return [(n, "?") for n in names]
    return list(json.loads(p.stdout).items())


def _git(*args: str) -> str:
    p = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else ""


def machine(*, peers_python: str | None, maxtext_python: str | None) -> Machine:
    """This machine, now, and the versions each side runs (from each python's metadata)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    versions = _versions(sys.executable, ["jax", "flax"])
    if peers_python is not None:
        versions += _versions(peers_python, ["torch", "transformers", "diffusers"])
    if maxtext_python is not None:
        (_, mt), (_, jax) = _versions(maxtext_python, ["maxtext", "jax"])
        versions.append(("maxtext", f"{mt} (jax {jax})"))
    now = datetime.datetime.now(datetime.timezone.utc)
    return Machine(
        cpu=cpu,
        cores=os.cpu_count() or 0,
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        versions=tuple(versions),
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mlgen bench compare", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--peers",
        metavar="DIR",
        default=str(DEFAULT_PEERS),
        help="the peer scripts' folder (default: ../shared/peers beside the mlgen checkout)",
    )
    ap.add_argument(
        "--peers-python",
        metavar="PYTHON",
        default=DEFAULT_PEERS_PYTHON,
        help="python of the venv that peers/setup.sh makes (torch, transformers, diffusers; "
        f"default {DEFAULT_PEERS_PYTHON}, setup.sh's own)",
    )
    ap.add_argument(
        "--maxtext",
        action="store_true",
        help="also mlgen llama remat full vs MaxText's own loop (3-6 min a round on 2 cores)",
    )
    ap.add_argument(
        "--maxtext-venv",
        metavar="DIR",
        default=DEFAULT_MAXTEXT_VENV,
        help=f"the venv peers/maxtext_setup.sh makes (default {DEFAULT_MAXTEXT_VENV})",
    )
    ap.add_argument("--rounds", metavar="N", type=int, default=3, help="runs per side, alternated")
    ap.add_argument(
        "--only",
        metavar="NAMES",
        default=None,
        help="comma-separated pairings: train-transformers, train-jax, generate-transformers, "
        "diffusion-diffusers, train-maxtext (default: all; train-maxtext with --maxtext)",
    )
    ap.add_argument(
        "--readme",
        metavar="FILE",
        default=None,
        help=f"rewrite the table between its {START} and {END} lines",
    )
    return ap.parse_args(argv)


def run(argv: list[str]) -> None:
    """``mlgen bench compare [flags]``: a JSON line per run, then the table (and the README)."""
    a = _parse(argv)
    if a.rounds < 1:
        raise InputError(f"--rounds: must be >= 1, got {a.rounds}")
    peers = pathlib.Path(a.peers)
    if not peers.is_dir():
        raise InputError(f"--peers: {str(peers)!r} is not a folder (the peer scripts')")
    maxtext_python = os.path.join(a.maxtext_venv, "bin", "python") if a.maxtext else None
    rows = pairings(
        peers, peers_python=a.peers_python, maxtext_venv=a.maxtext_venv if a.maxtext else None
    )
    if a.only is not None:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        known = [p.name for p in rows]
        if not names or any(n not in known for n in names):
            raise InputError(f"--only: got {a.only!r}; choose from {known}")
        rows = [p for p in rows if p.name in names]
    for p in rows:
        if not pathlib.Path(p.peer_cmd[1]).is_file():
            raise InputError(f"--peers: no {pathlib.Path(p.peer_cmd[1]).name} in {str(peers)!r}")
    uses_peers_python = any(p.peer_cmd[0] == a.peers_python for p in rows)
    if uses_peers_python and not os.access(a.peers_python, os.X_OK):
        raise InputError(
            f"--peers-python: no python at {a.peers_python!r} (make it: {peers}/setup.sh VENV)"
        )
    if maxtext_python is not None and not os.access(maxtext_python, os.X_OK):
        raise InputError(
            f"--maxtext-venv: no python at {maxtext_python!r} (make it: {peers}/maxtext_setup.sh)"
        )
    if a.readme is not None:
        try:
            rewrite_section(pathlib.Path(a.readme).read_text(), "")
        except (OSError, ValueError) as e:
            raise InputError(f"--readme: {a.readme}: {e}") from None

    info = machine(
        peers_python=a.peers_python if uses_peers_python else None, maxtext_python=maxtext_python
    )
    results = measure(rows, a.rounds, log=lambda d: print(json.dumps(d), flush=True))
    table = render(results, info, command=shlex.join(["mlgen", "bench", "compare", *argv]))
    print(table, end="")
    if a.readme is not None:
        path = pathlib.Path(a.readme)
        path.write_text(rewrite_section(path.read_text(), table))
        print(f"bench compare: rewrote the table in {a.readme}", file=sys.stderr)
