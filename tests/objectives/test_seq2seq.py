"""The seq2seq objective on synthetic reverse pairs: the loss falls (fast), and a tiny
encoder-decoder learns to reverse strings (slow: token accuracy, and greedy decoding)."""

import time

import jax
import numpy as np
import pytest
from flax import nnx

from mlgen.data.seq2seq import BOS_ID, EOS_ID, Seq2SeqDataConfig, make_pair_data
from mlgen.models.encoder import EncoderDecoder, EncoderDecoderConfig
from mlgen.objectives.seq2seq import make_loss
from mlgen.ops.attention import AttentionConfig
from mlgen.samplers import seq2seq as sampler
from tests.objectives.encoder_training import train


def _model(vocab):
    cfg = EncoderDecoderConfig(
        vocab_size=vocab,
        num_layers=2,
        d_model=64,
        num_heads=4,
        attention=AttentionConfig(backend="xla"),
        scan_layers=False,
    )
    return EncoderDecoder(cfg, rngs=nnx.Rngs(params=0))


def _batches(data, n, split="train"):
    it = make_pair_data(data, split=split, seed=0)
    return [next(it) for _ in range(n)]


def test_seq2seq_loss_falls_on_reverse():
    data = Seq2SeqDataConfig(source="reverse", vocab_size=12, min_len=2, max_len=6, batch_size=32)
    _, _, losses = train(_model(12), lambda gd: make_loss(gd), _batches(data, 40), lr=3e-3)
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert first > 2.0 and last < first - 0.8, (first, last)


@pytest.mark.slow
def test_tiny_encoder_decoder_learns_to_reverse():
    """400 steps of 64 pairs (2-8 symbols of 9): >= 97% teacher-forced token accuracy on held-out
    pairs, and greedy decoding reverses >= 85% of held-out strings exactly."""
    data = Seq2SeqDataConfig(source="reverse", vocab_size=12, min_len=2, max_len=8, batch_size=64)
    start = time.perf_counter()
    graphdef, params, losses = train(_model(12), lambda gd: make_loss(gd), _batches(data, 400))
    seconds = time.perf_counter() - start
    held_out = _batches(data, 2, split="validation")
    eval_loss = jax.jit(make_loss(graphdef, train=False))
    acc = np.mean(
        [float(eval_loss(params, {}, b, jax.random.key(0))[1][0]["accuracy"]) for b in held_out]
    )
    model = nnx.merge(graphdef, params)
    b = held_out[0]
    sources = [row[: int(m.sum())].tolist() for row, m in zip(b["inputs"], b["input_mask"])]
    gen = sampler.generate(
        model, sources, max_new_tokens=data.seq_len, bos_id=BOS_ID, eos_id=EOS_ID
    )
    want = [s[:-1][::-1] + [EOS_ID] for s in sources]
    exact = np.mean([c == w for c, w in zip(gen.completions(), want)])
    print(
        f"reverse: {seconds:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"held-out token accuracy {acc:.4f}, greedy exact match {exact:.3f}"
    )
    assert acc >= 0.97 and exact >= 0.85, (acc, exact)
