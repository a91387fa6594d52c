"""``mlgen plan``: will a run fit, how fast would its step be, what would fail — before launch.

:func:`plan` builds the whole train step exactly as ``mlgen train`` does (the same
``runs.setup``: mesh, rules, task, optimizer, sharded state; the same ``trainer.jit_step``),
with abstract state only, and compiles it ahead of time: for a TPU pod slice through libtpu's
compiler on this host (``topology="v5p:4x4x4"``, no TPU needed), or for the local devices.

What it reports, per chip:

- memory: parameter, optimizer-state, EMA, model-state and batch bytes (the shards of the
  abstract state), the compiler's own argument / temp (activations) / output / alias bytes and
  their total ``arguments + outputs + temp - aliased`` (MaxText's formula) against a budget;
- FLOPs per step from the compiled program's cost analysis, next to the model FLOPs of the
  family's formula (``mlgen.train.throughput``) and their ratio (> 1: remat recompute, the
  optimizer, softmax and norms). XLA counts a scanned layer stack's body once, so for models
  that scan their layers the step's FLOPs and bytes are extrapolated from two extra compiles
  with the layers unrolled (``num_layers`` 2 and 4; per layer by difference):
  ``full = F(2) + (L - 2) * (F(4) - F(2)) / 2``;
- a roofline step time ``max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth)`` from the
  chip table in ``mlgen.train.throughput`` (``CHIPS``; on CPU the measured matmul peak and no
  bandwidth term), the MFU it implies (model FLOPs / (step time x peak)), and libtpu's own
  estimate (``optimal_seconds``) where the compiler gives one;
- lower and compile times, and which attention backend each attention call compiled to;
- every problem found before launch, one line each naming the field (a config that does not
  validate against the mesh, a kernel that cannot take the shapes, memory over budget).

:func:`decode_cache` sizes what a decoder keeps per sequence at a given context length (``mlgen
plan --decode-context N``): the caches its layers' ``init_cache`` make (KV caches of attention
layers, conv + SSM states of state-space layers), from their shapes alone, nothing allocated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from mlgen import config as config_lib
from mlgen import runs, sharding
from mlgen.config import ConfigError, InputError, check
from mlgen.models.family import family_of
from mlgen.ops.attention import describe, recording
from mlgen.tasks.base import policy as run_policy
from mlgen.train import throughput, trainer

GIB = 2**30
UNROLLED = (2, 4)  # layer counts of the unrolled compiles the per-layer cost comes from


@dataclasses.dataclass
class Compiled:
    """One ahead-of-time compile of a train step: its times and what the compiler says."""

    lower_s: float
    compile_s: float
    memory: dict[str, int]  # argument / output / temp / alias / generated_code bytes per chip
    flops: float  # per chip, as the cost analysis counts them
    bytes_accessed: float
    optimal_seconds: float | None
    attention: str


@dataclasses.dataclass
class Plan:
    """What :func:`plan` found. ``problems`` empty means the run can be launched."""

    target: str  # "v5p:4x4x4" or "local"
    chips: int
    device_kind: str
    mesh: dict[str, int]
    params: int
    tokens_per_step: int  # examples x tokens per example (examples when a task has no tokens)
    examples_per_step: int
    state_bytes: dict[str, int]  # per chip: params / opt_state / ema / model_state / batch
    compiled: Compiled | None
    total_bytes: int  # per chip, the compiler's arguments + outputs + temp - aliased
    budget_bytes: float | None
    flops_per_chip: float  # per step (extrapolated over the layers when they are scanned)
    bytes_per_chip: float
    flops_method: str
    model_flops_per_chip: float
    peak_flops: float
    peak_source: str
    hbm_bytes_per_s: float | None
    roofline_s: float
    mfu: float
    optimal_seconds: float | None
    problems: list[str]
    notes: list[str]
    unrolled: dict[int, Compiled] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def report(self) -> str:
        """The human-readable plan (``mlgen plan``'s output)."""
        g = lambda b: f"{b / GIB:.3f}"  # noqa: E731
        lines = [
            f"mlgen plan: {self.chips} x {self.device_kind} ({self.target}), mesh {self.mesh}",
            f"  model: {self.params / 1e9:.3f}B parameters; {self.tokens_per_step:,} "
            + ("tokens" if self.tokens_per_step != self.examples_per_step else "examples")
            + " per step",
        ]
        sb = self.state_bytes
        lines.append(
            "  per chip, GiB: "
            + "  ".join(f"{k} {g(v)}" for k, v in sb.items())
            + (
                ""
                if self.compiled is None
                else f"  | compiler: arguments {g(self.compiled.memory['argument'])}"
                f"  temp {g(self.compiled.memory['temp'])}"
                f"  output {g(self.compiled.memory['output'])}"
                f"  aliased {g(self.compiled.memory['alias'])}"
            )
        )
        if self.compiled is not None:
            budget = (
                f" of a {self.budget_bytes / GIB:.1f} GiB budget"
                f" ({100 * self.total_bytes / self.budget_bytes:.0f}%)"
                if self.budget_bytes
                else " (no budget known for this device)"
            )
            lines.append(f"  total per chip: {g(self.total_bytes)} GiB{budget}")
            lines.append(
                f"  FLOPs per step per chip: {self.flops_per_chip:.4g} compiled "
                f"({self.flops_method})"
                + (
                    f"; model {self.model_flops_per_chip:.4g} by formula; "
                    f"ratio {self.flops_per_chip / self.model_flops_per_chip:.3f}"
                    if self.model_flops_per_chip
                    else ""
                )
            )
            bw = (
                f", {self.bytes_per_chip:.4g} B / {self.hbm_bytes_per_s / 1e9:.0f} GB/s"
                f" = {self.bytes_per_chip / self.hbm_bytes_per_s:.4g} s"
                if self.hbm_bytes_per_s
                else " (no HBM bandwidth term on this device)"
            )
            if self.roofline_s:
                lines.append(
                    f"  roofline step: max({self.flops_per_chip:.4g} FLOP / "
                    f"{self.peak_flops / 1e12:.1f} TFLOP/s = "
                    f"{self.flops_per_chip / self.peak_flops:.4g} s{bw}) = {self.roofline_s:.4g} s"
                    + (f" -> MFU {100 * self.mfu:.1f}%" if self.mfu else "")
                    + f"  (peak: {self.peak_source})"
                )
            if self.optimal_seconds is not None:
                lines.append(
                    f"  compiler's estimate (optimal_seconds): {self.optimal_seconds:.4g} s"
                )
            times = f"lower {self.compiled.lower_s:.1f} s, compile {self.compiled.compile_s:.1f} s"
            for n, c in self.unrolled.items():
                times += f"; {n} layers unrolled: {c.lower_s + c.compile_s:.1f} s"
            lines.append(f"  compile: {times}")
            lines.append(f"  attention: {self.compiled.attention}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"  problems ({len(self.problems)}):")
            lines += [f"    {p}" for p in self.problems]
        else:
            lines.append("  problems: none")
        return "\n".join(lines)


@dataclasses.dataclass
class DecodeCache:
    """A decoder's cache for ``batch`` sequences of ``context`` tokens, all chips together."""

    context: int
    batch: int
    dtype: str
    total_bytes: int
    by_kind: dict[str, int]  # "attention (KV)" / "ssm (conv + state)" -> bytes
    layers: dict[str, int]  # the same kinds -> number of layers

    def report(self) -> str:
        kinds = ", ".join(
            f"{k}: {self.layers[k]} layers, {v / 1e9:.3f} GB" for k, v in self.by_kind.items()
        )
        return (
            f"  decode cache at {self.context:,} tokens x {self.batch} sequence(s), "
            f"{self.dtype}: {self.total_bytes / 1e9:.3f} GB ({self.total_bytes / GIB:.3f} GiB; "
            f"{kinds})"
        )


def decode_cache(
    config: config_lib.Config | str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    context: int,
    batch: int = 1,
) -> DecodeCache:
    """The decode-time cache of the model ``config`` describes, at ``context`` tokens.

    Built inside ``jax.eval_shape`` (model and caches are shapes only), in the run's compute
    dtype (``precision.compute``), for any size of model. Raises ConfigError naming the field
    for a model that is no decoder.
    """
    check(context > 0, "--decode-context", f"must be > 0 tokens, got {context}", InputError)
    check(batch > 0, "--decode-batch", f"must be > 0, got {batch}", InputError)
    cfg = config_lib.load(config, overrides)
    family = family_of(cfg.model)
    check(family.kind == "decoder", "model", f"{family.name} is no decoder: it has no cache")
    pol = run_policy(cfg)

    def caches():
        model = family.build(cfg.model, nnx.Rngs(0), pol)
        return model.init_cache(batch, context)

    layers = jax.eval_shape(caches)
    by_kind: dict[str, int] = {}
    count: dict[str, int] = {}
    for layer in layers:
        kind = "ssm (conv + state)" if hasattr(layer, "ssm") else "attention (KV)"
        nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(layer))
        by_kind[kind] = by_kind.get(kind, 0) + nbytes
        count[kind] = count.get(kind, 0) + 1
    return DecodeCache(
        context=context,
        batch=batch,
        dtype=str(np.dtype(pol.dtype)),
        total_bytes=sum(by_kind.values()),
        by_kind=by_kind,
        layers=count,
    )


def topology_devices(topology: str) -> list:
    """The devices of a TPU pod slice (``"v5p:4x4x4"``, ``"v5e:2x2"``), from libtpu's compiler:
    nothing is opened, the slice need not exist."""
    check(
        re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", topology) is not None,
        "--topology",
        f"{topology!r} is no TPU slice name; name one like v5p:4x4x4 or v5e:2x2",
        InputError,
    )
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # we compile only
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise InputError(
            f"--topology: cannot describe TPU slice {topology!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "install libtpu (pip install 'mlgen[tpu]') and name a slice like v5p:4x4x4"
        ) from None


def plan(
    config: config_lib.Config | str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    topology: str | None = None,
    budget_gib: float | None = None,
    devices: Sequence | None = None,
    unrolled_flops: bool | None = None,
) -> Plan:
    """Plans the run ``config`` describes (see the module docstring).

    Args:
      config: a Config or a config file, with dotted ``overrides``.
      topology: a TPU slice to compile for (libtpu on this host); None = the local devices.
      budget_gib: per-chip memory budget; default the chip's HBM from the chip table.
      devices: compile for these devices instead (tests).
      unrolled_flops: also compile 2- and 4-layer unrolled versions to count the FLOPs of every
        layer of a scanned stack; default: when the model scans its layers.

    Raises:
      ConfigError: only for a topology that cannot be described; every problem of the config
        itself is returned in ``Plan.problems``.
    """
    if devices is None:
        devices = topology_devices(topology) if topology else jax.devices()
    devices = list(devices)
    target = topology or "local"
    try:
        cfg = config_lib.load(config, overrides)
    except ConfigError as e:
        return _unplanned(target, devices, None, [str(e)])
    kind = devices[0].device_kind
    chip = throughput.chip_of(devices[0])
    budget = budget_gib * GIB if budget_gib else (chip.hbm_bytes if chip else None)
    problems: list[str] = []
    try:
        s = runs.setup(cfg, devices=devices, abstract=True)
    except ConfigError as e:
        return _unplanned(target, devices, cfg, [str(e)])
    chips = len(devices)
    state_bytes = _state_bytes(s.state)
    specs = s.task.batch_spec() if s.task.batch_spec else None
    if specs is None:
        return _unplanned(target, devices, cfg, ["task: it gives no batch_spec to compile for"])
    batch = sharding.abstract_batch(specs, s.mesh, s.task.batch_axes, s.rules)
    state_bytes["batch"] = sum(_shard_bytes(x) for x in jax.tree.leaves(batch))
    examples = next(iter(specs.values()))[0][0]
    tokens = examples * (s.task.tokens_per_example or 1)
    try:
        main = _compile(s, batch)
    except ConfigError as e:
        return _unplanned(target, devices, cfg, [str(e)], state_bytes, s)
    except (ValueError, NotImplementedError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        field = "model.attention.backend" if "attention" in first else "model"
        return _unplanned(target, devices, cfg, [f"{field}: {first}"], state_bytes, s)

    flops, nbytes, optimal = main.flops, main.bytes_accessed, main.optimal_seconds
    method = "as compiled"
    layers = getattr(cfg.model, "num_layers", None)
    scanned = getattr(cfg.model, "scan_layers", False) and layers
    unrolled: dict[int, Compiled] = {}
    notes = []
    if unrolled_flops is None:
        unrolled_flops = bool(scanned)
    if unrolled_flops and layers:
        for n in UNROLLED:
            sub = dataclasses.replace(cfg.model, num_layers=n, scan_layers=False)
            sub_cfg = dataclasses.replace(cfg, model=sub)
            if getattr(cfg.objective, "loss_chunk", 0):  # a chunked loss is a loop too: the
                # same FLOPs in one piece, so that the output layer is counted whole
                sub_cfg = dataclasses.replace(
                    sub_cfg, objective=dataclasses.replace(cfg.objective, loss_chunk=0)
                )
            ss = runs.setup(sub_cfg, devices=devices, abstract=True)
            unrolled[n] = _compile(
                ss, sharding.abstract_batch(specs, ss.mesh, ss.task.batch_axes, ss.rules)
            )
        a, b = unrolled[UNROLLED[0]], unrolled[UNROLLED[1]]
        per = 1.0 / (UNROLLED[1] - UNROLLED[0])

        def extrapolate(x, y):
            return x + (layers - UNROLLED[0]) * (y - x) * per

        flops = extrapolate(a.flops, b.flops)
        nbytes = extrapolate(a.bytes_accessed, b.bytes_accessed)
        if a.optimal_seconds is not None and b.optimal_seconds is not None:
            optimal = extrapolate(a.optimal_seconds, b.optimal_seconds)
        method = (
            f"{layers} layers extrapolated from {UNROLLED[0]}- and {UNROLLED[1]}-layer "
            "unrolled compiles"
        )
    elif scanned:
        method = "as compiled: the scanned layer body counted once"
        notes.append(
            "the layers are scanned and counted once: no roofline or MFU "
            "(--unrolled-flops on counts every layer)"
        )
    model_flops = s.task.flops_per_example * examples / chips
    if not s.task.flops_per_example:
        notes.append("the model family has no FLOPs formula: MFU is not computed")
    peak_all, source = throughput.peak_flops(devices, cfg.precision.compute)
    peak = peak_all / chips  # per chip (on CPU: a share of the host's measured peak)
    bw = chip.hbm_bytes_per_s if chip else None
    counted = not (scanned and not unrolled)
    optimal = optimal if counted else None
    roofline = max(flops / peak, nbytes / bw if bw else 0.0) if counted else 0.0
    mfu = model_flops / (roofline * peak) if roofline > 0 and model_flops else 0.0
    m = main.memory
    total = m["argument"] + m["output"] + m["temp"] - m["alias"]
    if budget and total > budget:
        problems.append(
            f"memory: {total / GIB:.1f} GiB per chip exceeds the {budget / GIB:.1f} GiB budget "
            "(lower data.batch_size, set remat=full, shard more with mesh.fsdp, or raise "
            "--budget-gib)"
        )
    notes += _replicated_notes(s)
    return Plan(
        target=target,
        chips=chips,
        device_kind=kind,
        mesh=dict(s.mesh.shape),
        params=_count(s.state["params"]),
        tokens_per_step=tokens,
        examples_per_step=examples,
        state_bytes=state_bytes,
        compiled=main,
        total_bytes=total,
        budget_bytes=budget,
        flops_per_chip=flops,
        bytes_per_chip=nbytes,
        flops_method=method,
        model_flops_per_chip=model_flops,
        peak_flops=peak,
        peak_source=source,
        hbm_bytes_per_s=bw,
        roofline_s=roofline,
        mfu=mfu,
        optimal_seconds=optimal,
        problems=problems,
        notes=notes,
        unrolled=unrolled,
    )


def _compile(s: trainer.Setup, batch: dict) -> Compiled:
    rng = sharding.abstract_like(  # the run's base key, replicated as fit passes it
        jax.eval_shape(lambda: jax.random.key(0)),
        jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()),
    )
    with sharding.use(s.mesh, s.rules), recording() as calls:
        t0 = time.perf_counter()
        lowered = trainer.jit_step(s).lower(s.state, batch, rng)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    memory = {
        k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    optimal = cost.get("optimal_seconds")
    return Compiled(
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        memory=memory,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        optimal_seconds=None if optimal is None or optimal < 0 else float(optimal),
        attention=describe(calls),
    )


def _shard_bytes(x) -> int:
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def _state_bytes(state: dict) -> dict[str, int]:
    parts = {"params": "params", "opt_state": "optimizer", "ema": "ema", "model_state": "model"}
    out = {label: 0 for label in parts.values()}
    for key, sub in state.items():
        label = parts.get(key, "other")
        out[label] = out.get(label, 0) + sum(_shard_bytes(x) for x in jax.tree.leaves(sub))
    return out


def _count(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _replicated_notes(s: trainer.Setup) -> list[str]:
    """Parameters whose rules asked for a split the sizes do not allow (replicated instead)."""
    notes = []
    flat = jax.tree_util.tree_flatten_with_path(s.state["params"])[0]
    for path, x in flat:
        spec = x.sharding.spec if hasattr(x.sharding, "spec") else ()
        used = {a for p in spec if p for a in ((p,) if isinstance(p, str) else p)}
        if not used and x.ndim >= 2 and math.prod(x.shape) * x.dtype.itemsize >= 64 * 2**20:
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            notes.append(f"{name} {tuple(x.shape)} is replicated on every chip")
    return notes[:8]


def _unplanned(target, devices, cfg, problems, state_bytes=None, s=None) -> Plan:
    return Plan(
        target=target,
        chips=len(devices),
        device_kind=devices[0].device_kind,
        mesh=dict(s.mesh.shape) if s is not None else {},
        params=_count(s.state["params"]) if s is not None else 0,
        tokens_per_step=0,
        examples_per_step=0,
        state_bytes=state_bytes or {},
        compiled=None,
        total_bytes=0,
        budget_bytes=None,
        flops_per_chip=0.0,
        bytes_per_chip=0.0,
        flops_method="",
        model_flops_per_chip=0.0,
        peak_flops=0.0,
        peak_source="",
        hbm_bytes_per_s=None,
        roofline_s=0.0,
        mfu=0.0,
        optimal_seconds=None,
        problems=list(problems),
        notes=[],
    )
