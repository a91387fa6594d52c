"""The text pipeline: split, host shards, packing invariants, determinism, exact resume."""

import collections
import json
import os

import numpy as np
import pytest

from mlgen.config import ConfigError, section_class, section_name
from mlgen.data import text as text_lib
from mlgen.data.images import ImageDataConfig
from mlgen.data.text import TextDataConfig, get_tokenizer, make_lm_data, split_documents
from mlgen.data.tokenizer import ByteTokenizer
from tests.data import data_corpus as corpus

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus.write_files(str(root), 24)
    return str(root / "*.txt")


def _cfg(files, **kw):
    kw = {
        "source": "files",
        "paths": (files,),
        "seq_len": 16,
        "batch_size": 4,
        "val_fraction": 0.25,
        **kw,
    }
    return TextDataConfig(**kw)


def _doc_tokens(cfg, docs):
    tok = get_tokenizer(cfg, None)
    fn = text_lib._Tokenize(tok, cfg.text_field, cfg.add_bos, cfg.add_eos)
    return [fn(d) for d in docs]


def _transitions(token_lists, min_len=1):
    c = collections.Counter()
    for t in token_lists:
        if len(t) >= min_len:
            c.update(zip(t[:-1].tolist(), t[1:].tolist()))
    return c


def _trained_transitions(batches):
    c = collections.Counter()
    for b in batches:
        m = b["loss_mask"].astype(bool)
        c.update(zip(b["inputs"][m].tolist(), b["targets"][m].tolist()))
    return c


def _check_row_invariants(b, pad_id, bos_id, T):
    for k in KEYS:
        assert b[k].shape[1] == T
    assert b["loss_mask"].dtype == np.float32
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert b[k].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # shifted by one
    for seg, pos, inp, mask in zip(b["segment_ids"], b["positions"], b["inputs"], b["loss_mask"]):
        valid = seg > 0
        if valid.any():
            assert seg[0] == 1
        n = int(valid.sum())
        assert not valid[n:].any(), "padding only at the end of a row"
        assert np.all(inp[n:] == pad_id) and np.all(mask[n:] == 0) and np.all(pos[n:] == 0)
        # segment ids count 1, 2, ... and positions restart at 0 in each segment
        assert set(np.diff(seg[:n]).tolist()) <= {0, 1}
        starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
        for s, e in zip(starts, list(starts[1:]) + [n]):
            np.testing.assert_array_equal(pos[s:e], np.arange(e - s))
        # a bos token is always the first token of its segment
        assert np.all(pos[:n][inp[:n] == bos_id] == 0)
        # no target crosses into the next segment (the last target's segment is not in the row)
        assert np.all(mask[: max(n - 1, 0)][seg[1:n] != seg[: max(n - 1, 0)]] == 0)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_one_pass_trains_every_transition_once(files, pack, split):
    cfg = _cfg(files, pack=pack)
    tok = ByteTokenizer()
    batches = list(make_lm_data(cfg, split=split, seed=0, repeat=False))
    for b in batches:
        _check_row_invariants(b, tok.pad_id, tok.bos_id, cfg.seq_len)
    docs = split_documents(cfg, split)
    want = _transitions(_doc_tokens(cfg, docs))
    got = _trained_transitions(batches)
    assert got == want  # each within-document transition exactly once; (eos, bos) never
    assert (tok.eos_id, tok.bos_id) not in got


def test_pack_false_rows_hold_one_document(files):
    cfg = _cfg(files, pack=False, seq_len=32)
    for b in make_lm_data(cfg, split="train", seed=1, repeat=False):
        assert b["segment_ids"].max() <= 1

    # packing fills rows: fewer padded positions inside rows that hold tokens than without. (Wholly
    # empty rows only pad the pass's last batches, whose count depends on which documents the
    # path-hashed split puts in train, so they say nothing about packing.)
    def padding(pack):
        total = 0
        for b in make_lm_data(
            _cfg(files, pack=pack, seq_len=32), split="train", seed=1, repeat=False
        ):
            used = (b["segment_ids"] != 0).any(axis=1)
            total += int((b["segment_ids"][used] == 0).sum())
        return total

    assert padding(True) < padding(False)


def test_without_bos_eos(files):
    cfg = _cfg(files, add_bos=False, add_eos=False)
    batches = list(make_lm_data(cfg, split="validation", seed=0))
    docs = split_documents(cfg, "validation")
    assert _trained_transitions(batches) == _transitions(_doc_tokens(cfg, docs))
    assert not any((b["inputs"][b["segment_ids"] > 0] == 2).any() for b in batches)


def test_split_is_deterministic_disjoint_and_never_empty(files, tmp_path):
    cfg = _cfg(files)
    train, val = split_documents(cfg, "train"), split_documents(cfg, "validation")
    assert train == split_documents(cfg, "train") and val == split_documents(cfg, "validation")
    assert not {d.id for d in train} & {d.id for d in val}
    assert {d.id for d in train} | {d.id for d in val} == {
        d.id for d in text_lib.list_documents(cfg)
    }
    assert len(val) > 0 and len(train) > 0
    tiny = _cfg(files, val_fraction=1e-9, max_docs=3)
    assert (
        len(split_documents(tiny, "validation")) == 1 and len(split_documents(tiny, "train")) == 2
    )
    big = _cfg(files, val_fraction=0.999999)
    assert len(split_documents(big, "train")) >= 1
    # max_docs picks a deterministic subset
    sub = _cfg(files, max_docs=10)
    assert len(split_documents(sub, "train")) + len(split_documents(sub, "validation")) == 10


def test_host_shards_are_disjoint_and_cover_the_split(files):
    cfg = _cfg(files, batch_size=4, pack=True)
    parts = [
        list(
            make_lm_data(cfg, split="train", seed=0, repeat=False, process_index=i, process_count=2)
        )
        for i in range(2)
    ]
    for part in parts:
        assert all(b["inputs"].shape == (2, cfg.seq_len) for b in part)
    docs = split_documents(cfg, "train")
    shard_docs = [docs[i::2] for i in range(2)]
    assert not {d.id for d in shard_docs[0]} & {d.id for d in shard_docs[1]}
    for part, sd in zip(parts, shard_docs):
        assert _trained_transitions(part) == _transitions(_doc_tokens(cfg, sd))
    with pytest.raises(ConfigError, match="^batch_size:"):
        make_lm_data(_cfg(files, batch_size=3), split="train", seed=0, process_count=2)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_deterministic_and_seeded(files):
    cfg = _cfg(files)
    a = _take(make_lm_data(cfg, split="train", seed=0), 30)
    _assert_same(a, _take(make_lm_data(cfg, split="train", seed=0), 30))
    b = _take(make_lm_data(cfg, split="train", seed=1), 30)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    v = list(make_lm_data(cfg, split="validation", seed=0))
    _assert_same(
        v, list(make_lm_data(cfg, split="validation", seed=5))
    )  # validation ignores the seed


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("skip", [0, 1, 7, 40])
def test_resume_is_exact(files, pack, skip):
    cfg = _cfg(files, pack=pack)
    it = make_lm_data(cfg, split="train", seed=3)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    expected = _take(it, 50)  # crosses epochs: 24 small docs
    resumed = make_lm_data(cfg, split="train", seed=3)
    resumed.set_state(state)
    _assert_same(expected, _take(resumed, 50))


def test_resume_validation_to_the_end(files):
    cfg = _cfg(files, val_fraction=0.5)
    it = make_lm_data(cfg, split="validation", seed=0)
    _take(it, 3)
    state = it.get_state()
    rest = list(it)
    resumed = make_lm_data(cfg, split="validation", seed=0)
    resumed.set_state(state)
    _assert_same(rest, list(resumed))


def test_resume_with_a_worker_process(files):
    cfg = _cfg(files, num_workers=1)
    it = make_lm_data(cfg, split="train", seed=2)
    head = _take(it, 5)
    _assert_same(
        head, _take(make_lm_data(_cfg(files), split="train", seed=2), 5)
    )  # workers don't change data
    state = it.get_state()
    expected = _take(it, 20)
    resumed = make_lm_data(cfg, split="train", seed=2)
    resumed.set_state(state)
    _assert_same(expected, _take(resumed, 20))


def test_jsonl_source(tmp_path):
    path = corpus.write_jsonl(str(tmp_path), 30)
    cfg = TextDataConfig(source="jsonl", paths=(path,), seq_len=16, batch_size=4, val_fraction=0.2)
    docs = text_lib.list_documents(cfg)
    assert len(docs) == 30 and all(d.offset >= 0 for d in docs)
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    assert sorted(text_lib.read_document(d) for d in docs) == sorted(texts)
    val = split_documents(cfg, "validation")
    assert _trained_transitions(make_lm_data(cfg, split="validation", seed=0)) == _transitions(
        _doc_tokens(cfg, val)
    )
    bad = TextDataConfig(source="jsonl", paths=(path,), text_field="body", seq_len=16, batch_size=4)
    with pytest.raises(ValueError, match="no field 'body'"):
        next(make_lm_data(bad, split="train", seed=0))


def test_stdlib_default_corpus():
    cfg = TextDataConfig(max_docs=40, seq_len=128, batch_size=16)
    docs = text_lib.list_documents(cfg)
    assert len(docs) > 200 and docs == sorted(docs, key=lambda d: d.id)
    assert not any("site-packages" in d.id or d.id.startswith("test/") for d in docs)
    b = next(make_lm_data(cfg, split="train", seed=0))  # tokenizes ~16 documents, not 40
    assert b["inputs"].shape == (16, 128) and b["loss_mask"].mean() > 0.9
    assert b["inputs"].max() < 256


def test_sentencepiece_pipeline_trains_into_workdir(files, tmp_path):
    cfg = _cfg(files, tokenizer="bpe", vocab_size=300)
    tok = get_tokenizer(cfg, str(tmp_path))
    path = tmp_path / text_lib.TOKENIZER_FILENAME
    assert path.is_file() and tok.vocab_size <= 300
    mtime = os.path.getmtime(path)
    again = get_tokenizer(cfg, str(tmp_path))  # reloaded, not retrained
    assert os.path.getmtime(path) == mtime and again.encode(corpus.CODE) == tok.encode(corpus.CODE)
    batches = list(make_lm_data(cfg, split="validation", seed=0, workdir=str(tmp_path)))
    for b in batches:
        _check_row_invariants(b, tok.pad_id, tok.bos_id, cfg.seq_len)
    docs = split_documents(cfg, "validation")
    fn = text_lib._Tokenize(tok, "text", True, True)
    assert _trained_transitions(batches) == _transitions([fn(d) for d in docs])
    # a given model file is used as is
    given = _cfg(files, tokenizer="unigram", vocab_size=300, tokenizer_path=str(path))
    assert get_tokenizer(given, None).encode(corpus.CODE) == tok.encode(corpus.CODE)
    with pytest.raises(ConfigError, match="^vocab_size:"):
        get_tokenizer(_cfg(files, tokenizer="bpe", vocab_size=280, tokenizer_path=str(path)), None)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"source": "web"}, "source"),
        ({"tokenizer": "wordpiece"}, "tokenizer"),
        ({"vocab_size": 300}, "vocab_size"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "vocab_size"),
        (
            {"tokenizer": "bpe", "vocab_size": 512, "tokenizer_path": "/no/such.model"},
            "tokenizer_path",
        ),
        ({"tokenizer_path": "x.model"}, "tokenizer_path"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_docs": -1}, "max_docs"),
        ({"max_docs": 1}, "max_docs"),
        ({"num_workers": -2}, "num_workers"),
        ({"paths": ("*.py",)}, "paths"),
        ({"source": "files"}, "paths"),
        ({"source": "jsonl", "paths": ("a.jsonl",), "text_field": ""}, "text_field"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        TextDataConfig(**overrides).validate()


def test_only_empty_documents_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    cfg = TextDataConfig(
        source="files",
        paths=(str(tmp_path / "*.txt"),),
        add_bos=False,
        add_eos=False,
        val_fraction=0.3,
    )
    with pytest.raises(ValueError, match="no document"):
        next(make_lm_data(cfg, split="train", seed=0))
    assert list(make_lm_data(cfg, split="validation", seed=0)) == []


def test_no_matching_files_is_a_config_error(tmp_path):
    cfg = TextDataConfig(source="files", paths=(str(tmp_path / "*.none"),))
    with pytest.raises(ConfigError, match="^paths: no files match"):
        make_lm_data(cfg, split="train", seed=0)


def test_config_classes_are_registered_by_name():
    assert section_name(TextDataConfig) == "text" and section_name(ImageDataConfig) == "images"
    assert section_class("mlgen.data.text:TextDataConfig") is TextDataConfig
    assert section_class("mlgen.data.images:ImageDataConfig") is ImageDataConfig
