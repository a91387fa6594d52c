"""LM generation: cached decoding == full forward, strategies, stopping, best-of-N,
seeds, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlgen import sharding
from mlgen.config import MeshConfig
from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.ops.attention import AttentionConfig
from mlgen.samplers.lm import (
    Chain,
    Greedy,
    Sampling,
    Temperature,
    TopK,
    TopP,
    best_of_n,
    generate,
    prefill_positions,
)

V = 64
PROMPTS = [[5, 9, 2], [7, 1, 8, 3, 3, 11, 4], [12, 30, 6, 1, 2]]  # lengths differ: left padding
N_NEW = 6  # one max_new_tokens everywhere: fewer compilations


def _cfg(flavour="llama", **kw):
    return TransformerConfig(
        **{
            **dict(
                flavour=flavour,
                vocab_size=V,
                num_layers=2,
                d_model=32,
                num_heads=4,
                num_kv_heads=2 if flavour == "llama" else 0,
                max_len=64,
                attention=AttentionConfig(backend="xla"),
            ),
            **kw,
        }
    )


def _model(flavour="llama", **kw):
    return Transformer(_cfg(flavour, **kw), rngs=nnx.Rngs(params=0))


@pytest.fixture(scope="module")
def model():
    return _model()


_REF_LEN = 24


@jax.jit
def _forward(state, tokens):
    return nnx.merge(*state)(tokens)


def _full_logits(m, seqs):
    """Logits of unpadded sequences, no cache: one ``[len(seq), V]`` array per sequence.

    The rows are RIGHT-padded to one fixed length (one compilation): under causal attention
    padding after a token changes nothing before it, so each row is as if run alone.
    """
    tok = np.zeros((len(seqs), _REF_LEN), np.int32)
    for r, q in enumerate(seqs):
        tok[r, : len(q)] = q
    out = np.asarray(_forward(nnx.split(m), jnp.asarray(tok)))
    return [out[r, : len(q)] for r, q in enumerate(seqs)]


def _left_pad(prompts, length):
    tok = np.zeros((len(prompts), length), np.int32)
    seg = np.zeros_like(tok)
    for r, p in enumerate(prompts):
        tok[r, length - len(p) :] = p
        seg[r, length - len(p) :] = 1
    return jnp.asarray(tok), jnp.asarray(seg)


# ----------------------------------------------------------------------------- KV cache
def _prefill_and_decode(decoder, tok, seg, cont, steps):
    """The sampler's use of the decoder protocol, teacher-forced: prefill,
    then ``steps - 1`` tokens."""
    pos = prefill_positions(seg)
    logits, cache = decoder.decode(tok, pos, decoder.init_cache(tok.shape[0], tok.shape[1] + steps))
    nxt = pos[:, -1] + 1

    def step(cache, t):
        logits, cache = decoder.decode(cont[:, t][:, None], (nxt + t)[:, None], cache)
        return cache, logits

    cache, rest = jax.lax.scan(step, cache, jnp.arange(steps - 1))
    return jnp.concatenate([logits[:, None], rest.swapaxes(0, 1)], 1), cache


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_cached_decoding_matches_full_forward_with_left_padding(flavour):
    """Prefill + per-step decode logits equal a full forward of each row alone (<= 1e-5)."""
    m = _model(flavour)
    steps = 6
    rng = np.random.default_rng(0)
    cont = rng.integers(0, V, (len(PROMPTS), steps)).astype(np.int32)  # teacher-forced continuation
    tok, seg = _left_pad(PROMPTS, 8)

    @jax.jit
    def run(state, tok, seg, cont):
        return _prefill_and_decode(nnx.merge(*state), tok, seg, cont, steps)[0]

    got = np.asarray(run(nnx.split(m), tok, seg, jnp.asarray(cont)))
    full = _full_logits(m, [p + cont[r, : steps - 1].tolist() for r, p in enumerate(PROMPTS)])
    for r, p in enumerate(PROMPTS):
        np.testing.assert_allclose(got[r], full[r][len(p) - 1 :], atol=1e-5, rtol=0)


def test_per_layer_decoder_equals_the_stacked_model(model):
    """``for_decoding`` (per-layer weights, sliced once) decodes exactly as the stacked model,
    cache contents included."""
    steps = 3
    cont = jnp.asarray([[3, 4, 5], [6, 7, 8], [9, 10, 11]], jnp.int32)

    @jax.jit
    def both(state, tok, seg):
        stacked = nnx.merge(*state)
        unrolled = stacked.for_decoding()
        assert isinstance(unrolled.blocks, nnx.List) and not isinstance(stacked.blocks, nnx.List)
        return (
            _prefill_and_decode(stacked, tok, seg, cont, steps),
            _prefill_and_decode(unrolled, tok, seg, cont, steps),
        )

    (want, want_cache), (got, got_cache) = both(nnx.split(model), *_left_pad(PROMPTS, 8))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- greedy
def test_greedy_is_argmax_of_full_forward_step_by_step_and_deterministic(model):
    n = N_NEW
    g = generate(model, PROMPTS, max_new_tokens=n)
    assert g.tokens.shape == (3, n) and g.lengths.tolist() == [n] * 3
    seqs = [list(p) for p in PROMPTS]
    for _ in range(n):
        for seq, logits in zip(seqs, _full_logits(model, seqs)):
            seq.append(int(np.argmax(logits[-1])))
    for r, (p, logits) in enumerate(zip(PROMPTS, _full_logits(model, seqs))):
        assert g.tokens[r].tolist() == seqs[r][len(p) :]
        logp = jax.nn.log_softmax(logits[len(p) - 1 : -1], -1)
        np.testing.assert_allclose(
            g.logprobs[r], np.take_along_axis(logp, g.tokens[r][:, None], 1)[:, 0], atol=1e-5
        )
    again = generate(model, PROMPTS, max_new_tokens=n, seed=123)
    np.testing.assert_array_equal(again.tokens, g.tokens)


def test_prompt_bucket_does_not_change_the_output(model):
    a = generate(model, PROMPTS, max_new_tokens=N_NEW, prompt_bucket=None)  # padded to 7
    b = generate(model, PROMPTS, max_new_tokens=N_NEW)  # padded to 16
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


# ----------------------------------------------------------------------------- strategies
def _draws(method, logits, n, seed=0):
    """``n`` draws from one row of logits (n independent rows, one key)."""
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(jax.jit(method.sample)(rows, jax.random.key(seed)))


# chi-square 0.999 quantiles by degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


def _chi2_ok(draws, probs):
    """Pearson chi-square goodness of fit at p = 0.001 (fixed seed, so deterministic)."""
    support = np.flatnonzero(probs > 0)
    assert np.isin(draws, support).all(), "a token outside the support was drawn"
    counts = np.bincount(draws, minlength=len(probs))[support]
    expected = probs[support] * len(draws)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    return chi2 < _CHI2_999[len(support) - 1], chi2


def test_top_k_never_emits_outside_the_top_k():
    logits = jax.random.normal(jax.random.key(1), (64, V)) * 3
    top = np.asarray(jax.lax.top_k(logits, 5)[1])
    for seed in range(20):
        tok = np.asarray(Sampling(temperature=1.5, top_k=5).sample(logits, jax.random.key(seed)))
        assert all(t in row for t, row in zip(tok, top))


def test_top_k_in_generation_stays_in_the_models_top_k(model):
    g = generate(model, PROMPTS, max_new_tokens=N_NEW, sampling=TopK(3), seed=7, num_samples=2)
    rows = [PROMPTS[r // 2] + g.tokens[r].tolist() for r in range(6)]
    for r, logits in enumerate(_full_logits(model, rows)):
        top3 = np.argsort(-logits[len(PROMPTS[r // 2]) - 1 : -1], -1)[:, :3]
        assert all(t in row for t, row in zip(g.tokens[r], top3))


TOY = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.07, 0.05]))


def test_top_p_frequencies_match_the_renormalised_nucleus():
    # Mass before each sorted token: 0, .30, .52, .67, .79 ... ; p = 0.7 keeps the first four.
    want = np.array([0.30, 0.22, 0.15, 0.12, 0, 0, 0]) / 0.79
    ok, chi2 = _chi2_ok(_draws(TopP(0.7), TOY, 40_000), want)
    assert ok, chi2


def test_chained_filters_frequencies():
    """Temperature 2, then top-k 5, then top-p 0.8: the distribution computed by hand."""
    p = np.exp(TOY / 2)
    p = p / p.sum()
    p[5:] = 0
    p = p / p.sum()
    keep = (np.cumsum(p) - p) < 0.8
    want = np.where(keep, p, 0)
    want = want / want.sum()
    ok, chi2 = _chi2_ok(_draws(Sampling(temperature=2.0, top_k=5, top_p=0.8), TOY, 40_000), want)
    assert ok, chi2
    assert Sampling(temperature=2.0, top_k=5, top_p=0.8) == Chain(
        Temperature(2.0), TopK(5), TopP(0.8)
    )


def test_temperature_and_greedy():
    want = np.exp(TOY / 0.5) / np.exp(TOY / 0.5).sum()
    ok, chi2 = _chi2_ok(_draws(Temperature(0.5), TOY, 40_000), want)
    assert ok, chi2
    assert (_draws(Greedy(), TOY, 100) == 0).all()
    assert Sampling(temperature=0) == Greedy()
    with pytest.raises(ValueError):
        TopK(0)
    with pytest.raises(ValueError):
        TopP(0.0)


# ----------------------------------------------------------------------------- stopping, seeds
def test_eos_stops_a_row_and_finished_rows_emit_pad(model):
    n = N_NEW
    free = generate(model, PROMPTS, max_new_tokens=n, sampling=Temperature(1.0), seed=3)
    eos = int(free.tokens[0, 2])  # row 0 emits it at step 2 (or earlier)
    g = generate(
        model,
        PROMPTS,
        max_new_tokens=n,
        sampling=Temperature(1.0),
        seed=3,
        eos_id=eos,
        pad_id=V - 1,
    )
    for r in range(len(PROMPTS)):
        row = free.tokens[r].tolist()
        stop = row.index(eos) + 1 if eos in row else n
        assert g.lengths[r] == stop
        assert g.tokens[r, :stop].tolist() == row[:stop]
        assert (g.tokens[r, stop:] == V - 1).all() and (g.logprobs[r, stop:] == 0).all()
    assert g.lengths[0] <= 3
    assert g.completions()[0][-1] == eos
    # stop_ids behave like eos; all rows stopping at once ends the loop early
    s = generate(
        model,
        PROMPTS,
        max_new_tokens=n,
        sampling=Temperature(1.0),
        seed=3,
        stop_ids=[int(free.tokens[r, 0]) for r in range(3)],
    )
    assert (s.lengths == 1).all()


def test_same_seed_same_samples_other_seed_other_samples(model):
    kw = dict(
        max_new_tokens=N_NEW, sampling=TopK(3), num_samples=2
    )  # the same compilation as above
    a = generate(model, PROMPTS, seed=7, **kw)
    b = generate(model, PROMPTS, seed=7, **kw)
    c = generate(model, PROMPTS, seed=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens[0] != a.tokens[1]).any(), "the samples of one prompt should differ"


# ----------------------------------------------------------------------------- best-of-N
def test_best_of_n_ranks_by_mean_logprob_and_by_a_verifier(model):
    ranked = best_of_n(model, PROMPTS[:2], 4, max_new_tokens=N_NEW, seed=1)
    assert [len(c) for c in ranked] == [4, 4]
    for cands in ranked:
        scores = [c.score for c in cands]
        assert scores == sorted(scores, reverse=True)
        for c in cands:
            assert c.score == pytest.approx(np.mean(c.logprobs))
    # a verifier on decoded text: prefer samples with many 'a' (token 10 -> 'a')
    decode = lambda toks: "".join("a" if t == 10 else "b" for t in toks)  # noqa: E731
    ranked = best_of_n(
        model,
        PROMPTS[:2],
        4,
        max_new_tokens=N_NEW,
        seed=2,
        score=lambda s: s.count("a"),
        decode=decode,
    )
    counts = [c.text.count("a") for c in ranked[0]]
    assert counts == sorted(counts, reverse=True) and [c.score for c in ranked[0]] == counts
    assert ranked[0][0].text == decode(ranked[0][0].tokens)


# ----------------------------------------------------------------------------- sharding
def test_sharded_model_gives_the_same_greedy_output():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2, seq=1, rules="fsdp_tp"))
    with sharding.use(mesh, "fsdp_tp"):
        graphdef, params, _ = sharding.sharded_init(
            lambda: Transformer(_cfg(), rngs=nnx.Rngs(params=0)), mesh
        )
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
        sharded = generate(
            (graphdef, params), PROMPTS, max_new_tokens=N_NEW
        )  # batch 3 over fsdp 4: uneven
    host = jax.tree.map(np.asarray, params)  # the same values, unsharded, no mesh
    plain = generate((graphdef, host), PROMPTS, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    np.testing.assert_allclose(sharded.logprobs, plain.logprobs, atol=1e-5)
