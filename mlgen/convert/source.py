"""The pieces every conversion table is made of: :class:`Source` (where one mlgen parameter lives
in a Hugging Face checkpoint), :class:`ConvertError`, and the config checks that raise it.

A leaf of ``mlgen.convert``: the per-architecture tables (``layout``, ``layout_ssm``) and the
reader build on it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from mlgen.config import ConfigError
from mlgen.models.transformer import TransformerConfig


class ConvertError(ConfigError):
    """A checkpoint mlgen cannot convert. ``str(err)`` is one line naming the tensor, the
    config field or the file at fault."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One checkpoint tensor (per layer, for a stacked parameter) holding an mlgen parameter.

    Attributes:
      name: the tensor's name; ``{i}`` stands for the layer index, ``{j}`` for the expert's
        (a parameter stacked over layers and experts: one tensor per layer and expert).
      groups: per checkpoint dimension, the mlgen dimensions (of one layer) it holds, outer
        to inner (a row-major merge); an empty group is a checkpoint dimension of size 1 that
        holds none (a depthwise ``Conv1d`` weight's ``[C, 1, K]``).
      offset: ``(checkpoint dim, start, total size)`` when the parameter is a slice of that
        dimension (GPT-2's fused q/k/v, Mamba's fused ``in_proj``), else None.
      period: layers per step of the layer scan (``TransformerConfig.period``): the stacked
        parameter's leading axis indexes groups of this many layers.
      start: the parameter's first layer within its group (the start of its run, in a
        ``LayerGroup``).
      stacked: the run holds several consecutive layers, stacked on a second axis
        (``[groups, n, ...]``); layer ``i = period * g + start + k``.
    """

    name: str
    groups: tuple[tuple[int, ...], ...]
    offset: tuple[int, int, int] | None = None
    period: int = 1
    start: int = 0
    stacked: bool = False

    def lead(self, key: str) -> int:
        """How many leading dimensions of the mlgen parameter at ``key`` index tensors (layer
        groups, layers of a stacked run, then experts) rather than lie in one."""
        if not key.startswith("blocks/"):
            return 0
        return 1 + int(self.stacked) + int("{j}" in self.name)

    def names(self, ranges: tuple[range, ...]) -> list[str]:
        """The tensor names of the layers (and experts) in ``ranges``, outer to inner."""
        if not ranges:
            return [self.name]
        out = []
        for idx in itertools.product(*ranges):
            k = idx[1] if self.stacked else 0
            i = self.period * idx[0] + self.start + k
            j = idx[-1] if "{j}" in self.name else None
            out.append(self.name.format(i=i, j=j))
        return out

    def tensor_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint tensor's shape, for an mlgen (per-layer) ``shape``."""
        out = [math.prod(shape[d] for d in g) for g in self.groups]
        if self.offset is not None:
            out[self.offset[0]] = self.offset[2]
        return tuple(out)


def need(cond: bool, field: str, msg: str) -> None:
    """Raises ``ConvertError("config.json: field: msg")`` unless ``cond``."""
    if not cond:
        raise ConvertError(f"config.json: {field}: {msg}")


def validated(cfg: TransformerConfig) -> TransformerConfig:
    """``cfg`` after ``validate()``, its error re-raised as a :class:`ConvertError`."""
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConvertError(f"config.json: {e}") from None
    return cfg
