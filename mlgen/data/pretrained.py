"""Tokenizers that come with a pretrained model: a Hugging Face ``tokenizer.json`` (through the
``tokenizers`` package) or a sentencepiece ``tokenizer.model``, behind mlgen's
:class:`~mlgen.data.tokenizer.Tokenizer` interface.

Their special ids are the model's own, not mlgen's fixed ``pad = 0, bos = 2, eos = 3``:
:func:`load_pretrained` finds them in ``special_tokens.json`` (what ``mlgen convert import-hf``
writes into a run directory), else in Hugging Face's ``tokenizer_config.json`` /
``config.json``, else in the sentencepiece model. A missing bos is the eos (GPT-2, Qwen2), a
missing pad the eos.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import sentencepiece as spm
import tokenizers
from etils import epath

from mlgen.config import ConfigError
from mlgen.data.paths import read_bytes
from mlgen.data.tokenizer import SentencePieceTokenizer, Tokenizer

HF_TOKENIZER = "tokenizer.json"
SP_TOKENIZER = "tokenizer.model"
SPECIALS = "special_tokens.json"  # {"bos_id": .., "eos_id": .., "pad_id": ..}


class _Specials:
    """bos / eos / pad ids given at construction."""

    def __init__(self, bos_id: int, eos_id: int, pad_id: int):
        self._bos, self._eos, self._pad = int(bos_id), int(eos_id), int(pad_id)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def specials(self) -> dict[str, int]:
        return {"bos_id": self._bos, "eos_id": self._eos, "pad_id": self._pad}


class HFTokenizer(_Specials, Tokenizer):
    """A ``tokenizer.json`` (its text) with the model's special ids."""

    def __init__(self, tokenizer_json: str, *, bos_id: int, eos_id: int, pad_id: int):
        super().__init__(bos_id, eos_id, pad_id)
        self._json = tokenizer_json
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)

    def __getstate__(self):
        return {"json": self._json, **self.specials()}

    def __setstate__(self, state):
        state = dict(state)
        self.__init__(state.pop("json"), **state)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class PretrainedSentencePieceTokenizer(_Specials, SentencePieceTokenizer):
    """A pretrained sentencepiece model (e.g. Llama 2's ``tokenizer.model``) with its own ids:
    mlgen's ``SentencePieceTokenizer`` without its check that the ids are mlgen's own."""

    def __init__(self, model_proto: bytes, *, bos_id: int, eos_id: int, pad_id: int):
        super().__init__(bos_id, eos_id, pad_id)
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    def __getstate__(self):
        return {"proto": self._proto, **self.specials()}

    def __setstate__(self, state):
        state = dict(state)
        self.__init__(state.pop("proto"), **state)

    def __repr__(self) -> str:
        return f"PretrainedSentencePieceTokenizer(vocab_size={self.vocab_size})"


def _is_file(path: str) -> bool:
    return epath.Path(path).is_file()  # local or remote (gs://)


def _json(path: str) -> dict:
    return json.loads(read_bytes(path)) if _is_file(path) else {}


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _pick(bos, eos, pad) -> dict[str, int]:
    if eos is None:
        eos = bos if bos is not None else 0
    bos = eos if bos is None else bos
    return {"bos_id": int(bos), "eos_id": int(eos), "pad_id": int(eos if pad is None else pad)}


def specials_of(directory: str, tok: HFTokenizer | None, sp=None) -> dict[str, int]:
    """The bos / eos / pad ids of the tokenizer in ``directory`` (see the module docstring)."""
    saved = _json(os.path.join(directory, SPECIALS))
    if saved:
        return {k: int(saved[k]) for k in ("bos_id", "eos_id", "pad_id")}
    config = _json(os.path.join(directory, "tokenizer_config.json"))
    model = _json(os.path.join(directory, "config.json"))
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = _token(config.get(f"{kind}_token"))
        found = tok.token_id(token) if tok is not None and token else None
        if found is None and sp is not None:
            found = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}[kind]
            found = None if found < 0 else found
        if found is None:
            found = model.get(f"{kind}_token_id")
            found = found[0] if isinstance(found, list) else found
        ids[kind] = found
    return _pick(ids["bos"], ids["eos"], ids["pad"])


def has_pretrained(directory: str) -> bool:
    return any(_is_file(os.path.join(directory, f)) for f in (HF_TOKENIZER, SP_TOKENIZER))


def load_pretrained(directory: str) -> HFTokenizer | PretrainedSentencePieceTokenizer:
    """The tokenizer of a model directory (or a run directory made by ``mlgen convert
    import-hf``): ``tokenizer.json``, else ``tokenizer.model``.

    Raises:
      ConfigError: neither file is there.
    """
    directory = os.fspath(directory)
    hf = os.path.join(directory, HF_TOKENIZER)
    if _is_file(hf):
        text = read_bytes(hf).decode("utf-8")
        probe = HFTokenizer(text, bos_id=0, eos_id=0, pad_id=0)
        return HFTokenizer(text, **specials_of(directory, probe))
    sp = os.path.join(directory, SP_TOKENIZER)
    if _is_file(sp):
        proto = read_bytes(sp)
        ids = specials_of(directory, None, spm.SentencePieceProcessor(model_proto=proto))
        return PretrainedSentencePieceTokenizer(proto, **ids)
    raise ConfigError(
        f"data.tokenizer_path: no {HF_TOKENIZER} or {SP_TOKENIZER} in {directory} "
        "(tokenizer='pretrained')"
    )
