"""Typed experiment configs: frozen dataclasses, `key=value` overrides, one-line errors.

A config file (``configs/**/*.py``) defines ``get_config() -> Config``. The CLI and
``mlgen.train`` load it with :func:`load`, apply dotted overrides
(``model.num_layers=4``, ``mesh.data=-1``, ``optim.lr=1e-3``) and validate everything
before JAX compiles anything. Any mistake is a :class:`ConfigError` whose message is one
line that starts with the dotted name of the field at fault.

Sections whose content depends on what is trained (``model``, ``data``, ``objective``)
hold any frozen dataclass with a ``validate()`` method; the model families define their own
(``mlgen.models.transformer.TransformerConfig``, …). Overrides are typed by the class of
the instance actually in the config, so ``model.num_heads=x`` is an error for any model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad config value. ``str(err)`` is one line naming the field."""


def check(cond: bool, field: str, msg: str) -> None:
    """Raises ``ConfigError("field: msg")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field}: {msg}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        check(v > 0, n, f"must be > 0, got {v!r}")


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh. Sizes multiply to the device count; one size may be -1 (fill the rest).

    ``rules`` names a logical-axis preset from ``mlgen.sharding.rules.PRESETS``
    (``dp``, ``fsdp``, ``fsdp_tp``, ``fsdp_sp``).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    seq: int = 1
    rules: str = "fsdp"

    AXES: typing.ClassVar[tuple[str, ...]] = ("data", "fsdp", "tensor", "seq")

    def validate(self) -> None:
        from mlgen.sharding.rules import PRESETS

        check(self.rules in PRESETS, "rules", f"unknown preset {self.rules!r}; choose from {sorted(PRESETS)}")
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
            check(num_devices % known == 0, fill[0],
                  f"cannot fill: {num_devices} devices not divisible by the other axes' product {known}")
            sizes[fill[0]] = num_devices // known
        prod = math.prod(sizes.values())
        check(prod == num_devices, "data",
              f"mesh {sizes} has {prod} devices but {num_devices} are available")
        return sizes


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
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
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
    ema_warmup: int = 0  # EMA decay ramps as min(decay, (1 + step) / (10 + step)) for this many steps
    progress_bar: bool = True

    def validate(self) -> None:
        _positive(self, "num_steps", "log_every", "checkpoint_every", "keep_checkpoints")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        check(self.eval_steps >= 0, "eval_steps", f"must be >= 0, got {self.eval_steps}")
        check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.ema_warmup >= 0, "ema_warmup", f"must be >= 0, got {self.ema_warmup}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A whole experiment. ``task`` picks the builder in ``mlgen.tasks`` ("lm", "diffusion")."""

    task: str = "lm"
    workdir: str = ""
    seed: int = 0
    model: Any = None
    data: Any = None
    objective: Any = None
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self, num_devices: int | None = None) -> "Config":
        """Checks every section (and the mesh against ``num_devices`` when given)."""
        from mlgen import tasks

        check(self.task in tasks.TASKS, "task", f"unknown task {self.task!r}; choose from {sorted(tasks.TASKS)}")
        check(self.workdir != "", "workdir", "must be set (e.g. workdir=/tmp/run1)")
        for name in ("model", "data", "objective", "mesh", "optim", "train"):
            section = getattr(self, name)
            check(section is not None, name, "missing section")
            _prefixed(name, section.validate)
        if num_devices is not None:
            sizes = _prefixed("mesh", self.mesh.resolve, num_devices)
            tasks.get(self.task).validate(self, sizes)
        return self

    def to_dict(self) -> dict:
        return to_dict(self)


def _prefixed(prefix: str, fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}") from None


# ----------------------------------------------------------------------------- overrides
def to_dict(cfg: Any) -> dict:
    """Nested plain dict, with each section's class recorded under ``__class__``."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(cfg) and type(cfg) is not Config:
        out["__class__"] = f"{type(cfg).__module__}:{type(cfg).__qualname__}"
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def from_dict(d: dict, cls: type | None = None) -> Any:
    """Inverse of :func:`to_dict` (used to read a run's saved config)."""
    d = dict(d)
    if "__class__" in d:
        mod, name = d.pop("__class__").split(":")
        cls = getattr(importlib.import_module(mod), name)
    cls = cls or Config
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


def save_json(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True))


def load_json(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))


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


def load(path_or_config: "str | Path | Config", overrides: typing.Iterable[str] = ()) -> Config:
    """Loads a config file (or takes a Config), applies overrides, validates (no devices)."""
    if isinstance(path_or_config, Config):
        cfg = path_or_config
    else:
        path = Path(path_or_config)
        if not path.is_file():
            raise ConfigError(f"config: no such file {str(path)!r}")
        spec = importlib.util.spec_from_file_location(f"mlgen_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config: {path} defines no get_config()")
        cfg = module.get_config()
    cfg = apply_overrides(cfg, overrides)
    return cfg.validate()

