"""The closed vocabulary of logical axis names, and the logical -> mesh rules.

Parameters use the parameter names (``embed``, ``mlp``, ``heads`` …); activations are
constrained at block boundaries with the ``act_*`` names, ``batch`` and ``length``, so that
FSDP can shard a weight's ``embed`` axis without sharding the activations' width.

Rules come from ``mesh.rules``:

- ``"auto"`` derives them from the mesh: every mesh axis larger than 1 shards the logical axes
  listed beside its field in ``mlgen.config.MeshConfig`` (``data``, ``fsdp`` and ``expert``
  the batch, ``fsdp`` the weights' width, ``expert`` the MoE experts, ``tensor`` heads / mlp /
  vocab, ``seq`` the length);
- a named preset (``dp``, ``fsdp``, ``fsdp_tp``, ``fsdp_sp``, ``fsdp_ep``) says it explicitly.

A model family may add logical axes (:func:`register_axes`) and rule fragments (pairs
``(logical, mesh axis)``, appended to either kind of rules). :func:`check_mesh_use` makes a
mesh axis larger than 1 that no logical axis of the model maps to a config error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from mlgen.config import ConfigError, MeshConfig

Rules = tuple[tuple[str, object], ...]

PARAM_AXES = (
    "layers",  # stacked (scanned) layer axis
    "embed",  # model width D
    "heads",  # query heads N
    "kv_heads",  # key/value heads K
    "head_dim",  # H
    "mlp",  # F
    "expert",  # E: the stacked experts of an MoE layer
    "vocab",  # V
    "channels",  # conv output channels / generic feature axis
    "channels_in",  # conv input channels
    "kernel",  # conv spatial kernel axes
    "norm",  # per-feature scale / bias of norms
    "pos",  # positions of learned position tables
)
ACTIVATION_AXES = (
    "batch",
    "length",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
    "height",
    "width",
)
_AXES: set[str] = set(PARAM_AXES + ACTIVATION_AXES)

_BATCH = ("data", "fsdp")

PRESETS: dict[str, Rules] = {
    # Pure data parallel: parameters replicated, batch over every data-like axis.
    "dp": (("batch", _BATCH),),
    # ZeRO-3 style: parameters sharded on their width over fsdp, gathered per layer by XLA.
    "fsdp": (
        ("batch", _BATCH),
        ("embed", "fsdp"),
        ("channels", "fsdp"),
    ),
    # fsdp + Megatron tensor parallelism over heads / mlp / vocab.
    "fsdp_tp": (
        ("batch", _BATCH),
        ("embed", "fsdp"),
        ("channels", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    ),
    # fsdp + sequence parallelism: activations' length over seq (ring attention inside).
    "fsdp_sp": (
        ("batch", _BATCH),
        ("embed", "fsdp"),
        ("channels", "fsdp"),
        ("length", "seq"),
    ),
    # fsdp + expert parallelism: MoE experts over expert (an all-to-all carries the tokens to
    # them), which is data parallel for everything else.
    "fsdp_ep": (
        ("batch", _BATCH + ("expert",)),
        ("embed", "fsdp"),
        ("channels", "fsdp"),
        ("expert", "expert"),
    ),
}


def axes() -> frozenset[str]:
    """Every known logical axis name (the core vocabulary plus the families' own)."""
    return frozenset(_AXES)


def register_axes(names: Iterable[str]) -> None:
    """Adds a model family's own logical axis names to the vocabulary (idempotent)."""
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"register_axes: logical axis names are non-empty strings, got {n!r}")
        _AXES.add(n)


def derive(sizes: Mapping[str, int]) -> Rules:
    """The ``"auto"`` rules of a mesh with axis ``sizes``: each logical axis goes to every mesh
    axis larger than 1 whose field in ``MeshConfig`` lists it (in field order)."""
    table: dict[str, list[str]] = {}
    for mesh_axis, logical in MeshConfig.axis_roles().items():
        if sizes.get(mesh_axis, 1) > 1:
            for name in logical:
                table.setdefault(name, []).append(mesh_axis)
    return tuple((n, a[0] if len(a) == 1 else tuple(a)) for n, a in table.items())


def get_rules(name: str, sizes: Mapping[str, int] | None = None, fragments: Rules = ()) -> Rules:
    """The (logical name, mesh axes) pairs of ``name`` (``"auto"`` needs the mesh ``sizes``),
    plus ``fragments``; every other known name replicates."""
    if name == "auto":
        if sizes is None:
            raise ValueError("get_rules('auto') needs the mesh axis sizes")
        mapped = derive(sizes)
    elif name in PRESETS:
        mapped = PRESETS[name]
    else:
        raise ConfigError(
            f"mesh.rules: unknown rules {name!r}; choose 'auto' or a preset from {sorted(PRESETS)}"
        )
    named = {n for n, _ in mapped}
    extra = tuple((n, a) for n, a in fragments if n not in named)
    named |= {n for n, _ in extra}
    return mapped + extra + tuple((n, None) for n in sorted(_AXES) if n not in named)


def mesh_axes_of(rules: Rules, name: str) -> tuple[str, ...]:
    """The mesh axes logical axis ``name`` is sharded over under ``rules``."""
    for n, a in rules:
        if n == name:
            return () if a is None else ((a,) if isinstance(a, str) else tuple(a))
    return ()


def shards_of(rules: Rules, name: str, sizes: Mapping[str, int]) -> int:
    """How many ways logical axis ``name`` is split (the product of its mesh axes' sizes)."""
    return math.prod(sizes[a] for a in mesh_axes_of(rules, name))


def check_mesh_use(
    rules_name: str,
    rules: Rules,
    sizes: Mapping[str, int],
    used: Iterable[str],
    what: str = "the model",
) -> None:
    """Errors (naming ``mesh.rules``) on a mesh axis larger than 1 that no logical axis in
    ``used`` maps to: it would hold copies of the same work (``mesh.seq=8`` under rules that
    never shard the length runs every MLP on the whole sequence 8 times)."""
    used = set(used)
    for mesh_axis, size in sizes.items():
        if size > 1 and not any(mesh_axis in mesh_axes_of(rules, n) for n in used):
            hint = (
                "use mesh.rules=auto"
                if rules_name != "auto"
                else f"{what} has no logical axis that mesh.{mesh_axis} shards"
            )
            raise ConfigError(
                f"mesh.rules: {rules_name!r} shards nothing of {what} over mesh.{mesh_axis}={size} "
                f"({hint}, or set mesh.{mesh_axis}=1)"
            )


def check_names(names: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """Errors on a logical name outside the closed vocabulary."""
    for n in names:
        if n is not None and n not in _AXES:
            raise ValueError(f"unknown logical axis name {n!r}; known: {sorted(_AXES)}")
    return tuple(names)
