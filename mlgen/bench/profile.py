"""Where a compiled step spends its time, op by op: a ``jax.profiler`` trace of a few steps,
each op's self time summed and grouped by what the op does in the compiled HLO.

``mlgen bench train --profile DIR`` (and ``bench diffusion``) prints the split; DIR keeps the
trace (TensorBoard's profile plugin / Perfetto open it) and the optimized HLO
(``step.hlo.txt``), so any line of the table can be looked up. On CPU every op is an XLA
thunk named after its HLO instruction (``ynn_fusion.3``, ``copy_bitcast_fusion.4``); the
categories come from the instruction and the computation a fusion calls.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

import jax
from etils import epath

# A category per op: the first rule whose pattern is in the op's HLO (its own line and, for a
# fusion, the body it calls) wins; the order matters (a fusion with a dot in it is a matmul).
_RULES = (
    ("matmul", (" dot(", " convolution(", "__onednn", "ynn_fusion", "xnn_fusion")),  # + names
    ("scatter (embedding / index gradients)", (" scatter(",)),
    ("gather", (" gather(",)),
    ("transpose (physical copy)", (" transpose(",)),
    ("reduce (norms, softmax, loss, sums)", (" reduce(", " reduce-window(")),
    ("dynamic-update-slice (scan residuals, caches)", ("dynamic-update-slice(",)),
    ("copy", (" copy(",)),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")),
)
# Ops whose span contains other ops' (a while loop's covers its body's): not counted.
_CONTAINERS = (" while(", " conditional(", " call(")


@dataclasses.dataclass(frozen=True)
class OpGroup:
    category: str
    ms_per_step: float
    share: float  # of the summed op time
    top: tuple[tuple[str, float], ...]  # (op, ms per step), largest first


def _hlo_index(hlo_text: str) -> Callable[[str], str]:
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M)
    }
    lines = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            lines[m.group(1)] = line
    cache: dict[str, str] = {}

    def category(op: str) -> str:
        if op not in cache:
            line = lines.get(op)
            opcode = re.search(r" = .*?\b([a-z][\w\-]*)\(", line) if line else None
            if opcode is None or f" {opcode.group(1)}(" in _CONTAINERS:
                cache[op] = ""  # a runtime span, or a loop containing ops counted themselves
            else:
                # The op's own name and opcode and, for a fusion, the body it calls; not its
                # operands (a copy of a dot's output is no matmul).
                called = re.search(r"calls=%([\w.\-]+)", line)
                text = f"{op} {opcode.group(1)}(" + (
                    bodies.get(called.group(1), "") if called else ""
                )
                cache[op] = next(
                    (name for name, pats in _RULES if any(p in text for p in pats)), "elementwise"
                )
        return cache[op]

    return category


def op_split(hlo_text: str, trace_dir: str, steps: int) -> list[OpGroup]:
    """The op time of ``steps`` traced steps, per category, largest first."""
    files = sorted(epath.Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = jax.profiler.ProfileData.from_serialized_xspace(files[-1].read_bytes())
    category = _hlo_index(hlo_text)
    total: collections.Counter = collections.Counter()
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                name = ev.name
                # Op events only: the executor's own spans contain them, "end: op" marks are ~0.
                if name.startswith(("ThunkExecutor", "end: ", "$", "Threadpool", "Slinky")):
                    continue
                if plane.name.startswith("/host:CPU") and not line.name.startswith("tf_XLA"):
                    continue
                c = category(name)
                if not c:
                    continue
                total[c] += ev.duration_ns
                per_op[c][name] += ev.duration_ns
    whole = sum(total.values()) or 1
    return [
        OpGroup(
            c,
            ns / 1e6 / steps,
            ns / whole,
            tuple((op, t / 1e6 / steps) for op, t in per_op[c].most_common(3)),
        )
        for c, ns in total.most_common()
    ]


def format_split(groups: list[OpGroup]) -> str:
    total = sum(g.ms_per_step for g in groups)
    rows = [f"{'op time per step, by kind':46s} {'ms':>9s} {'share':>6s}  largest ops (ms)"]
    for g in groups:
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in g.top)
        rows.append(f"{g.category:46s} {g.ms_per_step:9.1f} {100 * g.share:5.1f}%  {top}")
    rows.append(f"{'all ops (summed over threads)':46s} {total:9.1f}")
    return "\n".join(rows)
