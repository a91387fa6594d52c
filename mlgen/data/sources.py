"""Text sources: which documents there are, the train/validation split, reading one.

Sources (``TextDataConfig.source``):

- ``stdlib``: the installed Python standard library's ``.py`` files, the default corpus
  (no download); ids are paths relative to the library's root;
- ``files``: globs (local or ``gs://...``), one file = one document; the id is the path
  as the glob returned it;
- ``jsonl``: globs, one non-blank line = one document (text under ``text_field``); the id
  is ``PATH:LINENO``.

A :class:`Document` is a reference (path and, for jsonl, the line's byte offset); text is
read only when the pipeline tokenizes it. The split is a pure function of the ids, so it is
the same on every host and in every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from etils import epath

from mlgen.config import ConfigError, check
from mlgen.data.paths import expand_globs

if TYPE_CHECKING:  # text.py imports this module; the config class lives there.
    from mlgen.data.text import TextDataConfig

# Directories of the standard library that are not part of the default corpus.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


@dataclasses.dataclass(frozen=True)
class Document:
    """A reference to one document: ``offset`` is -1 for a whole file,
    else a jsonl line's byte offset."""

    id: str
    path: str
    offset: int = -1


def stdlib_root() -> str:
    """The directory of the installed Python standard library (the default corpus)."""
    return sysconfig.get_paths()["stdlib"]


def list_documents(cfg: TextDataConfig) -> list[Document]:
    """All documents of the source, sorted by id (no split, no ``max_docs``).

    Args:
      cfg: the data config (``source``, ``paths``).

    Returns:
      The documents, sorted by id.

    Raises:
      ConfigError: ``paths:`` when no file matches the globs.
    """
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
    with epath.Path(path).open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append(Document(f"{path}:{lineno}", path, offset))
            offset += len(line)
    return out


def _unit_hash(salt: str, doc_id: str) -> float:
    h = hashlib.blake2b(f"{salt}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_documents(
    cfg: TextDataConfig,
    split: Literal["train", "validation"],
    docs: Sequence[Document] | None = None,
) -> list[Document]:
    """The documents of one split, sorted by id; the same on every host and every run.

    A document is in validation when the hash of its id falls below ``val_fraction``;
    neither split is ever empty. ``max_docs`` first keeps the documents with the smallest
    hash under another salt (a deterministic random subset).

    Args:
      cfg: the data config (``val_fraction``, ``max_docs``, and the source if ``docs`` is None).
      split: ``"train"`` or ``"validation"``.
      docs: all documents of the source (default: :func:`list_documents`).

    Returns:
      The split's documents, sorted by id.
    """
    check(
        split in ("train", "validation"), "split", f"must be 'train' or 'validation', got {split!r}"
    )
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
    """The text of a document (invalid UTF-8 is replaced, never fatal).

    Args:
      doc: the document (local or remote file; a jsonl line is found by its byte offset).
      text_field: the jsonl field that holds the text.

    Returns:
      The text.

    Raises:
      ValueError: a jsonl line is not JSON or has no ``text_field``.
    """
    with epath.Path(doc.path).open("rb") as f:
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
