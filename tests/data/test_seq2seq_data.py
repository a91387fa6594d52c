"""Synthetic copy / reverse pairs: layout, masks, exact resume, distinct validation."""

import numpy as np
import pytest

from mlgen.config import ConfigError
from mlgen.data.seq2seq import BOS_ID, EOS_ID, PAD_ID, Seq2SeqDataConfig, make_pair_data


@pytest.mark.parametrize("source", ["reverse", "copy"])
def test_pairs_layout(source):
    cfg = Seq2SeqDataConfig(source=source, vocab_size=10, min_len=1, max_len=5, batch_size=16)
    b = next(make_pair_data(cfg, split="train", seed=0))
    assert {k: v.shape for k, v in b.items()} == {
        k: (16, 6) for k in ("inputs", "input_mask", "decoder_inputs", "targets", "loss_mask")
    }
    for r in range(16):
        n = int(b["input_mask"][r].sum()) - 1  # symbols, eos excluded
        s = b["inputs"][r, :n]
        assert 1 <= n <= 5 and (s >= 3).all() and (s < 10).all()
        assert b["inputs"][r, n] == EOS_ID and (b["inputs"][r, n + 1 :] == PAD_ID).all()
        want = s[::-1] if source == "reverse" else s
        np.testing.assert_array_equal(b["targets"][r, :n], want)
        assert b["targets"][r, n] == EOS_ID
        assert b["decoder_inputs"][r, 0] == BOS_ID
        np.testing.assert_array_equal(b["decoder_inputs"][r, 1 : n + 1], b["targets"][r, :n])
        np.testing.assert_array_equal(b["loss_mask"][r], b["input_mask"][r])


def test_resume_is_exact_and_validation_is_its_own_repeatable_stream():
    cfg = Seq2SeqDataConfig(batch_size=8)
    it = make_pair_data(cfg, split="train", seed=3)
    next(it), next(it)
    state = it.get_state()
    want = next(it)
    again = make_pair_data(cfg, split="train", seed=3)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["inputs"], want["inputs"])
    v1 = next(make_pair_data(cfg, split="validation", seed=3))
    v2 = next(make_pair_data(cfg, split="validation", seed=3))
    np.testing.assert_array_equal(v1["inputs"], v2["inputs"])
    first = next(make_pair_data(cfg, split="train", seed=3))
    assert not np.array_equal(v1["inputs"], first["inputs"])
    h0 = next(make_pair_data(cfg, split="train", seed=3, process_index=0, process_count=2))
    h1 = next(make_pair_data(cfg, split="train", seed=3, process_index=1, process_count=2))
    assert h0["inputs"].shape == (4, cfg.seq_len) and not np.array_equal(h0["inputs"], h1["inputs"])


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(source="sort"), "source"),
        (dict(vocab_size=3), "vocab_size"),
        (dict(min_len=0), "min_len"),
        (dict(min_len=5, max_len=4), "max_len"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        Seq2SeqDataConfig(**kw).validate()
