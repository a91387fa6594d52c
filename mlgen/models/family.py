"""A model family as one spec: its config class, how to build it, what it consumes and adds.

Each family module (``transformer.py``, ``unet.py``, ``dit.py``, …) ends with one
``register(Family(...))``. Registering names the config class (``mlgen.config.register``: saved
configs store that name) and adds the family's own logical axes to the sharding vocabulary.
Tasks work with any family of the ``kind`` they train (``"decoder"``: tokens -> logits and the
decoder protocol; ``"denoiser"``: ``(x, time, labels, **cond) -> output``; ``"autoencoder"``:
images -> posterior -> images; ``"encoder"``: bidirectional tokens -> hidden states / MLM
logits; ``"seq2seq"``: an encoder-decoder) and never dispatch on classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from mlgen import config as config_lib
from mlgen.config import ConfigError
from mlgen.nn.policy import Policy
from mlgen.sharding import register_axes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """What the rest of mlgen knows about a model family.

    Attributes:
      name: the stable name its config class is registered under (``model.__class__`` in a
        saved config).
      config: its frozen config class (with ``validate()``).
      kind: the interface its modules implement: ``"decoder"`` (``model(tokens, positions=,
        segment_ids=, rng=, return_hidden=, return_aux=)``: logits, or ``(logits, aux)`` with
        ``aux`` a dict of float32 scalars (``aux["loss"]``, if any, joins the objective),
        ``model.logits``, ``init_cache`` / ``decode`` /
        ``max_length`` / ``for_decoding``), ``"denoiser"`` (``model(x, time, labels, rng=,
        **cond)``, ``cond`` the extra conditioning inputs it takes, with ``image_size``,
        ``in_channels``, ``output_channels``, ``num_classes`` on its config), or one of the
        kinds named above (``"autoencoder"``, ``"encoder"``, ``"seq2seq"``), whose protocols
        are in their modules' docstrings.
      build: ``(config, rngs, policy) -> nnx.Module``; ``policy`` (``mlgen.nn.policy.Policy``)
        is the run's parameter / compute dtypes and remat, which the family's modules honour.
      batch_axes: the batch keys its inputs come in and their logical axes (keys not listed
        are sharded on their leading dimension over ``batch``).
      logical_axes: every logical axis its parameters and activations use (a mesh axis that
        shards none of them, nor a batch axis, is a config error).
      new_axes: logical axes it adds to the core vocabulary (``mlgen.sharding.rules``).
      rules: ``(logical axis, mesh axis)`` fragments for those, appended to any rules.
      check: ``(config, shards) -> None``: model-against-mesh checks raising ``ConfigError``
        named from the model section (``num_heads: ...``); ``shards(logical axis)`` is how
        many ways the rules split that axis on this mesh.
      aliases: older ``module:qualname`` paths of the config class (it moved), so runs saved
        before still load.
      renamed: old config field names -> new dotted paths (saved configs and overrides that
        use the old names keep working; ``mlgen.config.register``).
      flops_per_token: ``(config, seq_len) -> training FLOPs per token`` (forward + backward
        matmuls by formula, ``mlgen.train.throughput``) for the trainer's MFU; a decoder's
        tokens are its sequence positions, a denoiser's the pixels of an image (``seq_len`` =
        H * W). None = the family reports no model FLOPs (no MFU).
      trainable: ``config -> predicate | None``: which parameters train, a predicate on a
        parameter's path (``"blocks/attn/q/lora_a"``), or None when all of them do. The others
        are frozen: no gradient, no optimizer state (LoRA: only the adapters train).
      axes_of: ``config -> logical axes`` that this config's model uses, a subset of
        ``logical_axes`` (the mesh-use check takes these: a UNet without text has no
        ``length`` axis, so ``mesh.seq > 1`` shards nothing of it); None = all of them.
    """

    name: str
    config: type
    kind: str
    build: Callable[[Any, nnx.Rngs, Policy], nnx.Module]
    batch_axes: Mapping[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)
    logical_axes: frozenset[str] = frozenset()
    new_axes: tuple[str, ...] = ()
    rules: tuple[tuple[str, str], ...] = ()
    check: Callable[[Any, Callable[[str], int]], None] | None = None
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    flops_per_token: Callable[[Any, int], float] | None = None
    trainable: Callable[[Any], Callable[[str], bool] | None] = lambda config: None
    axes_of: Callable[[Any], frozenset[str]] | None = None

    def used_axes(self, config) -> frozenset[str]:
        """The logical axes ``config``'s model uses (``axes_of``, else ``logical_axes``)."""
        return frozenset(self.logical_axes if self.axes_of is None else self.axes_of(config))


_FAMILIES: dict[type, Family] = {}


def register(family: Family) -> Family:
    """Registers ``family`` (and names its config class); returns it."""
    if _FAMILIES.get(family.config, family) is not family:
        raise ValueError(
            f"register: {family.config.__qualname__} already belongs to another family"
        )
    config_lib.register(family.name, aliases=family.aliases, renamed=dict(family.renamed))(
        family.config
    )
    register_axes(family.new_axes)
    _FAMILIES[family.config] = family
    return family


def family_of(model_config: Any) -> Family:
    """The family of a model config (a ConfigError naming ``model`` if none is registered)."""
    family = _FAMILIES.get(type(model_config))
    if family is None:
        raise ConfigError(
            f"model: {type(model_config).__qualname__} belongs to no registered model family; "
            f"known: {sorted(f.name for f in _FAMILIES.values())}"
        )
    return family


def families() -> dict[str, Family]:
    """Every registered family by name."""
    return {f.name: f for f in _FAMILIES.values()}
