"""Next-token language modelling objective (packing-aware)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from mlgen.config import check, register
from mlgen.objectives import bind, state_after
from mlgen.ops.losses import chunked_cross_entropy, cross_entropy


@register("lm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LMObjectiveConfig:
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) (PaLM uses 1e-4)
    # Positions per chunk of the output layer + loss (0 = all at once). With a chunk the
    # [B, T, V] logits are never materialised: peak memory B * chunk * V floats, the logits
    # recomputed chunk by chunk in the backward. For large vocabularies (128k x 8k tokens
    # per row is 4 GiB of float32 logits per row).
    loss_chunk: int = 0

    def validate(self) -> None:
        check(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")
        check(self.loss_chunk >= 0, "loss_chunk", f"must be >= 0, got {self.loss_chunk}")


def make_loss(
    graphdef: nnx.GraphDef, *, z_loss: float = 0.0, train: bool = True, loss_chunk: int = 0
):
    """Returns ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))``.

    ``batch``: ``inputs``, ``targets`` ``[B, T]`` int; optional ``loss_mask`` ``[B, T]``,
    ``segment_ids`` and ``positions`` ``[B, T]`` (packed rows). ``rng`` drives dropout when
    ``train``. ``loss_chunk > 0`` computes the output layer and loss that many positions at
    a time (``ops.losses.chunked_cross_entropy``).

    The model is called with ``return_aux=True`` (the decoder protocol): its ``aux["loss"]`` (a
    mixture of experts' weighted router losses) is added to the loss, and every ``aux`` value is
    a ``moe_*`` metric. ``ce`` stays the cross entropy alone.
    """

    def loss(params, model_state, batch, rng):
        model = bind(graphdef, params, model_state)
        out = model(
            batch["inputs"],
            positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
            rng=rng if train else None,
            return_hidden=loss_chunk > 0,
            return_aux=True,
        )
        out, aux = out
        if loss_chunk > 0:
            value, metrics = chunked_cross_entropy(
                out,
                model.logits,
                batch["targets"],
                batch.get("loss_mask"),
                z_loss=z_loss,
                chunk=loss_chunk,
            )
        else:
            value, metrics = cross_entropy(
                out, batch["targets"], batch.get("loss_mask"), z_loss=z_loss
            )
        if aux:  # a mixture of experts: its router losses join the loss, all of it is logged
            metrics = dict(metrics, **{f"moe_{k}": v for k, v in aux.items()})
            value = value + aux["loss"]
        return value, (metrics, state_after(model, model_state))

    return loss
