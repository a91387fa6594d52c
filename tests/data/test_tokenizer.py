"""Tokenizers round-trip code and any Unicode exactly; the CLI trains a model."""

import os
import pickle

import pytest

from mlgen.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, tokenizer_main
from tests.data import data_corpus as corpus

ROUND_TRIP = [
    "",
    "\t",
    "\tx\t\ty\t",
    "a  b\n c",
    "     ",
    "x      = 1   \n\n\n",
    "    def f(self):\n        return 1\n",
    "\n    leading indentation\n\t\tand tabs",
    "漢字かな交じり文、한국어, 中文标点。",
    "🙂👍🏽👨‍👩‍👧 e\u0301 ﬁ Å Å",  # emoji, ZWJ sequence, combining marks, ligature, NFC/NFD
    "\r\n windows line end\r\n",
    corpus.CODE,
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    docs = [corpus.CODE * 3] + [
        open(p, encoding="utf-8").read() for p in corpus.write_files(str(root), 12)
    ]
    return {
        kind: Tokenizer.train(
            iter(docs), vocab_size=320, model_type=kind, out_path=str(root / f"{kind}.model")
        )
        for kind in ("bpe", "unigram")
    }


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip(trained, kind, text):
    tok = trained[kind]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_array(text).tolist() == ids


@pytest.mark.parametrize("vocab_size", [256, 259])
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_round_trip(vocab_size, text):
    tok = ByteTokenizer(vocab_size)
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


def test_byte_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (256, 0, 2, 3)
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id]) == "hi"
    wide = ByteTokenizer(259)
    assert (wide.pad_id, wide.bos_id, wide.eos_id) == (256, 257, 258)
    assert wide.decode(wide.encode("\x00\x02\x03")) == "\x00\x02\x03"
    assert wide.decode([257, 104, 105, 258, 256]) == "hi"
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(300)


def test_sentencepiece_specials_and_pickle(trained):
    tok = trained["bpe"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 263 <= tok.vocab_size <= 320
    assert (
        tok.decode([tok.bos_id] + tok.encode("def f():") + [tok.eos_id, tok.pad_id]) == "def f():"
    )
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(corpus.CODE) == tok.encode(corpus.CODE)
    # Newlines and tabs are pieces of their own; indentation is compressed.
    assert tok.id_to_piece(tok.encode("\n")[0]) == "\n"
    assert len(tok.encode("        return")) < len("        return")


def test_load_and_train_from_files(tmp_path):
    corpus.write_files(str(tmp_path), 10)
    out = tmp_path / "m" / "tok.model"
    tok = Tokenizer.train(
        str(tmp_path / "*.txt"), vocab_size=300, model_type="unigram", out_path=str(out)
    )
    loaded = Tokenizer.load(str(out))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(corpus.CODE) == tok.encode(corpus.CODE)
    assert isinstance(Tokenizer.load("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(iter(["abc"]), vocab_size=100, out_path=str(tmp_path / "x.model"))
    with pytest.raises(ValueError, match="no files"):
        Tokenizer.train(
            str(tmp_path / "*.nothing"), vocab_size=300, out_path=str(tmp_path / "x.model")
        )


def test_cli_train(tmp_path, capsys):
    corpus.write_files(str(tmp_path), 10)
    out = str(tmp_path / "cli.model")
    rc = tokenizer_main(
        [
            "train",
            "--input",
            str(tmp_path / "doc00*.txt"),
            str(tmp_path / "doc01*.txt"),
            "--vocab-size",
            "300",
            "--model-type",
            "bpe",
            "--out",
            out,
        ]
    )
    assert rc == 0 and os.path.isfile(out)
    assert "vocab" in capsys.readouterr().out
    assert Tokenizer.load(out).decode(Tokenizer.load(out).encode(corpus.CODE)) == corpus.CODE
    assert tokenizer_main(["encode", "--model", out, "def f():"]) == 0
    assert (
        tokenizer_main(
            ["train", "--input", str(tmp_path / "none*"), "--vocab-size", "300", "--out", out]
        )
        == 2
    )
    assert (
        tokenizer_main(
            ["train", "--input", str(tmp_path / "*.txt"), "--vocab-size", "10", "--out", out]
        )
        == 2
    )
    with pytest.raises(SystemExit):
        tokenizer_main(["train", "--vocab-size", "300"])
