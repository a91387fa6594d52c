"""Sequence-to-sequence objective: the cross entropy of the target tokens given the source.

Teacher forcing: the decoder reads ``decoder_inputs`` (``[bos, y_1, ..., y_{n-1}]``, right-padded)
and predicts ``targets`` (``[y_1, ..., y_n]``, with ``y_n`` = eos) at the ``loss_mask``
positions; the encoder reads ``inputs`` with ``input_mask`` (0 = padding).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, register
from mlgen.objectives import bind, state_after
from mlgen.ops.losses import cross_entropy

__all__ = ["Seq2SeqObjectiveConfig", "make_loss"]


@register("seq2seq")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqObjectiveConfig:
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) over the target tokens

    def validate(self) -> None:
        check(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")


def make_loss(graphdef: nnx.GraphDef, *, z_loss: float = 0.0, train: bool = True):
    """Returns ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))``.

    ``batch``: ``inputs``, ``input_mask`` ``[B, S]``; ``decoder_inputs``, ``targets``,
    ``loss_mask`` ``[B, T]``. ``rng`` drives dropout when ``train``.

    Metrics: ``ce``, ``accuracy`` (per target token), ``sequence_accuracy`` (rows whose every
    target token is the model's argmax), ``z_loss``, ``tokens``.
    """

    def loss(params, model_state, batch, rng):
        model = bind(graphdef, params, model_state)
        logits = model(
            batch["inputs"],
            batch["decoder_inputs"],
            input_mask=batch["input_mask"],
            rng=rng if train else None,
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        value, metrics = cross_entropy(logits, batch["targets"], mask, z_loss=z_loss)
        wrong = (jnp.argmax(logits, axis=-1) != batch["targets"]) & (mask > 0)
        rows = jnp.any(mask > 0, axis=-1)
        metrics["sequence_accuracy"] = jnp.sum(rows & ~jnp.any(wrong, axis=-1)) / jnp.maximum(
            jnp.sum(rows), 1
        )
        return value, (metrics, state_after(model, model_state))

    return loss
