"""Packing: a stream of tokenized documents -> fixed-shape LM batches, resumable.

Rows. In training each of the b rows of a batch is a *lane*: a stream of whole documents
(``[bos] tokens [eos]``) that continues from one batch to the next, so the rows of one batch
come from b different documents. Validation uses one lane whose consecutive rows fill the
batch, so a pass has no half-empty batches. A row holds T+1 consecutive stream tokens;
``inputs = row[:-1]``, ``targets = row[1:]``; the next row of the lane starts on the last
token of this one, so every within-document transition is a target exactly once.

With ``pack=True`` a row runs on into the next document; with ``pack=False`` a row holds one
document's chunk and is padded. Each document piece in a row gets its own segment id
(1, 2, ... in row order; 0 = padding) and positions counting from 0, so attention masked by
segment ids and RoPE on ``positions`` see every piece as its own sequence. ``loss_mask`` is
0 on padding and on a target that belongs to another piece than its input (a document
boundary), so no target crosses a document.

Resuming: the iterator's state is the upstream grain state plus, per lane, the index of its
current document in the shuffled stream and the offset in it; ``set_state`` re-tokenizes
those few documents. A restored iterator yields exactly the batches that would have followed.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


class LMBatchIterator(grain.DatasetIterator):
    """Cuts a stream of tokenized documents into batches of ``rows`` rows of ``seq_len`` tokens.

    Row ``r`` of every batch continues lane ``r % lanes``; each lane is a stream of documents.
    Batches are dicts of ``inputs``, ``targets``, ``segment_ids``, ``positions`` (int32
    ``[rows, seq_len]``) and ``loss_mask`` (float32 ``[rows, seq_len]``).

    Args:
      parent: the iterator of tokenized documents (int32 arrays, bos/eos included).
      docs: random access to the same stream: ``docs[p]`` must be the p-th element ``parent``
        yields (``set_state`` rebuilds the lanes from it).
      rows: rows per batch.
      lanes: independent document streams; must divide ``rows``.
      seq_len: tokens per row (T).
      pack: run a row on into the next document (else pad after one document's chunk).
      pad_id: the token of padding positions.
      epoch_size: documents per epoch of a repeating stream (0 for a finite one): bounds how
        many too-short documents may be skipped in a row before it is an error, not a hang.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        docs: grain.MapDataset,
        *,
        rows: int,
        lanes: int,
        seq_len: int,
        pack: bool,
        pad_id: int,
        epoch_size: int,
    ):
        super().__init__(parent)
        self._epoch_size = epoch_size
        self._docs = docs
        self._rows, self._seq_len, self._pack, self._pad_id = rows, seq_len, pack, pad_id
        self._next_p = 0  # documents taken from the parent so far
        self._exhausted = False  # the parent has no more documents
        # Per lane: [p, offset] of the document where its next row starts, or None.
        assert rows % lanes == 0, (rows, lanes)
        self._lanes: list[list[int] | None] = [None] * lanes
        self._tokens: list[np.ndarray | None] = [None] * lanes

    # -- documents
    def _take(self, lane: int) -> bool:
        """Gives ``lane`` the next usable document; False when the stream has ended."""
        min_len = 1 if self._pack else 2
        skipped = 0
        while not self._exhausted:
            try:
                # A plain copy: worker outputs live in shared memory, freed once dropped.
                toks = np.array(next(self._parent), dtype=np.int32)
            except StopIteration:
                self._exhausted = True
                break
            p = self._next_p
            self._next_p += 1
            if len(toks) >= min_len:
                self._lanes[lane], self._tokens[lane] = [p, 0], toks
                return True
            skipped += 1
            if self._epoch_size and skipped >= self._epoch_size:  # repeating only empty documents
                raise ValueError(f"no document has {min_len} or more tokens")
        return False

    def _drop(self, lane: int) -> None:
        self._lanes[lane], self._tokens[lane] = None, None

    def _row(self, lane: int, buf: np.ndarray, seg: np.ndarray, pos: np.ndarray) -> None:
        """Fills one row (length T+1; buffers arrive as pad/0) from ``lane``."""
        n, piece, width = 0, 0, self._seq_len + 1
        while n < width:
            if self._lanes[lane] is None and not self._take(lane):
                return
            state, toks = self._lanes[lane], self._tokens[lane]
            off = state[1]
            take = min(width - n, len(toks) - off)
            piece += 1
            buf[n : n + take] = toks[off : off + take]
            seg[n : n + take] = piece
            pos[n : n + take] = np.arange(take)
            n, off = n + take, off + take
            if off == len(toks):
                # Finished: a full row ending on the document's last token needs no overlap
                # (that token's target would be in another document).
                self._drop(lane)
            else:
                state[1] = off - 1 if n == width else off
            if not self._pack:
                return

    def __next__(self) -> dict[str, np.ndarray]:
        if self._exhausted and all(lane is None for lane in self._lanes):
            raise StopIteration
        b, width = self._rows, self._seq_len + 1
        buf = np.full((b, width), self._pad_id, np.int32)
        seg = np.zeros((b, width), np.int32)
        pos = np.zeros((b, width), np.int32)
        for r in range(b):
            self._row(r % len(self._lanes), buf[r], seg[r], pos[r])
        if not seg.any():
            raise StopIteration
        loss_mask = (seg[:, :-1] != 0) & (seg[:, :-1] == seg[:, 1:])
        return {
            "inputs": buf[:, :-1],
            "targets": buf[:, 1:],
            "loss_mask": loss_mask.astype(np.float32),
            "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1],
        }

    # -- checkpointing
    def get_state(self) -> dict[str, Any]:
        """The upstream grain state and each lane's ``[document index, offset]`` (JSON-able)."""
        return {
            "parent": self._parent.get_state(),
            "next_p": self._next_p,
            "exhausted": int(self._exhausted),
            "lanes": [[-1, 0] if lane is None else list(lane) for lane in self._lanes],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from :meth:`get_state`: re-tokenizes the lanes' current documents."""
        self._parent.set_state(state["parent"])
        self._next_p = int(state["next_p"])
        self._exhausted = bool(state["exhausted"])
        for lane, (p, off) in enumerate(state["lanes"]):
            if int(p) < 0:
                self._drop(lane)
            else:
                self._lanes[lane], self._tokens[lane] = [int(p), int(off)], self._docs[int(p)]

    def __str__(self) -> str:
        return f"LMBatchIterator(rows={self._rows}, seq_len={self._seq_len}, pack={self._pack})"
