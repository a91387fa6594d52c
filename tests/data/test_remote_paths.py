"""Remote paths (gs://) reach the filesystem unmangled: text globs, jsonl, tokenizers,
PNG folders."""

import collections
import itertools

import numpy as np
import pytest
from PIL import Image

from mlgen.config import ConfigError
from mlgen.data import text as text_lib
from mlgen.data.images import ImageDataConfig, class_names, make_image_data
from mlgen.data.paths import expand_globs
from mlgen.data.text import TextDataConfig, get_tokenizer, make_lm_data, split_documents
from mlgen.data.tokenizer import Tokenizer
from tests.data import data_corpus as corpus
from tests.data import fake_gcs


@pytest.fixture
def gcs(monkeypatch):
    return fake_gcs.install(monkeypatch)


def _transitions(token_lists):
    c = collections.Counter()
    for t in token_lists:
        c.update(zip(t[:-1].tolist(), t[1:].tolist()))
    return c


def _trained(batches):
    c = collections.Counter()
    for b in batches:
        m = b["loss_mask"].astype(bool)
        c.update(zip(b["inputs"][m].tolist(), b["targets"][m].tolist()))
    return c


def test_globs_and_documents_keep_the_scheme(gcs, tmp_path):
    local = corpus.write_files(str(tmp_path), 12)
    for p in local:
        gcs.upload(p, f"gs://bkt/corpus/{p.rsplit('/', 1)[1]}")
    gcs.upload(local[0], "gs://bkt/corpus/sub/extra.txt")
    assert expand_globs(["gs://bkt/corpus/doc00*.txt"]) == [
        f"gs://bkt/corpus/doc00{i}.txt" for i in range(10)
    ]
    assert expand_globs(["gs://bkt/*/sub/*.txt", "gs://bkt/corpus/doc011.txt"]) == [
        "gs://bkt/corpus/doc011.txt",
        "gs://bkt/corpus/sub/extra.txt",
    ]
    assert expand_globs(["gs://bkt/corpus/*"]) == sorted(
        f"gs://bkt/corpus/doc{i:03d}.txt" for i in range(12)
    )
    cfg = TextDataConfig(
        source="files",
        paths=("gs://bkt/corpus/*.txt",),
        seq_len=16,
        batch_size=4,
        val_fraction=0.25,
    )
    docs = text_lib.list_documents(cfg)
    assert [d.id for d in docs] == [f"gs://bkt/corpus/doc{i:03d}.txt" for i in range(12)]
    texts = [open(p, encoding="utf-8").read() for p in local]
    assert [text_lib.read_document(d) for d in docs] == texts
    val = split_documents(cfg, "validation")
    fn = text_lib._Tokenize(get_tokenizer(cfg), "text", True, True)
    assert _trained(make_lm_data(cfg, split="validation", seed=0)) == _transitions(
        [fn(d) for d in val]
    )
    with pytest.raises(ConfigError, match=r"^paths: '\*\*' is not supported for remote paths"):
        TextDataConfig(source="files", paths=("gs://bkt/**/*.txt",)).validate()
    with pytest.raises(ConfigError, match="^paths: no files match"):
        text_lib.list_documents(TextDataConfig(source="files", paths=("gs://bkt/none/*.txt",)))


def test_jsonl_on_gcs(gcs, tmp_path):
    gcs.upload(corpus.write_jsonl(str(tmp_path), 20), "gs://bkt/j/docs.jsonl")
    cfg = TextDataConfig(source="jsonl", paths=("gs://bkt/j/*.jsonl",), seq_len=16, batch_size=4)
    docs = text_lib.list_documents(cfg)
    assert len(docs) == 20 and docs[0].id.startswith("gs://bkt/j/docs.jsonl:")
    local = text_lib.list_documents(
        TextDataConfig(source="jsonl", paths=(str(tmp_path / "docs.jsonl"),))
    )
    assert sorted(text_lib.read_document(d) for d in docs) == sorted(
        text_lib.read_document(d) for d in local
    )


def test_tokenizer_trained_into_a_gcs_workdir(gcs, tmp_path, monkeypatch):
    for p in corpus.write_files(str(tmp_path), 16):
        gcs.upload(p, f"gs://bkt/c/{p.rsplit('/', 1)[1]}")
    cfg = TextDataConfig(
        source="files", paths=("gs://bkt/c/*.txt",), tokenizer="bpe", vocab_size=300
    )
    tok = get_tokenizer(cfg, "gs://bkt/run")
    assert gcs.isfile("gs://bkt/run/tokenizer.model")
    assert not any(".tmp" in k for k in gcs.store)  # the temporary file was renamed
    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "train", staticmethod(lambda *a, **k: pytest.fail("retrained")))
        again = get_tokenizer(cfg, "gs://bkt/run")  # loaded, not retrained
    assert again.encode(corpus.CODE) == tok.encode(corpus.CODE)
    given = TextDataConfig(
        source="files",
        paths=("gs://bkt/c/*.txt",),
        tokenizer="bpe",
        vocab_size=300,
        tokenizer_path="gs://bkt/run/tokenizer.model",
    )
    assert get_tokenizer(given).encode(corpus.CODE) == tok.encode(corpus.CODE)
    # A remote tokenizer is looked for when the data is built (validating needs no bucket)
    missing = TextDataConfig(
        tokenizer="bpe", vocab_size=300, tokenizer_path="gs://bkt/run/none.model"
    )
    missing.validate()
    with pytest.raises(ConfigError, match="^data.tokenizer_path: no such file"):
        get_tokenizer(missing)
    out = Tokenizer.train("gs://bkt/c/doc00*.txt", vocab_size=300, out_path="gs://bkt/m/t.model")
    assert Tokenizer.load("gs://bkt/m/t.model").encode(corpus.CODE) == out.encode(corpus.CODE)


def test_png_folder_on_gcs_gives_the_local_batches(gcs, tmp_path):
    rng = np.random.default_rng(0)
    names = [f"{tmp_path}/top.png"] + [
        f"{tmp_path}/{c}/{s}{i}.png"
        for c in ("cat", "dog")
        for s in ("", "deep/")
        for i in range(3)
    ]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(n)
        gcs.upload(n, "gs://bkt/png/" + n[len(str(tmp_path)) + 1 :])
    local = ImageDataConfig(
        source="folder",
        path=str(tmp_path),
        image_size=8,
        channels=3,
        batch_size=4,
        val_fraction=0.3,
    )
    remote = ImageDataConfig(
        source="folder",
        path="gs://bkt/png",
        image_size=8,
        channels=3,
        batch_size=4,
        val_fraction=0.3,
    )
    assert class_names("gs://bkt/png") == class_names(str(tmp_path)) == ["cat", "dog"]
    for split, n in (("train", 6), ("validation", None)):
        a, b = (
            make_image_data(local, split=split, seed=1),
            make_image_data(remote, split=split, seed=1),
        )
        xs, ys = list(itertools.islice(a, n)), list(itertools.islice(b, n))
        assert len(xs) == len(ys) == (n or 1)  # validation: 6 images, one batch
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x["images"], y["images"])
            np.testing.assert_array_equal(x["labels"], y["labels"])
    with pytest.raises(ConfigError, match="^path: no such folder"):
        ImageDataConfig(source="folder", path="gs://bkt/nope").validate()
