"""Masked language modelling (BERT): corrupt some tokens, predict the originals there only.

Of the real tokens (``segment_ids > 0``), each is selected with probability ``mask_rate``
(15%); a selected token becomes the mask token with probability ``replace_mask`` (80%), a
uniformly random token with ``replace_random`` (10%), and stays itself otherwise (10%). The
loss is the cross entropy of the original token at the selected positions only. Masks are
drawn inside the loss from its ``rng`` (dynamic masking: a new mask every step, as RoBERTa),
so the data pipeline is the LM's packed text as it is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check, register
from mlgen.objectives import bind, state_after
from mlgen.ops.losses import cross_entropy
from mlgen.typing import Array, Int

__all__ = ["MLMObjectiveConfig", "make_loss", "mask_tokens"]


@register("mlm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MLMObjectiveConfig:
    """BERT's masking.

    Attributes:
      mask_rate: share of the real tokens selected for prediction.
      replace_mask: share of the selected tokens replaced by ``mask_id``.
      replace_random: share replaced by a random token of the tokenizer's vocabulary (the rest
        stay as they are).
      mask_id: the mask token; -1 = the first id past the tokenizer's (``data.vocab_size``),
        so the model needs ``model.vocab_size > data.vocab_size``.
      z_loss: weight of ``mean(logsumexp(logits)^2)`` at the selected positions.
    """

    mask_rate: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1
    mask_id: int = -1
    z_loss: float = 0.0

    def validate(self) -> None:
        check(0.0 < self.mask_rate < 1.0, "mask_rate", f"must be in (0, 1), got {self.mask_rate}")
        for name in ("replace_mask", "replace_random"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, name, f"must be in [0, 1], got {v}")
        check(
            self.replace_mask + self.replace_random <= 1.0,
            "replace_random",
            f"replace_mask + replace_random = {self.replace_mask + self.replace_random} exceeds 1",
        )
        check(self.mask_id >= -1, "mask_id", f"must be >= 0 (or -1 = auto), got {self.mask_id}")
        check(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")

    def resolved_mask_id(self, data_vocab_size: int) -> int:
        return data_vocab_size if self.mask_id == -1 else self.mask_id


def mask_tokens(
    tokens: Int[Array, "B T"],
    eligible: Array,
    rng: jax.Array,
    *,
    mask_rate: float,
    replace_mask: float,
    replace_random: float,
    mask_id: int,
    random_vocab: int,
) -> tuple[Int[Array, "B T"], Array]:
    """BERT's corruption of ``tokens``.

    Args:
      tokens: ``[B, T]`` original ids.
      eligible: ``[B, T]`` bool: positions that may be selected (real tokens).
      rng: the key the selection and the replacements are drawn from.
      mask_rate, replace_mask, replace_random: as :class:`MLMObjectiveConfig`.
      mask_id: the mask token.
      random_vocab: random replacements are uniform over ``[0, random_vocab)``.

    Returns:
      ``(corrupted [B, T], selected [B, T] bool)``.
    """
    k_sel, k_how, k_tok = jax.random.split(rng, 3)
    selected = eligible & jax.random.bernoulli(k_sel, mask_rate, tokens.shape)
    u = jax.random.uniform(k_how, tokens.shape)
    random_tokens = jax.random.randint(k_tok, tokens.shape, 0, random_vocab, tokens.dtype)
    out = jnp.where(u < replace_mask, jnp.asarray(mask_id, tokens.dtype), tokens)
    out = jnp.where((u >= replace_mask) & (u < replace_mask + replace_random), random_tokens, out)
    return jnp.where(selected, out, tokens), selected


def make_loss(
    graphdef: nnx.GraphDef,
    cfg: MLMObjectiveConfig,
    *,
    mask_id: int,
    random_vocab: int,
    train: bool = True,
):
    """Returns ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))``.

    ``batch``: ``inputs`` ``[B, T]`` (the original tokens), ``segment_ids`` ``[B, T]`` (0 =
    padding; packed documents attend to themselves only) and optional ``positions``. ``rng``
    draws the mask (evaluation too: the trainer gives each eval batch a fixed key, so eval
    masks are the same at every eval) and, when ``train``, the dropout.

    Metrics: ``ce``, ``accuracy`` (at the selected positions), ``z_loss``, ``tokens`` (selected
    positions), ``masked_fraction`` (selected / real tokens).
    """

    def loss(params, model_state, batch, rng):
        model = bind(graphdef, params, model_state)
        tokens = batch["inputs"]
        seg = batch.get("segment_ids")
        real = jnp.ones(tokens.shape, bool) if seg is None else seg > 0
        k_mask, k_drop = jax.random.split(rng)
        corrupted, selected = mask_tokens(
            tokens,
            real,
            k_mask,
            mask_rate=cfg.mask_rate,
            replace_mask=cfg.replace_mask,
            replace_random=cfg.replace_random,
            mask_id=mask_id,
            random_vocab=random_vocab,
        )
        logits = model(
            corrupted,
            segment_ids=seg,
            positions=batch.get("positions"),
            rng=k_drop if train else None,
        )
        value, metrics = cross_entropy(logits, tokens, selected, z_loss=cfg.z_loss)
        metrics["masked_fraction"] = jnp.sum(selected) / jnp.maximum(jnp.sum(real), 1)
        return value, (metrics, state_after(model, model_state))

    return loss
