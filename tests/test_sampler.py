"""The KV-cache sampler: equals recomputation, log-probs equal the trainer's, stops, sharding, seeds, distribution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxpost.rollout import (FINISH_REASONS, Rollout, Sampler, SamplingConfig, greedy_generate, rollout_batch,
                             sample_logits)
from tests.helpers import cached_lm, max_abs_diff, mesh_of, tiny_config

PAD = 0
N_NEW = 12


def _prompts(lengths=(3, 7, 12, 1), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 128, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope="module")
def model():
    return cached_lm(tiny_config())


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model[0], pad_id=PAD)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuations by full recomputation (no cache, no stops) of `_prompts()`."""
    lm, params = model
    prompts = _prompts()
    P = 16
    tokens = np.full((len(prompts), P), PAD, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    out, n = greedy_generate(lm, params, jnp.asarray(tokens), jnp.asarray(lengths), max_new_tokens=N_NEW,
                             stop_ids=(), pad_id=PAD)
    assert (np.asarray(n) == N_NEW).all()
    return np.asarray(out)


def test_cached_greedy_equals_recomputed_greedy(model, sampler, reference):
    lm, params = model
    ro = sampler.generate(params, _prompts(), SamplingConfig(max_new_tokens=N_NEW, temperature=0.0))
    np.testing.assert_array_equal(ro.tokens, reference)
    assert ro.mask.all() and (ro.lengths == N_NEW).all() and ro.steps == N_NEW
    assert ro.finish_reasons == ["length"] * 4


def test_chunked_prefill_equals_one_shot_prefill(model, sampler):
    lm, params = model
    cfg = SamplingConfig(max_new_tokens=N_NEW, temperature=0.0)
    prompts = _prompts((9, 14, 2, 5), seed=1)  # the bucket of the other tests: the one-shot program is compiled
    chunked = Sampler(lm, pad_id=PAD, prefill_chunk=4)
    assert chunked.buckets(4, 14) == (4, 16)
    a, b = sampler.generate(params, prompts, cfg), chunked.generate(params, prompts, cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert max_abs_diff(a.logprobs, b.logprobs) <= 1e-5


def _first_stop(row, stop_ids, seq):
    """(length, reason) of a greedy row under stop tokens and a stop sequence, or (len, "length")."""
    for j, t in enumerate(row):
        if t in stop_ids:
            return j + 1, "eos"
        if j >= len(seq) - 1 and tuple(row[j - len(seq) + 1:j + 1]) == seq:
            return j + 1, "stop_sequence"
    return len(row), "length"


def test_stop_tokens_stop_sequences_and_early_exit(model, sampler, reference):
    """Row 0 ends on a stop token, row 1 on a stop sequence, rows 2 and 3 on stop tokens; once every row has stopped
    the loop exits (`steps` < max_new_tokens). Rows running to max_new_tokens: see the greedy test."""
    lm, params = model
    stop_ids = (int(reference[0, 3]), int(reference[2, 1]), int(reference[3, 4]))
    seq = tuple(int(t) for t in reference[1, 5:7])
    cfg = SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, stop_ids=stop_ids,
                         stop_sequences=(seq, (127, 126, 125)))
    ro = sampler.generate(params, _prompts(), cfg)
    expected = [_first_stop(list(reference[r]), stop_ids, seq) for r in range(4)]
    assert expected[0][1] == "eos" and expected[1][1] in ("eos", "stop_sequence")
    assert "stop_sequence" in [e[1] for e in expected]
    for r, (n, reason) in enumerate(expected):
        assert ro.lengths[r] == n and ro.finish_reasons[r] == reason, (r, ro.lengths[r], ro.finish_reasons[r])
        np.testing.assert_array_equal(ro.tokens[r, :n], reference[r, :n])
        assert (ro.tokens[r, n:] == PAD).all() and ro.mask[r].sum() == n and (ro.logprobs[r, n:] == 0).all()
    assert ro.steps == max(n for n, _ in expected) < N_NEW


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
@pytest.mark.parametrize("pack", [False, True])
def test_sampled_logprobs_equal_the_training_forward(model, sampler, temperature, top_k, top_p, pack):
    """The sampler's per-token log-probs equal token_logprobs on the training forward of the same sequences (float32,
    1e-5), with temperature applied and before top-k/top-p truncation."""
    lm, params = model
    cfg = SamplingConfig(max_new_tokens=N_NEW, temperature=temperature, top_k=top_k, top_p=top_p, n_samples=3)
    ro = sampler.generate(params, _prompts(), cfg, seed=7)
    assert ro.tokens.shape == (12, N_NEW) and list(ro.prompt_index) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    batch = rollout_batch(ro, seq_len=32, pad_id=PAD, pack=pack, rows=12)
    logp = np.asarray(sampler.score(params, batch, temperature=temperature))
    mask = batch["loss_mask"] > 0
    assert mask.sum() == ro.lengths.sum()
    assert np.max(np.abs(logp[mask] - batch["sample_logp"][mask])) <= 1e-5


def test_same_seed_same_samples_and_one_compile_per_bucket(model, sampler):
    lm, params = model
    cfg = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, n_samples=3)
    a = sampler.generate(params, _prompts(), cfg, seed=7)  # compiled by the log-prob test already
    traces = sampler.traces
    b = sampler.generate(params, _prompts(), cfg, seed=7)
    c = sampler.generate(params, _prompts(), cfg, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    # Other prompt lengths and counts inside the same (batch, prompt) bucket reuse the program.
    d = sampler.generate(params, _prompts((16, 9, 2)), cfg, seed=7)
    assert sampler.buckets(3, 16) == sampler.buckets(4, 12) == (4, 16)
    assert sampler.traces == traces and d.tokens.shape == (9, N_NEW)
    # A row's samples do not depend on the other rows of its batch.
    e = sampler.generate(params, _prompts()[:2] + _prompts((5, 11), seed=4), cfg, seed=7)
    np.testing.assert_array_equal(e.tokens[:6], a.tokens[:6])
    assert sampler.traces == traces


def test_sharded_equals_single_device(model, sampler):
    lm, params = model
    cfg = SamplingConfig(max_new_tokens=N_NEW, temperature=0.7, top_k=20, top_p=0.9, n_samples=3)
    one = sampler.generate(params, _prompts(), cfg, seed=3)  # one device (compiled by the log-prob test)
    mesh8 = mesh_of(2, 2, 2)  # batch over data x fsdp, kv heads over tensor
    sharded_params = jax.device_put(params, lm.param_shardings(mesh8))
    eight = Sampler(lm, mesh8, pad_id=PAD)
    out = eight.generate(sharded_params, _prompts(), cfg, seed=3)
    assert eight.buckets(4, 12) == (4, 16)
    np.testing.assert_array_equal(out.tokens, one.tokens)
    np.testing.assert_array_equal(out.lengths, one.lengths)
    assert max_abs_diff(out.logprobs, one.logprobs) <= 1e-5


def _chi_square_pvalue(counts, probs):
    """Pearson's chi-square test of counts against probabilities; bins expecting < 5 are merged."""
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # merge the remainder into the smallest kept bin
        obs, exp = obs[:-1], exp[:-1]
        obs[np.argmin(exp)] += counts[~big].sum()
        exp[np.argmin(exp)] += expected[~big].sum()
    stat = np.sum((obs - exp) ** 2 / exp)
    return stats.chi2.sf(stat, len(obs) - 1), len(obs)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 8, 0.9)])
def test_empirical_distribution_matches_the_model(temperature, top_k, top_p):
    """4096 draws of the first token of one prompt against softmax(logits / T), truncated like the sampler."""
    lm, params = cached_lm(tiny_config())
    params = jax.tree.map(lambda x: x, params)
    params["lm_head"] = params["lm_head"] * 12.0  # a peaked distribution (random init is nearly uniform)
    prompt = _prompts((5,), seed=3)
    z = np.asarray(lm.logits(params, jnp.asarray(prompt[0])[None]), np.float64)[0, -1] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.ones_like(p, bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:  # nucleus of the top-k distribution, renormalised
        pk = np.where(keep, p, 0.0)[order] / p[keep].sum()
        before = np.cumsum(pk) - pk
        keep[order[before >= top_p]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    n = 4096
    ro = Sampler(lm, pad_id=PAD).generate(
        params, prompt, SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                                       n_samples=n), seed=11)
    counts = np.bincount(ro.tokens[:, 0], minlength=len(p)).astype(np.float64)
    assert counts[~keep].sum() == 0  # never a truncated token
    pvalue, bins = _chi_square_pvalue(counts, q)
    assert bins >= 4 and pvalue > 1e-3, (pvalue, bins)
    print(f"chi-square: {bins} bins, p-value {pvalue:.3f}")
    # reported log-probs: log softmax(z / T) of the sampled token, before truncation
    np.testing.assert_allclose(ro.logprobs[:, 0], np.log(p[ro.tokens[:, 0]]), atol=1e-5)


def test_sample_logits_greedy_top_k_top_p():
    z = jnp.array([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 2.9, -5.0]], jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    tok, logp = jax.jit(functools.partial(sample_logits, temperature=0.0))(z, keys)
    np.testing.assert_array_equal(tok, [1, 0])
    np.testing.assert_allclose(logp, jax.nn.log_softmax(z)[jnp.arange(2), tok], atol=1e-6)
    for kw in (dict(top_k=1), dict(top_p=1e-3)):  # one token left: sampling is greedy
        tok, logp = jax.jit(functools.partial(sample_logits, temperature=0.5, **kw))(z, keys)
        np.testing.assert_array_equal(tok, [1, 0])
        np.testing.assert_allclose(logp, jax.nn.log_softmax(z / 0.5)[jnp.arange(2), tok], atol=1e-6)


def test_rollout_batch_layout():
    ro = Rollout(tokens=np.array([[7, 8, 2], [9, 2, 0]], np.int32), mask=np.array([[1, 1, 1], [1, 1, 0]], bool),
                 logprobs=np.array([[-1, -2, -3], [-4, -5, 0]], np.float32), lengths=np.array([3, 2], np.int32),
                 finish=np.array([0, 0], np.int32), prompt_index=np.array([0, 1], np.int32),
                 prompts=[np.array([1, 5], np.int32), np.array([1], np.int32)], steps=3)
    padded = rollout_batch(ro, seq_len=6, pad_id=0)
    np.testing.assert_array_equal(padded["inputs"], [[1, 5, 7, 8, 0, 0], [1, 9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded["targets"], [[5, 7, 8, 2, 0, 0], [9, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded["loss_mask"], [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded["sample_logp"], [[0, -1, -2, -3, 0, 0], [-4, -5, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded["positions"], [[0, 1, 2, 3, 0, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(padded["sample_index"], [[0, 0, 0, 0, -1, -1], [1, 1, -1, -1, -1, -1]])
    packed = rollout_batch(ro, seq_len=6, pad_id=0, pack=True)
    np.testing.assert_array_equal(packed["inputs"], [[1, 5, 7, 8, 1, 9]])
    np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(packed["loss_mask"], [[0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError):
        rollout_batch(ro, seq_len=3, pad_id=0)
    assert FINISH_REASONS[0] == "eos"


def test_config_validation():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(n_samples=0),
                dict(stop_sequences=((),))):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
