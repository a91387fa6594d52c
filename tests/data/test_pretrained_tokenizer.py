"""Pretrained tokenizers (tokenizer.json, sentencepiece tokenizer.model) behind mlgen's
Tokenizer interface, against transformers' and sentencepiece's own encodings."""

import io
import json
import pickle

import pytest
import sentencepiece as spm
from transformers import PreTrainedTokenizerFast

from mlgen.config import ConfigError
from mlgen.data.pretrained import HFTokenizer, PretrainedSentencePieceTokenizer, load_pretrained
from tests.convert.tokenizer_files import TEXT, write_tokenizer

SAMPLES = ["hello world", "def f(x):\n\treturn x  + ✓", "the lazy añadir"]  # chars of TEXT


def test_tokenizer_json_encodes_as_transformers(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_pretrained(tmp_path)
    assert isinstance(tok, HFTokenizer)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(ref) <= 128
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text  # specials dropped
    again = pickle.loads(pickle.dumps(tok))  # grain workers
    assert again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1]) and again.eos_id == 2


def test_sentencepiece_model_keeps_its_own_ids(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_writer=model,
        vocab_size=100,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )  # sentencepiece's defaults, as Llama 2's: unk 0, bos 1, eos 2, no pad
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = load_pretrained(tmp_path)
    assert isinstance(tok, PretrainedSentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad: the eos
    for text in SAMPLES[::2]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode([1, *tok.encode(text), 2]) == sp.decode(sp.encode(text))
    # special_tokens.json (what mlgen convert import-hf writes) wins over the model's own.
    (tmp_path / "special_tokens.json").write_text(json.dumps(dict(bos_id=1, eos_id=2, pad_id=0)))
    assert load_pretrained(tmp_path).pad_id == 0


def test_a_directory_without_a_tokenizer_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json or tokenizer.model"):
        load_pretrained(tmp_path)
