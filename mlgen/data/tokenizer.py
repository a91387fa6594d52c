"""Tokenizers: raw bytes, or sentencepiece (BPE / unigram) trained on your corpus.

Both sit behind one interface, :class:`Tokenizer`: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``.
Special ids are the same small numbers for both kinds: ``pad = 0``, ``bos = 2``,
``eos = 3`` (sentencepiece also has ``unk = 1``, never produced thanks to byte fallback).

* :class:`ByteTokenizer` (``vocab_size=256``, the default): ids are the UTF-8 bytes. The
  specials share the ASCII control codes NUL (pad), STX (start of text, bos) and ETX
  (end of text, eos), so these three characters do not survive ``decode`` (it drops
  specials). ``ByteTokenizer(vocab_size=259)`` instead puts pad/bos/eos at 256/257/258
  so that every string round-trips, at the price of a vocabulary that is not 256.
* :class:`SentencePieceTokenizer`: trained by :meth:`Tokenizer.train` with settings that
  round-trip source code and any Unicode exactly: identity normalization, no whitespace
  collapsing, no dummy prefix, whitespace-only pieces allowed (indentation), newline and
  tab as their own pieces, digits split, and byte fallback for characters outside the
  vocabulary.

Model files may be local or remote (``gs://...``): sentencepiece itself only knows
local files, so models are trained into memory and loaded from their bytes.

``mlgen tokenizer train --input GLOB... --vocab-size N --model-type bpe --out PATH``
is :func:`tokenizer_main`.
"""

from __future__ import annotations

import abc
import argparse
import io
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import sentencepiece as spm

from mlgen.data.paths import expand_globs, read_bytes, write_bytes_atomic

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# Sentencepiece keeps every training sentence in memory; lines are our sentences.
_MAX_TRAIN_LINES = 2_000_000
_MAX_LINE_BYTES = 16384


class Tokenizer(abc.ABC):
    """Text <-> token ids. Implementations are picklable (grain workers tokenize)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; pad/bos/eos ids are dropped."""

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array (the data pipeline's form)."""
        return np.asarray(self.encode(text), dtype=np.int32)

    @staticmethod
    def train(
        files_or_iterator: str | Sequence[str] | Iterable[str],
        *,
        vocab_size: int,
        model_type: Literal["bpe", "unigram"] = "bpe",
        out_path: str,
        max_lines: int = _MAX_TRAIN_LINES,
        seed: int = 0,
    ) -> SentencePieceTokenizer:
        """Trains a sentencepiece model and writes it to ``out_path``.

        Args:
          files_or_iterator: a glob or a list/tuple of globs and paths; any other
            iterable (a generator, ``iter(docs)``) is taken as the documents' texts.
          vocab_size: target vocabulary size, specials and the 256 byte pieces included
            (a soft limit: a tiny corpus may give fewer pieces).
          model_type: ``"bpe"`` or ``"unigram"``.
          out_path: where the ``.model`` file goes (local or remote; written atomically).
          max_lines: at most this many lines are sampled for training.
          seed: sentencepiece's sampling seed.

        Returns:
          The trained tokenizer.
        """
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: must be 'bpe' or 'unigram', got {model_type!r}")
        min_vocab = 256 + 4 + 2 + 1
        if vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size: must be >= {min_vocab} (256 byte pieces + specials), got {vocab_size}"
            )
        if isinstance(files_or_iterator, (str, list, tuple)):
            pats = (
                [files_or_iterator]
                if isinstance(files_or_iterator, str)
                else list(files_or_iterator)
            )
            paths = expand_globs(pats)
            if not paths:
                raise ValueError(f"files_or_iterator: no files match {pats}")
            docs: Iterable[str] = (_read_text(p) for p in paths)
        else:
            docs = files_or_iterator
        spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(docs, max_lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            user_defined_symbols=["\n", "\t"],
            max_sentence_length=_MAX_LINE_BYTES,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=max(1, min(16, os.cpu_count() or 1)),
            minloglevel=2,
        )
        proto = model.getvalue()
        write_bytes_atomic(out_path, proto)
        return SentencePieceTokenizer(proto)

    @staticmethod
    def load(path: str) -> Tokenizer:
        """Loads a sentencepiece ``.model`` file (local or remote);
        ``"byte"`` gives the byte tokenizer."""
        if path == "byte":
            return ByteTokenizer()
        return SentencePieceTokenizer(read_bytes(path))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids; see the module docstring for where the specials live."""

    def __init__(self, vocab_size: int = 256):
        if vocab_size not in (256, 259):
            raise ValueError(f"vocab_size: the byte tokenizer has 256 or 259 ids, got {vocab_size}")
        self._vocab_size = vocab_size
        self._offset_specials = vocab_size == 259

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer) and other._vocab_size == self._vocab_size

    def __hash__(self) -> int:
        return hash(("byte", self._vocab_size))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self._vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return 256 if self._offset_specials else PAD_ID

    @property
    def bos_id(self) -> int:
        return 257 if self._offset_specials else BOS_ID

    @property
    def eos_id(self) -> int:
        return 258 if self._offset_specials else EOS_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        data = bytes(int(i) for i in ids if int(i) not in special and 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model held as its serialized proto (so it pickles)."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        got = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"sentencepiece model has (pad, bos, eos) ids {got}; mlgen expects "
                f"{(PAD_ID, BOS_ID, EOS_ID)} (train it with Tokenizer.train)"
            )

    def __getstate__(self):
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


# ----------------------------------------------------------------------------- helpers
def _read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8", errors="replace")


def _lines(docs: Iterable[str], max_lines: int) -> Iterator[str]:
    n = 0
    for doc in docs:
        for line in doc.splitlines(keepends=True):
            if len(line.encode("utf-8")) > _MAX_LINE_BYTES:
                continue
            yield line
            n += 1
            if n >= max_lines:
                return


# ----------------------------------------------------------------------------- CLI
def tokenizer_main(argv: list[str]) -> int:
    """``mlgen tokenizer train --input GLOB... --vocab-size N --model-type bpe --out PATH``."""
    parser = argparse.ArgumentParser(
        prog="mlgen tokenizer", description="Train or try a sentencepiece tokenizer."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a sentencepiece model on text files")
    tr.add_argument(
        "--input", nargs="+", required=True, metavar="GLOB", help="text files (globs, ** allowed)"
    )
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tr.add_argument("--out", required=True, metavar="PATH", help="output .model file")
    tr.add_argument("--max-lines", type=int, default=_MAX_TRAIN_LINES)
    enc = sub.add_parser("encode", help="print the pieces of a text")
    enc.add_argument("--model", required=True, metavar="PATH")
    enc.add_argument("text")
    args = parser.parse_args(argv)

    if args.command == "train":
        paths = expand_globs(args.input)
        if not paths:
            print(f"mlgen tokenizer: --input matched no files: {args.input}", file=sys.stderr)
            return 2
        try:
            tok = Tokenizer.train(
                paths,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                out_path=args.out,
                max_lines=args.max_lines,
            )
        except ValueError as e:
            print(f"mlgen tokenizer: {e}", file=sys.stderr)
            return 2
        print(
            f"wrote {args.out}: {args.model_type}, vocab {tok.vocab_size}, from {len(paths)} files"
        )
        return 0
    tok = Tokenizer.load(args.model)
    ids = tok.encode(args.text)
    pieces = [tok.id_to_piece(i) for i in ids] if isinstance(tok, SentencePieceTokenizer) else ids
    print(f"{len(ids)} tokens: {pieces}")
    return 0
