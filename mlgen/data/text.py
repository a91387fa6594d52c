"""Text data for language models: sources, split, host shards, tokenization, packing.

The pipeline (grain), per host::

    documents (sorted; max_docs subset; deterministic train/validation split by hash of id)
      -> this host's shard  docs[process_index::process_count]
      -> MapDataset: shuffle(seed), reshuffled each epoch; repeat (train)
      -> map: read + tokenize + bos/eos            (worker processes if num_workers > 0)
      -> lanes: streams of documents, cut into rows of T+1 tokens (train: b lanes)
      -> batches of numpy arrays

Nothing is tokenized ahead of time: the first batch costs ~b documents.

Sources: ``stdlib`` (the installed Python standard library's ``.py`` files, the default
corpus: no download), ``files`` (globs, one file = one document) and ``jsonl`` (globs, one
line = one document, text under ``text_field``).

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

import atexit
import dataclasses
import hashlib
import json
import os
import sysconfig
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from mlgen.config import ConfigError, check
from mlgen.data.tokenizer import ByteTokenizer, Tokenizer, expand_globs

# Directories of the standard library that are not part of the default corpus.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
TOKENIZER_FILENAME = "tokenizer.model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """Where the text comes from, how it is tokenized, and how batches are shaped.

    ``batch_size`` is the GLOBAL batch; each of ``process_count`` hosts gets
    ``batch_size // process_count`` rows of ``seq_len`` tokens.
    ``tokenizer="byte"`` has ``vocab_size`` 256 (bos/eos/pad share the ASCII control codes
    STX/ETX/NUL) or 259 (three extra ids); ``bpe``/``unigram`` train a sentencepiece model of
    ``vocab_size`` pieces on the train split into ``WORKDIR/tokenizer.model`` unless
    ``tokenizer_path`` names one.
    """

    source: Literal["stdlib", "files", "jsonl"] = "stdlib"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer: Literal["byte", "bpe", "unigram"] = "byte"
    vocab_size: int = 256
    tokenizer_path: str = ""
    seq_len: int = 256
    batch_size: int = 16
    pack: bool = True
    add_bos: bool = True
    add_eos: bool = True
    val_fraction: float = 0.02
    max_docs: int = 0
    num_workers: int = 0
    shuffle: bool = True

    def validate(self) -> None:
        check(self.source in ("stdlib", "files", "jsonl"), "source",
              f"must be 'stdlib', 'files' or 'jsonl', got {self.source!r}")
        if self.source == "stdlib":
            check(not self.paths, "paths", "only used with source='files' or 'jsonl'")
        else:
            check(len(self.paths) > 0, "paths", f"source={self.source!r} needs at least one glob")
            check(all(isinstance(p, str) and p for p in self.paths), "paths", "must be non-empty strings")
        if self.source == "jsonl":
            check(bool(self.text_field), "text_field", "must be non-empty for source='jsonl'")
        check(self.tokenizer in ("byte", "bpe", "unigram"), "tokenizer",
              f"must be 'byte', 'bpe' or 'unigram', got {self.tokenizer!r}")
        if self.tokenizer == "byte":
            check(self.vocab_size in (256, 259), "vocab_size",
                  f"the byte tokenizer has 256 or 259 ids, got {self.vocab_size}")
            check(not self.tokenizer_path, "tokenizer_path", "only used with tokenizer='bpe' or 'unigram'")
        else:
            check(self.vocab_size >= 263, "vocab_size",
                  f"a sentencepiece vocabulary needs >= 263 ids (256 bytes + specials), got {self.vocab_size}")
            check(not self.tokenizer_path or os.path.isfile(self.tokenizer_path), "tokenizer_path",
                  f"no such file {self.tokenizer_path!r}")
        check(self.seq_len > 0, "seq_len", f"must be > 0, got {self.seq_len}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        check(self.max_docs >= 0, "max_docs", f"must be >= 0 (0 = all), got {self.max_docs}")
        check(self.max_docs != 1, "max_docs", "must be >= 2 (one document for each split), got 1")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


# ----------------------------------------------------------------------------- documents
@dataclasses.dataclass(frozen=True)
class Document:
    """A reference to one document: ``offset`` is -1 for a whole file, else a jsonl line's byte offset."""

    id: str
    path: str
    offset: int = -1


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_documents(cfg: TextDataConfig) -> list[Document]:
    """All documents of the source, sorted by id (no split, no max_docs)."""
    if cfg.source == "stdlib":
        root = stdlib_root()
        docs = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    docs.append(Document(os.path.relpath(path, root).replace(os.sep, "/"), path))
    else:
        paths = expand_globs(cfg.paths)
        if not paths:
            raise ConfigError(f"paths: no files match {list(cfg.paths)}")
        if cfg.source == "files":
            docs = [Document(p, p) for p in paths]
        else:
            docs = [d for p in paths for d in _jsonl_lines(p)]
    docs.sort(key=lambda d: d.id)
    return docs


def _jsonl_lines(path: str) -> list[Document]:
    out, offset = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append(Document(f"{path}:{lineno}", path, offset))
            offset += len(line)
    return out


def _unit_hash(salt: str, doc_id: str) -> float:
    h = hashlib.blake2b(f"{salt}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_documents(cfg: TextDataConfig, split: Literal["train", "validation"],
                    docs: Sequence[Document] | None = None) -> list[Document]:
    """The documents of one split, sorted by id; the same on every host and every run.

    A document is in validation when the hash of its id falls below ``val_fraction``;
    neither split is ever empty. ``max_docs`` first keeps the documents with the smallest
    hash under another salt (a deterministic random subset).
    """
    check(split in ("train", "validation"), "split", f"must be 'train' or 'validation', got {split!r}")
    docs = list_documents(cfg) if docs is None else list(docs)
    if cfg.max_docs and len(docs) > cfg.max_docs:
        keep = sorted(docs, key=lambda d: _unit_hash("subset", d.id))[: cfg.max_docs]
        docs = sorted(keep, key=lambda d: d.id)
    if len(docs) < 2:
        raise ConfigError(f"paths: need at least 2 documents (one per split), found {len(docs)}")
    keys = [_unit_hash("split", d.id) for d in docs]
    is_val = [k < cfg.val_fraction for k in keys]
    if not any(is_val):
        is_val[min(range(len(docs)), key=keys.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=keys.__getitem__)] = False
    want = split == "validation"
    return [d for d, v in zip(docs, is_val) if v == want]


def read_document(doc: Document, text_field: str = "text") -> str:
    """The text of a document (invalid UTF-8 is replaced, never fatal)."""
    with open(doc.path, "rb") as f:
        if doc.offset < 0:
            return f.read().decode("utf-8", errors="replace")
        f.seek(doc.offset)
        line = f.readline()
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{doc.id}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{doc.id}: no field {text_field!r} (set data.text_field)")
    return str(record[text_field])


# ----------------------------------------------------------------------------- tokenizer
def get_tokenizer(cfg: TextDataConfig, workdir: str | None = None) -> Tokenizer:
    """The tokenizer of ``cfg``: bytes, a given sentencepiece model, ``WORKDIR/tokenizer.model``,
    or a new model trained on the train split (saved there, so that generation can reload it).

    Training is deterministic, so on several hosts each trains the same model (and writes the
    same file, atomically, when the workdir is shared). A model already in the workdir is used
    as is, even if ``vocab_size`` changed since (a larger one is an error).
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer(cfg.vocab_size)
    if cfg.tokenizer_path:
        tok = Tokenizer.load(cfg.tokenizer_path)
    else:
        path = os.path.join(workdir, TOKENIZER_FILENAME) if workdir else ""
        if path and os.path.isfile(path):
            tok = Tokenizer.load(path)
        else:
            if not path:
                path = os.path.join(tempfile.mkdtemp(prefix="mlgen_tok_"), TOKENIZER_FILENAME)
            docs = split_documents(cfg, "train")
            tok = Tokenizer.train((read_document(d, cfg.text_field) for d in docs),
                                  vocab_size=cfg.vocab_size, model_type=cfg.tokenizer, out_path=path)
    check(tok.vocab_size <= cfg.vocab_size, "vocab_size",
          f"the tokenizer has {tok.vocab_size} ids but vocab_size is {cfg.vocab_size}")
    return tok


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """Document -> int32 tokens with bos/eos. Picklable: runs in grain worker processes."""

    tokenizer: Tokenizer
    text_field: str
    add_bos: bool
    add_eos: bool

    def __call__(self, doc: Document) -> np.ndarray:
        ids = self.tokenizer.encode_array(read_document(doc, self.text_field))
        parts = ([np.array([self.tokenizer.bos_id], np.int32)] if self.add_bos else []) + [ids] + (
            [np.array([self.tokenizer.eos_id], np.int32)] if self.add_eos else [])
        return np.concatenate(parts).astype(np.int32, copy=False)


# ----------------------------------------------------------------------------- pipeline
def make_lm_data(cfg: TextDataConfig, *, split: Literal["train", "validation"], seed: int,
                 workdir: str | None = None, process_index: int = 0, process_count: int = 1,
                 repeat: bool | None = None, tokenizer: Tokenizer | None = None) -> "LMBatchIterator":
    """This host's batches of one split, as a resumable iterator.

    Args:
      cfg: the data config (validated here).
      split: ``"train"`` or ``"validation"``.
      seed: shuffle seed (train); batches are a function of ``(cfg, seed)`` only.
      workdir: where a trained sentencepiece model is stored / found.
      process_index, process_count: this host and the number of hosts; each host reads
        only ``docs[process_index::process_count]`` of the split.
      repeat: loop forever; default True for train, False (one pass) for validation.
      tokenizer: reuse an already built tokenizer (else :func:`get_tokenizer`).

    Returns:
      A grain ``DatasetIterator`` (``get_state()`` / ``set_state()``) of dicts with
      ``inputs``, ``targets``, ``segment_ids``, ``positions``: int32 ``[b, T]``, and
      ``loss_mask``: float32 ``[b, T]``, where ``b = cfg.batch_size // process_count``,
      ``T = cfg.seq_len``. A finite pass ends with a batch padded by empty rows.
    """
    cfg.validate()
    check(0 <= process_index < process_count, "process_index",
          f"must be in [0, {process_count}), got {process_index}")
    check(cfg.batch_size % process_count == 0, "batch_size",
          f"global batch {cfg.batch_size} is not divisible by the {process_count} hosts")
    repeat = (split == "train") if repeat is None else repeat
    tok = tokenizer if tokenizer is not None else get_tokenizer(cfg, workdir)
    docs = split_documents(cfg, split)[process_index::process_count]
    if not docs:
        raise ConfigError(f"paths: the {split} split has fewer documents than the {process_count} hosts")

    ds = grain.MapDataset.source(docs)
    if split == "train" and cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(_Tokenize(tok, cfg.text_field, cfg.add_bos, cfg.add_eos))
    rows = cfg.batch_size // process_count
    if cfg.num_workers == 0:  # tokenize in background threads
        stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(8, 2 * rows)))
    else:  # tokenize in worker processes, sequentially in each
        stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if cfg.num_workers > 0:
        _allow_mp_outside_absl()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    # Train rows come from `rows` independent lanes (decorrelated rows); validation fills the
    # rows of a batch one after another from a single lane (no half-empty batches).
    lanes = rows if split == "train" else 1
    it = LMBatchIterator(iter(stream), ds, rows=rows, lanes=lanes, seq_len=cfg.seq_len,
                         pack=cfg.pack, pad_id=tok.pad_id, epoch_size=len(docs) if repeat else 0)
    _LIVE.add(it)
    return it


# Live iterators, closed before the interpreter tears modules down (grain's own __del__ then
# fails noisily and leaks worker shared memory).
_LIVE: "weakref.WeakSet[LMBatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        it.close()


def _allow_mp_outside_absl() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class LMBatchIterator(grain.DatasetIterator):
    """Cuts a stream of tokenized documents into batches of ``rows`` rows of ``seq_len`` tokens.

    Row ``r`` of every batch continues lane ``r % lanes``; each lane is a stream of documents.

    ``docs[p]`` must be the p-th element the ``parent`` iterator yields (random access, to
    rebuild the lanes on ``set_state``). ``epoch_size`` (0 for a finite stream) bounds how
    many too-short documents may be skipped in a row before it is an error rather than a hang.
    """

    def __init__(self, parent: grain.DatasetIterator, docs: grain.MapDataset, *, rows: int,
                 lanes: int, seq_len: int, pack: bool, pad_id: int, epoch_size: int):
        super().__init__(parent)
        self._epoch_size = epoch_size
        self._docs = docs
        self._rows, self._seq_len, self._pack, self._pad_id = rows, seq_len, pack, pad_id
        self._next_p = 0          # documents taken from the parent so far
        self._exhausted = False   # the parent has no more documents
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
            buf[n:n + take] = toks[off:off + take]
            seg[n:n + take] = piece
            pos[n:n + take] = np.arange(take)
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
        if self._exhausted and all(l is None for l in self._lanes):
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
        return {
            "parent": self._parent.get_state(),
            "next_p": self._next_p,
            "exhausted": int(self._exhausted),
            "lanes": [[-1, 0] if l is None else list(l) for l in self._lanes],
        }

    def set_state(self, state: dict[str, Any]) -> None:
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

