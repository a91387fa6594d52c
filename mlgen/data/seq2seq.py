"""Synthetic sequence-to-sequence pairs generated in-process: copy or reverse a random string.

No files: a test or a demo of an encoder-decoder trains on them anywhere. Ids: 0 padding, 1
bos (the decoder's start token), 2 eos, ``3 .. vocab_size - 1`` the symbols. A pair is a random
string of ``min_len .. max_len`` symbols; the source is the string and eos, the target the
string (``copy``) or the string backwards (``reverse``) and eos.

Batches are dicts of int32 / float32 numpy arrays, all rows padded to ``max_len + 1``:
``inputs``, ``input_mask`` ``[b, S]``; ``decoder_inputs`` (``[bos, y_1, ..]``), ``targets``
(``[y_1, .., eos]``), ``loss_mask`` ``[b, T]``, where ``b = batch_size // process_count``. Batch
``n`` of a split is a function of ``(seed, split, process_index, n)`` only, so the iterator's
state is the batch counter and resuming is exact; validation draws from its own stream, and
each pass over it yields the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from mlgen.config import check, register
from mlgen.data.pipeline import host_rows

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "PairIterator",
    "Seq2SeqDataConfig",
    "batch_spec",
    "make_pair_data",
    "make_pairs",
]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_FIRST_SYMBOL = 3
_SPLITS = {"train": 0, "validation": 1}


@register("seq2seq_synthetic")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq2SeqDataConfig:
    """Synthetic pairs.

    Attributes:
      source: ``reverse`` (target = the source backwards) or ``copy``.
      vocab_size: ids, the 3 specials included (``vocab_size - 3`` symbols).
      min_len, max_len: symbols per string (uniform).
      batch_size: GLOBAL batch size.
    """

    source: Literal["reverse", "copy"] = "reverse"
    vocab_size: int = 16
    min_len: int = 2
    max_len: int = 12
    batch_size: int = 32

    def validate(self) -> None:
        check(
            self.source in ("reverse", "copy"),
            "source",
            f"must be 'reverse' or 'copy', got {self.source!r}",
        )
        check(
            self.vocab_size > _FIRST_SYMBOL,
            "vocab_size",
            f"must be > {_FIRST_SYMBOL} (pad, bos, eos and at least one symbol), "
            f"got {self.vocab_size}",
        )
        check(self.min_len >= 1, "min_len", f"must be >= 1, got {self.min_len}")
        check(
            self.max_len >= self.min_len,
            "max_len",
            f"must be >= min_len={self.min_len}, got {self.max_len}",
        )
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")

    @property
    def seq_len(self) -> int:
        """Padded length of the source and of the target (the string and eos)."""
        return self.max_len + 1


def make_pairs(cfg: Seq2SeqDataConfig, rows: int, rng: np.random.Generator) -> dict:
    """``rows`` random pairs as one batch (see the module docstring for the keys)."""
    L = cfg.seq_len
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, rows)
    symbols = rng.integers(_FIRST_SYMBOL, cfg.vocab_size, (rows, cfg.max_len))
    inputs = np.full((rows, L), PAD_ID, np.int32)
    targets = np.full((rows, L), PAD_ID, np.int32)
    for r, n in enumerate(lengths):
        s = symbols[r, :n]
        inputs[r, :n], inputs[r, n] = s, EOS_ID
        targets[r, :n], targets[r, n] = (s[::-1] if cfg.source == "reverse" else s), EOS_ID
    real = (np.arange(L)[None, :] <= lengths[:, None]).astype(np.int32)
    # Padding after the target shifts into padding: targets hold PAD_ID there.
    decoder_inputs = np.concatenate([np.full((rows, 1), BOS_ID, np.int32), targets[:, :-1]], 1)
    return {
        "inputs": inputs,
        "input_mask": real,
        "decoder_inputs": decoder_inputs.astype(np.int32),
        "targets": targets,
        "loss_mask": real.astype(np.float32),
    }


class PairIterator:
    """This host's batches of one split, endless and resumable (``get_state`` / ``set_state``)."""

    def __init__(self, cfg: Seq2SeqDataConfig, *, rows: int, seed: int, stream: tuple[int, ...]):
        self._cfg, self._rows, self._seed, self._stream = cfg, rows, seed, stream
        self._index = 0

    def __iter__(self) -> PairIterator:
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self._seed, *self._stream, self._index])
        self._index += 1
        return make_pairs(self._cfg, self._rows, rng)

    def get_state(self) -> dict:
        return {"index": self._index}

    def set_state(self, state: dict) -> None:
        self._index = int(state["index"])


def make_pair_data(
    cfg: Seq2SeqDataConfig,
    *,
    split: Literal["train", "validation"],
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> PairIterator:
    """This host's endless batches of ``split`` (the trainer takes ``train.eval_steps`` of
    the validation ones per eval)."""
    cfg.validate()
    check(split in _SPLITS, "split", f"must be 'train' or 'validation', got {split!r}")
    rows = host_rows(cfg.batch_size, process_index, process_count)
    return PairIterator(cfg, rows=rows, seed=seed, stream=(_SPLITS[split], process_index))


def batch_spec(cfg: Seq2SeqDataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The GLOBAL batch's ``key -> (shape, dtype)`` (``mlgen plan``)."""
    shape, i32 = (cfg.batch_size, cfg.seq_len), np.dtype(np.int32)
    keys = ("inputs", "input_mask", "decoder_inputs", "targets")
    return {**{k: (shape, i32) for k in keys}, "loss_mask": (shape, np.dtype(np.float32))}
