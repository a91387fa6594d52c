"""Next-token language modelling objective (packing-aware)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from mlgen.config import check
from mlgen.ops.losses import cross_entropy


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMObjectiveConfig:
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) (PaLM uses 1e-4)

    def validate(self) -> None:
        check(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")


def make_loss(graphdef: nnx.GraphDef, *, z_loss: float = 0.0, train: bool = True):
    """Returns ``loss(params, batch, rng) -> (loss, metrics)``.

    ``batch``: ``inputs``, ``targets`` ``[B, T]`` int; optional ``loss_mask`` ``[B, T]``,
    ``segment_ids`` and ``positions`` ``[B, T]`` (packed rows). ``rng`` drives dropout when
    ``train``.
    """

    def loss(params, batch, rng):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                       rng=rng if train else None)
        return cross_entropy(logits, batch["targets"], batch.get("loss_mask"), z_loss=z_loss)

    return loss
