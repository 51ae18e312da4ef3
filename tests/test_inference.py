"""Test-time scaling: selection rules by hand, the forkable decode state against recomputation, beam search against
greedy decoding, PRM-guided step search and DVTS with a perfect scorer, budget forcing's exact budgets, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.inference import (Decoder, aggregate_steps, beam_search, best_of_n, budget_forcing, decode_flops,
                               forward_flops, likelihood_step_scorer, majority_vote, non_embedding_params,
                               prm_step_scorer, sample_and_select,
                               split_steps, step_search, verifier_scorer, weighted_best_of_n, weighted_majority)
from jaxpost.rollout import Sampler, SamplingConfig
from tests.helpers import cached_lm, mesh_of, tiny_config

PAD, DELIM, EOS_ID, BAD, MARK = 0, 1, 2, 3, 4  # a vocabulary of 8: the step delimiter, eos, a "wrong" token, a marker
CFG = tiny_config(vocab_size=8, init_std=0.1)
ROOM = 64  # every state's cache has 16 + 64 slots: the tests share compiled programs
STEP = dict(delimiter_id=DELIM, end_ids=(EOS_ID,), max_step_tokens=4)  # the step search's extend program


@pytest.fixture(scope="module")
def logits_of(model):
    """Last-position logits of a whole sequence by the training forward, no cache (one compiled length)."""
    lm, params = model
    jitted = jax.jit(lm.logits)

    def run(row):
        tokens = np.zeros((1, 48), np.int32)
        tokens[0, :len(row)] = row
        return np.asarray(jitted(params, jnp.asarray(tokens)))[0, len(row) - 1]

    return run


def _prompts(lengths=(3, 5, 1), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 8, n).astype(np.int32) for n in lengths]


@pytest.fixture(scope="module")
def model():
    return cached_lm(CFG)


@pytest.fixture(scope="module")
def decoder(model):
    return Decoder(model[0], pad_id=PAD, min_room=ROOM)


# ------------------------------------------------------------------------------------------------ selection


def test_aggregate_steps_by_hand():
    s = np.array([[0.5, 0.8, 0.1], [0.9, 0.2, 0.7], [0.3, 0.3, 0.3]])
    m = np.array([[True, True, False], [True, True, True], [False, False, False]])
    np.testing.assert_allclose(aggregate_steps(s, m, "last"), [0.8, 0.7, -np.inf])
    np.testing.assert_allclose(aggregate_steps(s, m, "min"), [0.5, 0.2, -np.inf])
    np.testing.assert_allclose(aggregate_steps(s, m, "prod"), [0.4, 0.9 * 0.2 * 0.7, -np.inf])
    np.testing.assert_allclose(aggregate_steps(s, m, "mean"), [0.65, 0.6, -np.inf])
    with pytest.raises(ValueError):
        aggregate_steps(s, m, "max")


def test_best_of_n_ties_and_nan():
    np.testing.assert_array_equal(best_of_n([[0.1, 0.9, 0.9], [np.nan, 0.2, 0.2], [-np.inf, -np.inf, 0.0]]),
                                  [1, 1, 2])


def test_votes_ties_missing_and_all_wrong():
    answers = [["7", "8", "8", "7"], [None, None, "3"], [None, None], ["1", "2", "3"]]
    assert majority_vote(answers)[0] == ["7", "3", None, "1"]  # 2-2 tie: "7" occurs first
    np.testing.assert_array_equal(majority_vote(answers)[1], [0, 2, 0, 0])
    # Weighted: sums 7 -> 0.2 + 0.3 = 0.5, 8 -> 0.25 + 0.3 = 0.55; None never wins, even with a large weight.
    scores = [[0.2, 0.25, 0.3, 0.3], [0.9, 0.9, 0.1], [0.1, 0.7], [0.5, 0.5, 0.5]]
    chosen, index = weighted_best_of_n(answers, scores)
    assert chosen == ["8", "3", None, "1"]
    np.testing.assert_array_equal(index, [2, 2, 1, 0])  # best candidate of the answer; all missing: best score
    assert weighted_majority([["a", "b", "b"]], [[1.0, 0.5, 0.5]])[0] == ["a"]  # exact tie: first occurrence


def test_split_steps():
    got = split_steps([5, 6, DELIM, 7, DELIM, 3], DELIM)
    assert [s.tolist() for s in got] == [[5, 6, DELIM], [7, DELIM], [3]]
    assert [s.tolist() for s in split_steps([5, DELIM], DELIM)] == [[5, DELIM]]
    assert split_steps([], DELIM) == []


def test_forward_flops_formula():
    cfg = tiny_config()
    D, L, V, F, H, K, hd = 64, 2, 128, 128, 4, 2, 16
    n_ne = L * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F + 2 * D) + D
    assert non_embedding_params(cfg) == n_ne
    assert forward_flops(cfg, 3, 10) == 3 * (2 * n_ne + 2 * D * V + 4 * L * H * hd * 10)
    # positions 5, 6, 7 attend 6 + 7 + 8 = 21 keys
    assert math.isclose(decode_flops(cfg, 5, 3, logits=False), 3 * 2 * n_ne + 4 * L * H * hd * 21)


# ------------------------------------------------------------------------------------------------ decode state


def test_fork_append_extend_equal_recomputation(model, decoder, logits_of):
    """Rows that stopped at different steps, forced tokens with a rewind, and a fork: every row's next-token logits
    from the cache equal those of its whole token sequence encoded from scratch."""
    lm, params = model
    state = decoder.prefill(params, _prompts(), max_new_tokens=32)
    state, ext = decoder.extend_until(params, state, jax.random.PRNGKey(1), max_tokens=4, temperature=1.0,
                                      stop_ids=(DELIM,), end_ids=(EOS_ID,))
    state = decoder.append(params, state, np.array([[5, 6, 7]] * 4), n_R=[3, 0, 1, 2], drop_R=[1, 2, 0, 0])
    state = decoder.fork(state, [2, 0, 0, 1], [False] * 4)
    state, _ = decoder.extend_until(params, state, jax.random.PRNGKey(2), max_tokens=4, temperature=1.0,
                                    stop_ids=(DELIM,), end_ids=(EOS_ID,), active_R=[True, False, True, True])
    got_RV = np.asarray(decoder.logits(params, state))
    rows = Decoder.row_tokens(state, generated=False)
    for r, row in enumerate(rows):
        np.testing.assert_allclose(got_RV[r], logits_of(row), atol=1e-5)
    assert len(set(len(t) for t in rows)) > 1  # the rows really are ragged
    assert rows[2][:len(rows[1])].tolist() == rows[1].tolist()  # both forks of row 0; row 2 sampled on


# ------------------------------------------------------------------------------------------------ beam search


def test_beam_width_one_is_greedy_and_wider_scores_higher(model, decoder):
    lm, params = model
    prompts = _prompts((4, 2, 6, 3), seed=3)
    ro = Sampler(lm, pad_id=PAD).generate(params, prompts, SamplingConfig(max_new_tokens=10, temperature=0.0,
                                                                          stop_ids=(EOS_ID,)))
    one = beam_search(decoder, params, prompts, width=1, max_new_tokens=10, stop_ids=(EOS_ID,))
    for r, c in enumerate(ro.completions()):
        np.testing.assert_array_equal(one.completions[r], c)
    np.testing.assert_allclose(one.info["logp"], ro.logprobs.sum(1), atol=1e-4)
    four = beam_search(decoder, params, prompts, width=4, max_new_tokens=10, stop_ids=(EOS_ID,))
    assert (four.scores >= one.scores - 1e-6).all() and (four.scores > one.scores + 1e-3).any()
    assert four.tokens > one.tokens and four.flops > one.flops


# ------------------------------------------------------------------------------------------------ step search


def perfect_prm(prompts, steps):
    """Knows which steps are right (no BAD token): step s scores 1 while every step up to s is right, else 0."""
    return [np.minimum.accumulate([0.0 if BAD in s else 1.0 for s in st]) if st else np.zeros(0) for st in steps]


def _right(tokens) -> bool:
    return BAD not in np.asarray(tokens).tolist()


@pytest.mark.parametrize("method", ["beam", "dvts"])
def test_step_search_with_a_perfect_prm_finds_a_right_answer(model, decoder, method):
    lm, params = model
    prompts = _prompts((3, 5, 2, 4), seed=4)
    res = step_search(decoder, params, prompts, perfect_prm, method=method, n=8, m=2, max_steps=4, seed=0, **STEP)
    some = 0
    for p in range(len(prompts)):
        if any(_right(t) for t, _ in res.info["ended"][p]):  # some expansion finished right
            some += 1
            assert _right(res.completions[p]) and res.scores[p] == 1.0
    assert some >= 2 and any(not _right(t) for ended in res.info["ended"] for t, _ in ended)
    assert res.tokens > 0 and res.flops > 0 and res.info["rounds"] <= 4


# ------------------------------------------------------------------------------------------------ budget forcing


def _marker_at(c, i) -> int:
    """Length of the end-of-thinking marker (MARK, or the stop sequence 6 7) at c[i], else 0."""
    return 1 if c[i] == MARK else 2 if c[i:i + 2].tolist() == [6, 7] else 0


def test_budget_forcing_exact_budgets_and_extensions(model, decoder):
    """Thinking ends at the stop id MARK or the stop sequence 6 7; rows that reach the budget think exactly `budget`
    tokens, then the answer cue; the others had the marker suppressed (dropped from the cache) and the cue appended
    exactly `extensions` times, and end on the marker."""
    lm, params = model
    prompts = _prompts((3, 5, 2, 4, 1, 3, 6, 2), seed=5)
    cue, answer_cue, budget = [5, 5], [7, 7], 16
    res = budget_forcing(decoder, params, prompts, budget=budget, answer_cue=answer_cue, end_think_ids=(MARK,),
                         end_think_sequences=((6, 7),), continue_cue=cue, extensions=2, max_answer_tokens=3,
                         temperature=1.0, seed=1)
    capped, thinking = res.info["capped"], res.info["thinking"]
    assert 0 < capped.sum() < len(prompts)
    kinds = set()
    for c, n, cap, ext in zip(res.completions, thinking, capped, res.info["extensions"]):
        if cap:
            assert n == budget and c[n:n + 2].tolist() == answer_cue and len(c) == budget + 2 + 3
        else:
            k = _marker_at(c, n)
            kinds.add(k)
            assert k and len(c) == n + k + 3
            assert ext == 2 or n + len(cue) >= budget  # fewer extensions only when the cue no longer fits
            assert not any(_marker_at(c[:n], i) for i in range(n))  # suppressed markers are gone
    # Sampled tokens: the completions less the forced cues, plus the suppressed markers (1 or 2 per extension).
    n_ext = res.info["extensions"].sum()
    kept = sum(len(c) for c in res.completions) - 2 * capped.sum() - 2 * n_ext
    assert kept + n_ext <= res.tokens <= kept + 2 * n_ext
    assert kinds == {1, 2} and res.tokens > kept + n_ext  # both markers ended thinking; both were suppressed


# ------------------------------------------------------------------------------------------------ samplers + scorers


def test_sample_and_select_and_prm_scorer(model):
    lm, params = model
    prompts = _prompts((3, 5), seed=6)
    cfg = SamplingConfig(max_new_tokens=12, n_samples=6, stop_ids=(EOS_ID,))
    sampler = Sampler(lm, pad_id=PAD)
    bon = sample_and_select(sampler, params, prompts, cfg, scorer=perfect_prm, delimiter_id=DELIM, agg="min")
    for p in range(2):
        scores = [s for _, s in bon.candidates[p]]
        assert bon.scores[p] == max(scores)
    oracle = verifier_scorer(lambda p, c: float(str(BAD) not in c.split()), decode=lambda t: " ".join(map(str, t)))
    wbon = sample_and_select(sampler, params, prompts, cfg, method="weighted_best_of_n", scorer=oracle,
                             answer_fn=lambda t: int(t[0]) if len(t) else None)
    for answer, cands in zip(wbon.info["answers"], wbon.candidates):
        sums = {}
        for c, w in cands:
            if len(c):
                sums[int(c[0])] = sums.get(int(c[0]), 0.0) + (BAD not in c.tolist())
        assert sums[answer] == max(sums.values())
    vote = sample_and_select(sampler, params, prompts, cfg, method="majority_vote",
                             answer_fn=lambda t: int(t[0]) if len(t) else None)
    for answer, cands in zip(vote.info["answers"], vote.candidates):
        firsts = [int(c[0]) for c, _ in cands if len(c)]
        assert answer == next(a for a in firsts if firsts.count(a) == max(map(firsts.count, firsts)))
    # The PRM adapter: sigmoid of the head's value at each step's last token.
    from jaxpost.models.heads import ScalarHeadLM
    prm = ScalarHeadLM(CFG, head_init_std=1.0)
    prm_params = prm.with_lm_params(params, jax.random.PRNGKey(3))
    scorer = prm_step_scorer(prm, prm_params, DELIM, pad_id=PAD)
    steps = [[np.array([5, DELIM]), np.array([6, 7])], [np.array([7, 7, DELIM])]]
    got = scorer(prompts, steps)
    values = jax.jit(prm.values)
    for p, st, g in zip(prompts, steps, got):
        row = np.concatenate([p] + st)
        v = np.asarray(values(prm_params, jnp.asarray(np.pad(row, (0, 16 - len(row))))[None]))[0]
        ends = np.cumsum([len(s) for s in st]) + len(p) - 1
        np.testing.assert_allclose(g, 1 / (1 + np.exp(-v[ends])), atol=1e-5)
    # The likelihood scorer: each step's least likely token (or geometric mean), from the full-sequence logits.
    jitted_logits = jax.jit(lm.logits)
    for how in ("min", "mean"):
        got = likelihood_step_scorer(lm, params, how=how, pad_id=PAD)(prompts, steps)
        for p, st, g in zip(prompts, steps, got):
            row = np.concatenate([p] + st)
            z = np.asarray(jitted_logits(params, jnp.asarray(np.pad(row, (0, 16 - len(row))))[None]))[0]
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))  # logp[t - 1, row[t]]: token t given the ones before
            bounds = len(p) + np.concatenate([[0], np.cumsum([len(s) for s in st])])
            tok = [logp[t - 1, row[t]] for t in range(len(row))[1:]]
            want = [np.exp(min(tok[a - 1:b - 1]) if how == "min" else np.mean(tok[a - 1:b - 1]))
                    for a, b in zip(bounds[:-1], bounds[1:])]
            np.testing.assert_allclose(g, want, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ sharding


def test_sharded_search_equals_one_device(model, decoder):
    lm, params = model
    prompts = _prompts((3, 5, 2), seed=7)
    mesh = mesh_of(2, 2, 2)
    sharded_params = jax.device_put(params, lm.param_shardings(mesh))
    out = []
    for dec, prm in ((decoder, params), (Decoder(lm, mesh, pad_id=PAD, min_room=ROOM), sharded_params)):
        beam = beam_search(dec, prm, prompts, width=4, max_new_tokens=10, stop_ids=(EOS_ID,))
        steps = step_search(dec, prm, prompts, perfect_prm, method="beam", n=4, m=2, max_steps=3, seed=1, **STEP)
        out.append((beam, steps))
    (b1, s1), (b8, s8) = out
    for a, b in ((b1, b8), (s1, s8)):
        assert all(np.array_equal(x, y) for x, y in zip(a.completions, b.completions))
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        assert a.tokens == b.tokens
