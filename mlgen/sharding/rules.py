"""The closed vocabulary of logical axis names and the named logical -> mesh presets.

Parameters use the parameter names (``embed``, ``mlp``, ``heads`` …); activations are
constrained at block boundaries with the ``act_*`` names, ``batch`` and ``length``, so that
FSDP can shard a weight's ``embed`` axis without sharding the activations' width.
"""

from mlgen.config import ConfigError

PARAM_AXES = (
    "layers",  # stacked (scanned) layer axis
    "embed",  # model width D
    "heads",  # query heads N
    "kv_heads",  # key/value heads K
    "head_dim",  # H
    "mlp",  # F
    "vocab",  # V
    "channels",  # conv output channels / generic feature axis
    "channels_in",  # conv input channels
    "kernel",  # conv spatial kernel axes
    "norm",  # per-feature scale / bias of norms
    "pos",  # positions of learned position tables
)
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab", "height", "width")
AXES = frozenset(PARAM_AXES + ACTIVATION_AXES)

_BATCH = ("data", "fsdp")

PRESETS: dict[str, tuple[tuple[str, object], ...]] = {
    # Pure data parallel: parameters replicated, batch over every data-like axis.
    "dp": (
        ("batch", _BATCH),
    ),
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
}


def get_rules(name: str) -> tuple[tuple[str, object], ...]:
    """The (logical name, mesh axes) pairs of preset ``name``; every other name replicates."""
    if name not in PRESETS:
        raise ConfigError(f"mesh.rules: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    mapped = PRESETS[name]
    named = {n for n, _ in mapped}
    return mapped + tuple((n, None) for n in PARAM_AXES + ACTIVATION_AXES if n not in named)


def check_names(names: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """Errors on a logical name outside the closed vocabulary."""
    for n in names:
        if n is not None and n not in AXES:
            raise ValueError(f"unknown logical axis name {n!r}; known: {sorted(AXES)}")
    return tuple(names)
