"""Text data for language models: the config, the tokenizer, and the assembled pipeline.

The pipeline (grain), per host::

    documents (sources.py: sorted; max_docs subset; train/validation split by hash of id)
      -> this host's shard  docs[process_index::process_count]        (pipeline.py)
      -> MapDataset: shuffle(seed), reshuffled each epoch; repeat (train)
      -> map: read + tokenize + bos/eos            (worker processes if num_workers > 0)
      -> lanes: streams of documents, cut into rows of T+1 tokens      (packing.py)
      -> batches of numpy arrays

Nothing is tokenized ahead of time: the first batch costs ~b documents. Resuming is
exact: see :class:`~mlgen.data.packing.LMBatchIterator`.

The names of ``sources`` and ``packing`` are re-exported here, where callers found them
before the split into modules.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Literal

import grain
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from mlgen.config import ConfigError, check, register
from mlgen.data.packing import LMBatchIterator
from mlgen.data.paths import is_remote
from mlgen.data.pipeline import host_rows, host_shard, map_dataset, to_iter_dataset, track
from mlgen.data.pretrained import load_pretrained
from mlgen.data.sources import Document, list_documents, read_document, split_documents, stdlib_root
from mlgen.data.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "TOKENIZER_FILENAME",
    "Document",
    "LMBatchIterator",
    "TextDataConfig",
    "check_corpus",
    "get_tokenizer",
    "list_documents",
    "make_lm_data",
    "read_document",
    "split_documents",
    "stdlib_root",
]

TOKENIZER_FILENAME = "tokenizer.model"


@register("text", aliases=("mlgen.data.text:TextDataConfig",))
@dataclasses.dataclass(frozen=True, kw_only=True)
class TextDataConfig:
    """Where the text comes from, how it is tokenized, and how batches are shaped.

    ``batch_size`` is the GLOBAL batch; each of ``process_count`` hosts gets
    ``batch_size // process_count`` rows of ``seq_len`` tokens.
    ``tokenizer="byte"`` has ``vocab_size`` 256 (bos/eos/pad share the ASCII control codes
    STX/ETX/NUL) or 259 (three extra ids); ``bpe``/``unigram`` train a sentencepiece model of
    ``vocab_size`` pieces on the train split into ``WORKDIR/tokenizer.model`` unless
    ``tokenizer_path`` names one. ``pretrained``: a pretrained model's tokenizer
    (``tokenizer.json`` or a sentencepiece ``tokenizer.model`` with its own special ids,
    ``mlgen.data.pretrained``) in the directory ``tokenizer_path``, default the workdir (what
    ``mlgen convert import-hf`` writes). ``paths`` and ``tokenizer_path`` may be local or remote
    (``gs://bucket/...``).
    """

    source: Literal["stdlib", "files", "jsonl"] = "stdlib"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer: Literal["byte", "bpe", "unigram", "pretrained"] = "byte"
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
        check(
            self.source in ("stdlib", "files", "jsonl"),
            "source",
            f"must be 'stdlib', 'files' or 'jsonl', got {self.source!r}",
        )
        if self.source == "stdlib":
            check(not self.paths, "paths", "only used with source='files' or 'jsonl'")
        else:
            check(len(self.paths) > 0, "paths", f"source={self.source!r} needs at least one glob")
            check(
                all(isinstance(p, str) and p for p in self.paths),
                "paths",
                "must be non-empty strings",
            )
            check(
                not any(is_remote(p) and "**" in p for p in self.paths),
                "paths",
                "'**' is not supported for remote paths (use '*' per directory)",
            )
        if self.source == "jsonl":
            check(bool(self.text_field), "text_field", "must be non-empty for source='jsonl'")
        check(
            self.tokenizer in ("byte", "bpe", "unigram", "pretrained"),
            "tokenizer",
            f"must be 'byte', 'bpe', 'unigram' or 'pretrained', got {self.tokenizer!r}",
        )
        if self.tokenizer == "pretrained":
            check(self.vocab_size > 0, "vocab_size", f"must be > 0, got {self.vocab_size}")
        elif self.tokenizer == "byte":
            check(
                self.vocab_size in (256, 259),
                "vocab_size",
                f"the byte tokenizer has 256 or 259 ids, got {self.vocab_size}",
            )
            check(
                not self.tokenizer_path,
                "tokenizer_path",
                "only used with tokenizer='bpe' or 'unigram'",
            )
        else:
            check(
                self.vocab_size >= 263,
                "vocab_size",
                "a sentencepiece vocabulary needs >= 263 ids (256 bytes + specials), "
                f"got {self.vocab_size}",
            )
            # A local file is checked here; a remote one (gs://) when the data is built, so that
            # validating (mlgen plan) never needs the bucket's credentials.
            check(
                not self.tokenizer_path
                or is_remote(self.tokenizer_path)
                or epath.Path(self.tokenizer_path).is_file(),
                "tokenizer_path",
                f"no such file {self.tokenizer_path!r}",
            )
        check(self.seq_len > 0, "seq_len", f"must be > 0, got {self.seq_len}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(
            0.0 < self.val_fraction < 1.0,
            "val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
        )
        check(self.max_docs >= 0, "max_docs", f"must be >= 0 (0 = all), got {self.max_docs}")
        check(self.max_docs != 1, "max_docs", "must be >= 2 (one document for each split), got 1")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


def check_corpus(cfg: TextDataConfig, process_count: int | None = None) -> None:
    """Reads the source before training: its files exist, split into train and validation with
    a document for each of ``process_count`` hosts (default: the JAX processes), and the train
    split holds text.

    Raises:
      ConfigError: ``paths:`` (or ``text_field:`` for a jsonl line without it) otherwise, e.g.
        ``paths: the 3 files matching ['data/*.txt'] contain no text`` for empty files, which
        would train on bos/eos tokens only.
    """
    hosts = jax.process_count() if process_count is None else process_count
    docs = list_documents(cfg)
    splits = {name: split_documents(cfg, name, docs) for name in ("train", "validation")}
    for name, part in splits.items():
        check(
            len(part) >= hosts,
            "paths",
            f"the {name} split has {len(part)} documents, fewer than the {hosts} hosts",
        )
    if not any(_text(d, cfg.text_field) for d in splits["train"]):
        what = "files" if cfg.source == "files" else "documents"
        where = "" if cfg.source == "stdlib" else f" matching {list(cfg.paths)}"
        check(
            any(_text(d, cfg.text_field) for d in splits["validation"]),
            "paths",
            f"the {len(docs)} {what}{where} contain no text",
        )
        raise ConfigError(
            f"paths: the {len(splits['train'])} {what} of the train split contain no text "
            "(only validation documents do)"
        )


def _text(doc: Document, text_field: str) -> str:
    try:
        return read_document(doc, text_field)
    except ValueError as e:  # a jsonl line that is no JSON object with the text field
        field = "text_field" if "no field" in str(e) else "paths"
        raise ConfigError(f"{field}: {e}") from None


# ----------------------------------------------------------------------------- tokenizer
def get_tokenizer(cfg: TextDataConfig, workdir: str | None = None) -> Tokenizer:
    """The tokenizer of ``cfg``: bytes, a given sentencepiece model, ``WORKDIR/tokenizer.model``,
    or a new model trained on the train split (saved there, so that generation can reload it).

    A model is trained once: with several JAX processes, process 0 trains and writes it
    (atomically) while the others wait at a barrier and then read it, so the workdir must
    be one that every host sees (``gs://...`` on a pod). A model already in the workdir is
    used as is, even if ``vocab_size`` changed since (a larger one is an error).

    Args:
      cfg: the data config.
      workdir: where the trained model is stored / found (local or remote); None trains
        into a temporary directory (one process only).

    Returns:
      The tokenizer.

    Raises:
      ConfigError: ``vocab_size:`` smaller than the model's, or ``workdir:`` missing or not
        shared by the processes.
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer(cfg.vocab_size)
    if cfg.tokenizer == "pretrained":
        check(
            bool(cfg.tokenizer_path or workdir),
            "data.tokenizer_path",
            "tokenizer='pretrained' needs a directory (or a workdir holding the tokenizer)",
        )
        tok = load_pretrained(cfg.tokenizer_path or str(workdir))
    elif cfg.tokenizer_path:
        check(
            epath.Path(cfg.tokenizer_path).is_file(),
            "data.tokenizer_path",
            f"no such file {cfg.tokenizer_path!r}",
        )
        tok = Tokenizer.load(cfg.tokenizer_path)
    elif workdir:
        tok = _trained_once(cfg, str(epath.Path(workdir) / TOKENIZER_FILENAME))
    else:
        check(
            jax.process_count() == 1,
            "workdir",
            f"the {jax.process_count()} processes need a shared workdir for the trained tokenizer",
        )
        tok = _train(cfg, os.path.join(tempfile.mkdtemp(prefix="mlgen_tok_"), TOKENIZER_FILENAME))
    check(
        tok.vocab_size <= cfg.vocab_size,
        "vocab_size",
        f"the tokenizer has {tok.vocab_size} ids but vocab_size is {cfg.vocab_size}",
    )
    return tok


def _train(cfg: TextDataConfig, path: str) -> Tokenizer:
    docs = split_documents(cfg, "train")
    return Tokenizer.train(
        (read_document(d, cfg.text_field) for d in docs),
        vocab_size=cfg.vocab_size,
        model_type=cfg.tokenizer,
        out_path=path,
    )


def _trained_once(cfg: TextDataConfig, path: str) -> Tokenizer:
    """Loads the model at ``path``, training it first (on process 0 only) if there is none."""
    if jax.process_count() == 1:
        return Tokenizer.load(path) if epath.Path(path).is_file() else _train(cfg, path)
    # Every process reaches the barrier exactly once, whether the model existed or not and
    # whether training failed or not, so none waits forever for a peer.
    trained, error = None, None
    if jax.process_index() == 0 and not epath.Path(path).is_file():
        try:
            trained = _train(cfg, path)
        except Exception as e:  # noqa: BLE001  (re-raised after the barrier)
            error = e
    multihost_utils.sync_global_devices("mlgen.data.text.get_tokenizer")
    if error is not None:
        raise error
    if trained is not None:
        return trained
    if not epath.Path(path).is_file():
        raise ConfigError(
            f"workdir: process {jax.process_index()} finds no {path} after process 0 trained it "
            "(the workdir must be shared by all hosts; see process 0 for an error)"
        )
    return Tokenizer.load(path)


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """Document -> int32 tokens with bos/eos. Picklable: runs in grain worker processes."""

    tokenizer: Tokenizer
    text_field: str
    add_bos: bool
    add_eos: bool

    def __call__(self, doc: Document) -> np.ndarray:
        ids = self.tokenizer.encode_array(read_document(doc, self.text_field))
        parts = (
            ([np.array([self.tokenizer.bos_id], np.int32)] if self.add_bos else [])
            + [ids]
            + ([np.array([self.tokenizer.eos_id], np.int32)] if self.add_eos else [])
        )
        return np.concatenate(parts).astype(np.int32, copy=False)


# ----------------------------------------------------------------------------- pipeline
def batch_spec(cfg: TextDataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The GLOBAL batch's ``key -> (shape, dtype)`` (what :func:`make_lm_data` yields, all hosts
    together), without a tokenizer or any data (``mlgen plan``)."""
    shape, i32 = (cfg.batch_size, cfg.seq_len), np.dtype(np.int32)
    keys = ("inputs", "targets", "segment_ids", "positions")
    return {**{k: (shape, i32) for k in keys}, "loss_mask": (shape, np.dtype(np.float32))}


def make_lm_data(
    cfg: TextDataConfig,
    *,
    split: Literal["train", "validation"],
    seed: int,
    workdir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool | None = None,
    tokenizer: Tokenizer | None = None,
) -> LMBatchIterator:
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
    rows = host_rows(cfg.batch_size, process_index, process_count)
    repeat = (split == "train") if repeat is None else repeat
    tok = tokenizer if tokenizer is not None else get_tokenizer(cfg, workdir)
    docs = host_shard(split_documents(cfg, split), process_index, process_count)
    if not docs:
        raise ConfigError(
            f"paths: the {split} split has fewer documents than the {process_count} hosts"
        )

    ds = map_dataset(
        docs, shuffle_seed=seed if split == "train" and cfg.shuffle else None, repeat=repeat
    )
    ds = ds.map(_Tokenize(tok, cfg.text_field, cfg.add_bos, cfg.add_eos))
    if cfg.num_workers == 0:  # tokenize in background threads
        read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(8, 2 * rows))
    else:  # tokenize in worker processes, sequentially in each
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    stream = to_iter_dataset(ds, read, cfg.num_workers)
    # Train rows come from `rows` independent lanes (decorrelated rows); validation fills the
    # rows of a batch one after another from a single lane (no half-empty batches).
    lanes = rows if split == "train" else 1
    return track(
        LMBatchIterator(
            iter(stream),
            ds,
            rows=rows,
            lanes=lanes,
            seq_len=cfg.seq_len,
            pack=cfg.pack,
            pad_id=tok.pad_id,
            epoch_size=len(docs) if repeat else 0,
        )
    )
