"""Typed experiment configs: frozen dataclasses, `key=value` overrides, one-line errors.

A config file (``configs/**/*.py``) defines ``get_config() -> Config``. The CLI and
``mlgen.train`` load it with :func:`load`, apply dotted overrides
(``model.num_layers=4``, ``mesh.data=-1``, ``optim.lr=1e-3``) and validate everything
before JAX compiles anything. Any mistake is a :class:`ConfigError` whose message is one
line that starts with the dotted name of the field at fault.

Sections whose content depends on what is trained (``model``, ``data``, ``objective``)
hold any frozen dataclass with a ``validate()`` method that is registered under a stable
name (:func:`register`); the model families, data sources and objectives define their own.
Overrides are typed by the class of the instance actually in the config, so
``model.num_heads=x`` is an error for any model.

Two run-wide policies live at the top, for every model family: ``precision`` (parameter,
compute and optimizer-state dtypes: ``precision.compute=bfloat16``) and ``remat`` (what each
block keeps for the backward pass: ``remat=full``).

This module is a leaf: it imports nothing of mlgen. Tasks register their cross-section
checks here (:func:`register_task`), so ``Config.validate`` reaches them by name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Literal

from etils import epath


class ConfigError(ValueError):
    """A bad config value. ``str(err)`` is one line naming the field."""


class InputError(ConfigError):
    """A bad input that is no config field: a command-line flag (``--top-p: ...``), a workdir
    (``workdir: ...``), a file. ``str(err)`` is one line naming it; the CLI prints it without a
    traceback (``mlgen --debug`` shows one)."""


def check(cond: bool, field: str, msg: str, error: type[ConfigError] = ConfigError) -> None:
    """Raises ``error("field: msg")`` (a ConfigError) unless ``cond``."""
    if not cond:
        raise error(f"{field}: {msg}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(v > 0, n, f"must be > 0, got {v!r}")


# ----------------------------------------------------------------------------- registry
# Section classes (model, data, objective configs) under stable names: a saved config stores the
# name, so moving a class to another module never breaks a run directory. Task specs under their
# names: ``Config.validate`` runs the task's cross-section checks through this table, so this
# module imports nothing of mlgen (the tasks register themselves when ``mlgen.tasks`` is imported).
_SECTIONS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}  # old "module:qualname" paths (saved before names existed) -> name
_RENAMED: dict[type, dict[str, str]] = {}  # per class: old field name -> new dotted path
_TASKS: dict[str, "TaskChecks"] = {}


class TaskChecks(typing.Protocol):
    """What ``Config.validate`` needs from a registered task (``mlgen.tasks.TaskSpec``)."""

    name: str

    def check(self, cfg: "Config", mesh: dict[str, int] | None) -> None:
        """Cross-section checks; ``mesh`` (axis sizes) is None when no devices are known yet."""


def register(
    name: str, *, aliases: typing.Iterable[str] = (), renamed: dict[str, str] | None = None
):
    """Class decorator: registers a config section class under the stable ``name``.

    Args:
      name: what saved configs store under ``__class__`` (``"transformer"``, ``"text"``).
      aliases: older ``module:qualname`` paths of the class, so runs saved before it had a
        name (or before it moved) still load.
      renamed: old field name -> new dotted path (``{"attention_backend": "attention.backend"}``),
        applied to saved configs and to ``key=value`` overrides.
    """

    def deco(cls: type) -> type:
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
            raise TypeError(f"register({name!r}): {cls.__qualname__} must be a frozen dataclass")
        if _SECTIONS.get(name, cls) is not cls:
            raise ValueError(
                f"register: the name {name!r} is taken by {_SECTIONS[name].__qualname__}"
            )
        _SECTIONS[name] = cls
        for path in (f"{cls.__module__}:{cls.__qualname__}", *aliases):
            _ALIASES[path] = name
        if renamed:
            _RENAMED[cls] = dict(renamed)
        return cls

    return deco


def register_task(spec: TaskChecks) -> TaskChecks:
    """Registers a task spec under ``spec.name`` (``Config.task`` picks it)."""
    if _TASKS.get(spec.name, spec) is not spec:
        raise ValueError(f"register_task: the task name {spec.name!r} is taken")
    _TASKS[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskChecks:
    """The registered task ``name`` (a ConfigError naming ``task`` if there is none)."""
    check(name in _TASKS, "task", f"unknown task {name!r}; registered: {sorted(_TASKS)}")
    return _TASKS[name]


def section_name(cls: type) -> str | None:
    """The registered name of a section class (None if it has none)."""
    return next((n for n, c in _SECTIONS.items() if c is cls), None)


def section_class(name: str) -> type:
    """The section class registered as ``name`` (or under an old ``module:qualname`` alias)."""
    name = _ALIASES.get(name, name)
    if name not in _SECTIONS:
        raise ConfigError(
            f"__class__: no config class is registered as {name!r}; known: {sorted(_SECTIONS)}"
        )
    return _SECTIONS[name]


# ----------------------------------------------------------------------------- sections
def _mesh_axis(default: int, shards: tuple[str, ...]):
    # A mesh axis is one field: its default size and the logical axes it shards when
    # ``rules="auto"`` (mlgen.sharding.rules derives the rules from these; every other
    # piece of code reads the axes from ``MeshConfig.AXES``). Adding a mesh axis is one
    # such line.
    return dataclasses.field(default=default, metadata={"shards": shards})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh. Sizes multiply to the device count; one size may be -1 (fill the rest).

    ``rules`` maps logical axis names to mesh axes: ``"auto"`` (default) derives them from
    which axes are larger than 1 (each axis shards the logical axes listed beside its field),
    or a named preset of ``mlgen.sharding.rules.PRESETS`` (``dp``, ``fsdp``, ``fsdp_tp``,
    ``fsdp_sp``, ``fsdp_ep``). A mesh axis larger than 1 that the rules never use is an error.
    """

    data: int = _mesh_axis(-1, ("batch",))
    fsdp: int = _mesh_axis(1, ("batch", "embed", "channels"))
    # Expert parallelism: the MoE layers' stacked experts are split over this axis and tokens
    # reach their experts by an all-to-all; everywhere else it is one more data-parallel axis
    # (it shards the batch too, as in GShard / MaxText, so no layer leaves it idle). The field
    # order is the device order (the last axis is innermost: neighbouring devices). An
    # all-to-all talks to every device of its group, so ``expert`` sits inside ``data`` and
    # ``fsdp`` (which may span hosts / slow links; their collectives are gradient
    # reductions and weight gathers XLA overlaps with compute) and outside ``tensor`` and
    # ``seq``, whose per-layer all-reduces and ring hops block each layer and keep the fastest
    # links.
    expert: int = _mesh_axis(1, ("batch", "expert"))
    tensor: int = _mesh_axis(
        1,
        ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_kv_heads", "act_mlp", "act_vocab"),
    )
    seq: int = _mesh_axis(1, ("length",))
    rules: str = "auto"

    AXES: typing.ClassVar[tuple[str, ...]]  # set below, from the fields

    def validate(self) -> None:
        check(
            isinstance(self.rules, str) and self.rules != "",
            "rules",
            "must be 'auto' or a preset name",
        )
        fills = [a for a in self.AXES if getattr(self, a) == -1]
        check(len(fills) <= 1, fills[-1] if fills else "data", "only one mesh axis may be -1")
        for a in self.AXES:
            v = getattr(self, a)
            check(v == -1 or v >= 1, a, f"must be >= 1 or -1 (fill), got {v}")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; errors if they cannot multiply to ``num_devices``."""
        sizes = {a: getattr(self, a) for a in self.AXES}
        known = math.prod(v for v in sizes.values() if v != -1)
        fill = [a for a, v in sizes.items() if v == -1]
        if fill:
            check(
                num_devices % known == 0,
                fill[0],
                f"cannot fill: {num_devices} devices not divisible by the other axes' "
                f"product {known}",
            )
            sizes[fill[0]] = num_devices // known
        prod = math.prod(sizes.values())
        check(
            prod == num_devices,
            "data",
            f"mesh {sizes} has {prod} devices but {num_devices} are available",
        )
        return sizes

    @classmethod
    def axis_roles(cls) -> dict[str, tuple[str, ...]]:
        """Mesh axis -> the logical axes it shards under ``rules="auto"``."""
        return {
            f.name: f.metadata["shards"] for f in dataclasses.fields(cls) if "shards" in f.metadata
        }


MeshConfig.AXES = tuple(MeshConfig.axis_roles())


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine (or constant) decay, global-norm clipping."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = train.num_steps
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameters whose path contains any of these substrings get no weight decay.
    no_decay: tuple[str, ...] = ("norm", "bias", "embed", "scale", "pos")
    clip_norm: float = 1.0  # 0 = no clipping
    grad_accum_steps: int = 1

    def validate(self) -> None:
        _positive(self, "lr", "eps", "grad_accum_steps")
        check(
            0.0 <= self.min_lr_ratio <= 1.0,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.decay_steps >= 0, "decay_steps", f"must be >= 0, got {self.decay_steps}")
        check(0.0 <= self.b1 < 1.0, "b1", f"must be in [0, 1), got {self.b1}")
        check(0.0 <= self.b2 < 1.0, "b2", f"must be in [0, 1), got {self.b2}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.clip_norm >= 0, "clip_norm", f"must be >= 0, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    num_steps: int = 1000
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_steps: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    sample_every: int = 0  # diffusion sample grids; 0 = only at the end (if the task samples)
    ema_decay: float = 0.0  # 0 = no EMA of the parameters
    ema_warmup: int = (
        0  # EMA decay ramps as min(decay, (1 + step) / (10 + step)) for this many steps
    )
    progress_bar: bool = True
    # A step whose loss or gradient is not finite is skipped (the state is kept); after this
    # many in a row the run stops. >= 1: skipping forever would burn the compute silently.
    max_bad_steps: int = 10
    # Several processes: steps between their agreement on a stop signal (SIGTERM on some
    # hosts), a collective that waits for the step before it; one process checks every step.
    preemption_sync_every: int = 10

    def validate(self) -> None:
        _positive(
            self,
            "num_steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "preemption_sync_every",
        )
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        check(self.eval_steps >= 0, "eval_steps", f"must be >= 0, got {self.eval_steps}")
        check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.ema_warmup >= 0, "ema_warmup", f"must be >= 0, got {self.ema_warmup}")
        check(
            self.max_bad_steps >= 1,
            "max_bad_steps",
            f"must be >= 1 (non-finite steps in a row before the run stops), got "
            f"{self.max_bad_steps}",
        )


DTYPES = ("float32", "bfloat16")
Dtype = Literal["float32", "bfloat16"]
# ``remat`` names, in mlgen.nn.policy.REMAT_POLICIES (what each saves for the backward pass).
REMATS = ("none", "full", "dots", "dots_no_batch", "offload")
Remat = Literal["none", "full", "dots", "dots_no_batch", "offload"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Mixed precision, for every model family (``mlgen.nn.policy.Policy``).

    Attributes:
      params: parameter (master-weight) dtype; gradients and updates land in it.
      compute: activation / matmul dtype. Norms, softmax and losses compute in float32
        whatever it is, and the model's output layer returns float32.
      optimizer: dtype the optimizer state (both Adam moments) is stored in; the update math
        runs in float32.

    ``params=float32, compute=bfloat16`` is the usual mixed precision; ``bfloat16`` everywhere
    halves the parameter and optimizer memory too.
    """

    params: Dtype = "float32"
    compute: Dtype = "float32"
    optimizer: Dtype = "float32"

    def validate(self) -> None:
        for name in ("params", "compute", "optimizer"):
            v = getattr(self, name)
            check(v in DTYPES, name, f"must be one of {list(DTYPES)}, got {v!r}")
        check(
            not (self.params == "bfloat16" and self.compute == "float32"),
            "params",
            "bfloat16 weights with compute=float32: upcasting bfloat16 weights to float32 "
            "matmuls gains nothing (they keep bfloat16's precision) and costs float32 speed; "
            "set precision.compute=bfloat16 too, or keep precision.params=float32",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A whole experiment. ``task`` names a registered task (``"lm"``, ``"diffusion"``).

    ``model``, ``data`` and ``objective`` hold registered section classes (``@register``);
    ``workdir`` may be a local path or a remote one (``gs://bucket/run``). ``precision`` and
    ``remat`` apply to whichever model is trained; ``remat`` is one of ``REMATS``:
    ``none``, ``full`` (recompute each block), ``dots`` (keep matmul outputs), ``dots_no_batch``
    (keep those without batch dimensions), ``offload`` (those, in host memory).

    ``init_from`` (fine-tuning): a run directory or a Hugging Face model directory whose
    weights a new run starts from (``mlgen.init_from``); used only while the workdir holds no
    checkpoint of its own.
    """

    task: str = "lm"
    workdir: str = ""
    seed: int = 0
    model: Any = None
    data: Any = None
    objective: Any = None
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    remat: Remat = "none"
    init_from: str = ""

    def validate(self, num_devices: int | None = None) -> "Config":
        """Checks every section, then the task's cross-section checks (against the mesh's
        axis sizes for ``num_devices`` devices, when given)."""
        spec = task_spec(self.task)
        check(self.workdir != "", "workdir", "must be set (e.g. workdir=/tmp/run1)")
        for name in ("model", "data", "objective", "mesh", "optim", "train", "precision"):
            section = getattr(self, name)
            check(section is not None, name, "missing section")
            if name in ("model", "data", "objective"):
                check(
                    section_name(type(section)) is not None,
                    name,
                    f"{type(section).__qualname__} is not a registered config class "
                    "(decorate it with @mlgen.config.register(NAME))",
                )
            prefixed(name, section.validate)
        check(self.remat in REMATS, "remat", f"must be one of {list(REMATS)}, got {self.remat!r}")
        sizes = None if num_devices is None else prefixed("mesh", self.mesh.resolve, num_devices)
        spec.check(self, sizes)
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


# Fields that moved out of their section (saved configs and overrides with the old dotted names
# keep working while the section has no field of that name): the models' own dtypes and remat
# became the run-wide ``precision`` and ``remat``.
_RENAMED[Config] = {
    "model.dtype": "precision.compute",
    "model.param_dtype": "precision.params",
    "model.remat": "remat",
}


def prefixed(prefix: str, fn, *args):
    """``fn(*args)``, with ``prefix.`` put before the field named by any ConfigError it raises
    (a section validating a nested one: ``attention.backend: ...`` ->
    ``model.attention.backend``)."""
    try:
        return fn(*args)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}") from None


# ----------------------------------------------------------------------------- (de)serialising
def to_dict(cfg: Any) -> dict:
    """Nested plain dict; registered section classes record their name under ``__class__``."""
    out: dict[str, Any] = {}
    name = section_name(type(cfg))
    if name is not None:
        out["__class__"] = name
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = (
            to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
        )
    return out


def _saved_class(cls: type | None, name: str, value: Any) -> type | None:
    """The class of the saved section ``value`` under field ``name`` of ``cls``."""
    if isinstance(value, dict) and "__class__" in value:
        resolved = _ALIASES.get(value["__class__"], value["__class__"])
        if resolved in _SECTIONS:
            return _SECTIONS[resolved]
    t = typing.get_type_hints(cls).get(name) if cls is not None else None
    return t if dataclasses.is_dataclass(t) else None


def _renamed(cls: type, d: dict) -> dict:
    """``d`` with the old (dotted) field names of ``cls`` moved to their new dotted paths.

    An old name that is a field again (of the section class the saved dict names) stays."""
    for old, new in _RENAMED.get(cls, {}).items():
        *parents, leaf = old.split(".")
        node, owner = d, cls
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                break
            owner = _saved_class(owner, p, child)
            child = node[p] = dict(child)  # a copy: the caller's dict is left as it was
            node = child
        else:
            if leaf in node and not (owner and leaf in {f.name for f in dataclasses.fields(owner)}):
                value = node.pop(leaf)
                *to_parents, to_leaf = new.split(".")
                target = d
                for p in to_parents:
                    target = target.setdefault(p, {})
                target.setdefault(to_leaf, value)
    return d


def _moved(cfg: Any, key: str) -> str | None:
    """The new path of ``key`` (set on ``cfg``) if it starts with an old name that is no field."""
    for old, new in _RENAMED.get(type(cfg), {}).items():
        if key == old or key.startswith(old + "."):
            node = cfg
            for part in old.split("."):
                names = {f.name for f in dataclasses.fields(node)}
                if part not in names:
                    return new + key[len(old) :]
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    break
    return None


def from_dict(d: dict, cls: type | None = None) -> Any:
    """Inverse of :func:`to_dict` (reads a run's saved config, old formats included)."""
    d = dict(d)
    name = d.pop("__class__", None)
    if name is not None:
        resolved = _ALIASES.get(name, name)
        if resolved in _SECTIONS:
            cls = _SECTIONS[resolved]
        elif cls is None:  # an Any-typed section whose class is not registered (anymore)
            section_class(name)  # raises, naming the unknown class
        # else: an old "module:qualname" of a typed section (MeshConfig, ...): the annotation says
    cls = cls or Config
    d = _renamed(cls, d)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if isinstance(v, dict):
            t = hints[f.name]
            v = from_dict(v, t if dataclasses.is_dataclass(t) else None)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Where two configs (or sections) differ: ``(dotted field, old value, new value)`` in
    field order. A section of another registered class is one difference (its class names)."""
    a = to_dict(old) if dataclasses.is_dataclass(old) else old
    b = to_dict(new) if dataclasses.is_dataclass(new) else new
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix, a, b)]
    if a.get("__class__") != b.get("__class__"):
        return [(prefix, a.get("__class__"), b.get("__class__"))]
    out = []
    for k in [*a, *(k for k in b if k not in a)]:
        if k != "__class__":
            out += differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
    return out


def save_json(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the config as JSON (any ``etils.epath`` path: local or ``gs://``),
    atomically where local."""
    path = epath.Path(path)
    text = json.dumps(to_dict(cfg), indent=2, sort_keys=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def load_json(path: str | os.PathLike) -> Config:
    return from_dict(json.loads(epath.Path(path).read_text()))


def _parse(text: str, tp: Any, field: str) -> Any:
    """Parses an override string into the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(text, a, field)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{field}: cannot parse {text!r}")
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"{field}: {text!r} is not one of {list(args)}")
    if origin is tuple:
        parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        elem = args[0] if args else str
        return tuple(_parse(p, elem, field) for p in parts)
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"{field}: expected a bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{field}: expected an int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{field}: expected a float, got {text!r}") from None
    if tp is str:
        return text
    raise ConfigError(f"{field}: cannot override a field of type {tp}")


def override(cfg: Any, key: str, text: str, _path: str = "") -> Any:
    """Returns ``cfg`` with the dotted ``key`` set from the string ``text``."""
    head, _, rest = key.partition(".")
    path = f"{_path}{head}"
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"{_path.rstrip('.')}: is not a section, cannot set {head!r}")
    names = {f.name for f in dataclasses.fields(cfg)}
    moved = _moved(cfg, key)
    if moved is not None:  # an old field name: set it at its new path
        return override(cfg, moved, text, _path)
    if head not in names:
        close = sorted(n for n in names if n[:3] == head[:3])
        hint = f"; did you mean {close[0]!r}?" if close else f"; fields: {sorted(names)}"
        raise ConfigError(f"{path}: unknown key{hint}")
    current = getattr(cfg, head)
    if rest:
        if current is None:
            raise ConfigError(f"{path}: section is not set in this config")
        new = override(current, rest, text, path + ".")
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{path}: is a section; set one of its fields ({path}.<field>=...)")
        tp = typing.get_type_hints(type(cfg))[head]
        new = _parse(text, tp, path)
    return dataclasses.replace(cfg, **{head: new})


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value (e.g. train.num_steps=100)")
        key, text = item.split("=", 1)
        cfg = override(cfg, key.strip(), text.strip())
    return cfg


def _run_config_file(path: Path) -> Config:
    """``get_config()`` of the config file ``path``; any exception it raises (a syntax error, a
    typo) is a one-line ``config:`` error naming the file and line (chained to the original)."""
    spec = importlib.util.spec_from_file_location(f"mlgen_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        check(hasattr(module, "get_config"), "config", f"{path} defines no get_config()")
        cfg = module.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"config: {path}:{e.lineno}: {type(e).__name__}: {e.msg}") from e
    except Exception as e:  # noqa: BLE001  (the user's code: reported in one line, chained)
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        where = f"{path}:{lines[-1]}" if lines else str(path)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"config: {where}: {type(e).__name__}: {first}") from e
    check(
        isinstance(cfg, Config),
        "config",
        f"{path}: get_config() returned a {type(cfg).__qualname__}, not a mlgen.config.Config",
    )
    return cfg


def load(path_or_config: "str | Path | Config", overrides: typing.Iterable[str] = ()) -> Config:
    """Loads a config file (or takes a Config), applies overrides, validates (no devices).

    A ``.json`` file is a run's saved config; a directory is a run directory (its
    ``config.json``: ``mlgen train WORKDIR`` resumes it, ``mlgen plan WORKDIR`` plans it).
    """
    if isinstance(path_or_config, Config):
        cfg = path_or_config
    elif Path(path_or_config).is_dir() or Path(path_or_config).suffix == ".json":
        path = Path(path_or_config)
        check(
            not path.is_dir() or (path / "config.json").is_file(),
            "config",
            f"{str(path)!r} is a directory, not a config file (nor a run directory: no "
            "config.json in it)",
        )
        path = path / "config.json" if path.is_dir() else path
        check(path.is_file(), "config", f"no such file {str(path)!r}")
        cfg = load_json(path)
    else:
        path = Path(path_or_config)
        check(not path.is_dir(), "config", f"{str(path)!r} is a directory, not a config file")
        check(path.is_file(), "config", f"no such file {str(path)!r}")
        cfg = _run_config_file(path)
    cfg = apply_overrides(cfg, overrides)
    return cfg.validate()
