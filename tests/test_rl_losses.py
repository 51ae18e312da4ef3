"""Policy-gradient RL pieces: advantage estimators, policy / value losses, KL estimators, loss aggregation.

Hand-derived values (a two-group GRPO/RLOO example and a 4-token GAE example worked in comments), numpy loop
references written independently of the implementation (TRL's and verl's formulas), the KL estimators against their
definitions and the exact expectations of their values and gradients over a small categorical distribution, and the
central property of the aggregation: loss and gradient are the same however a batch is split into micro-batches and
devices, for every aggregation mode and every policy loss.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from jax.test_util import check_grads

from jaxpost.losses import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SEQUENCE_LEVEL_ESTIMATORS,
    TOKEN_LEVEL_ESTIMATORS,
    aggregate_loss,
    broadcast_to_tokens,
    dr_grpo,
    dynamic_sampling_keep,
    entropy_bonus,
    gae,
    get_advantage_estimator,
    get_kl_estimator,
    get_loss_aggregation,
    get_policy_loss,
    grpo,
    gspo,
    gspo_seq,
    k1,
    k2,
    k3,
    kl_loss,
    kl_penalty_sequence_rewards,
    kl_penalty_token_rewards,
    loss_denominator,
    masked_whiten,
    metric_means,
    overlong_penalty,
    ppo_clip,
    reinforce,
    reinforce_pp,
    rloo,
    sequence_to_token_rewards,
    value_loss,
)

MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
MAX_LEN = 16  # the constant of seq_mean_token_sum_norm in these tests
SEQUENCE_FORM = ("gspo_seq", "luspo", "rloo_seq")  # the losses of one ratio and one advantage per sequence
DETACHED_WEIGHT = ("cispo", "vespo")  # gradient = a detached weight x grad logp, not the derivative of the value


def f32(x):
    return jnp.asarray(x, jnp.float32)


# The programs here are tiny: compiling them dominates the run time, and one XLA compile of a whole test computation
# is much cheaper than eager mode's op-by-op compiles, and cheaper still without LLVM's optimisation passes.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def jgrad(f, *args, **kw):
    return jit(jax.grad(f, **kw))(*args)


def jcall(f, *args):
    return jit(f)(*args)


# ----------------------------------------------------------------------------------------------------------------------
# numpy references (loops, written from the papers / TRL / verl, not from the implementation)


def np_group_adv(r, G, *, scale="group", eps=1e-6):
    """TRL GRPOTrainer / verl compute_grpo_outcome_advantage: torch.std is unbiased (ddof=1)."""
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    batch_std = r.std(ddof=1)
    for g in range(0, len(r), G):
        x = r[g:g + G]
        a = x - x.mean()
        if scale == "group":
            a = a / (x.std(ddof=1) + eps)
        elif scale == "batch":
            a = a / (batch_std + eps)
        out[g:g + G] = a
    return out


def np_rloo(r, G):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    for g in range(0, len(r), G):
        for i in range(G):
            others = [r[g + j] for j in range(G) if j != i]
            out[g + i] = r[g + i] - np.mean(others)
    return out


def np_gae(rewards, values, mask, gamma, lam):
    """Per row: keep the valid positions in order, run textbook GAE on them (V after the last = 0), scatter back."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b] > 0)[0]
        r, v = rewards[b, idx], values[b, idx]
        a, last = np.zeros(len(idx)), 0.0
        for k in reversed(range(len(idx))):
            next_v = v[k + 1] if k + 1 < len(idx) else 0.0
            last = r[k] + gamma * next_v - v[k] + gamma * lam * last
            a[k] = last
        adv[b, idx], ret[b, idx] = a, a + v
    return adv, ret


def np_returns(rewards, mask, gamma):
    ret = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b] > 0)[0]
        g = 0.0
        for k in reversed(idx):
            g = rewards[b, k] + gamma * g
            ret[b, k] = g
    return ret


def np_whiten(x, mask, eps=1e-8):
    vals = x[mask > 0]
    return np.where(mask > 0, (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + eps), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# a small RL batch: 2 prompts x G = 4 samples, T = 6, ragged responses, one padding row


def rl_batch(seed=0, B=8, T=6, G=4):
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 3, 5, 1, 4, 6, 2, 0][:B])  # row 7 is padding (no response token)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    old = -rng.uniform(0.1, 3.0, (B, T))
    logp = old + rng.normal(0, 0.15, (B, T))
    ref = old + rng.normal(0, 0.3, (B, T))
    rewards = rng.integers(0, 2, B).astype(np.float32)
    rewards[:G] = [1, 0, 1, 0]  # make sure both groups carry signal
    adv_B = np_group_adv(rewards, G)
    adv_BT = adv_B[:, None] * mask + rng.normal(0, 0.3, (B, T)) * mask  # per-token advantages, varying within rows
    entropy = rng.uniform(0.5, 2.0, (B, T))
    values = rng.normal(0, 1, (B, T))
    old_values = values + rng.normal(0, 0.3, (B, T))
    returns = rng.normal(0, 1, (B, T))
    # garbage beyond the mask: must never matter
    for x in (logp, old, ref, adv_BT, entropy, values, old_values, returns):
        x[mask == 0] = rng.normal(0, 50, int((mask == 0).sum()))
    d = dict(logp=logp, old=old, ref=ref, mask=mask, rewards=rewards, adv_B=adv_B, adv_BT=adv_BT, entropy=entropy,
             values=values, old_values=old_values, returns=returns)
    return {k: f32(v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------------------------------
# sequence-level advantages by hand


# Two groups of G = 4 (binary verifier rewards), worked by hand:
#   group 1: r = [1, 0, 1, 0]  mean 0.5, deviations +-0.5, sum of squares 1, std (ddof=1) = sqrt(1/3) = 0.57735
#            GRPO  A = +-0.5 / 0.57735 = +-0.866025  (= +-sqrt(3)/2)
#            RLOO  A_i = r_i - mean of the other three: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3
#   group 2: r = [1, 1, 1, 0]  mean 0.75, deviations [.25, .25, .25, -.75], sum of squares 0.75, var 0.25, std 0.5
#            GRPO  A = [0.5, 0.5, 0.5, -1.5]
#            RLOO  A = [1 - 2/3, ..., 0 - 1] = [1/3, 1/3, 1/3, -1]   (= 4/3 x the deviations)
#   whole batch: 5 ones and 3 zeros, mean 0.625, sum of squares 5 (.375^2) + 3 (.625^2) = 1.875, var 1.875 / 7,
#            std 0.517549: GRPO scale="batch" A = deviations / 0.517549
TWO_GROUPS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
S3 = math.sqrt(3.0) / 2.0


def test_grpo_two_groups_by_hand():
    out = jcall(lambda r: dict(
        eps0=grpo(r, group_size=4, eps=0.0), default=grpo(r, group_size=4), trl=grpo(r, group_size=4, eps=1e-4),
        batch=grpo(r, group_size=4, scale="batch", eps=0.0), none=grpo(r, group_size=4, scale="none"),
        dr=dr_grpo(r, group_size=4), ddof0=grpo(r, group_size=4, eps=0.0, ddof=0)), f32(TWO_GROUPS))
    np.testing.assert_allclose(out["eps0"], [S3, -S3, S3, -S3, .5, .5, .5, -1.5], rtol=1e-6)
    # the default epsilon (1e-6) is added to the std, not under the square root
    s1, s2 = math.sqrt(1 / 3) + 1e-6, 0.5 + 1e-6
    np.testing.assert_allclose(out["default"], [.5 / s1, -.5 / s1, .5 / s1, -.5 / s1, .25 / s2, .25 / s2, .25 / s2,
                                                -.75 / s2], rtol=1e-6)
    np.testing.assert_allclose(out["trl"][4], 0.25 / 0.5001, rtol=1e-6)  # TRL's epsilon
    dev = np.array([.5, -.5, .5, -.5, .25, .25, .25, -.75])
    batch_std = math.sqrt(1.875 / 7)
    np.testing.assert_allclose(batch_std, 0.517549, rtol=1e-6)
    np.testing.assert_allclose(out["batch"], dev / batch_std, rtol=1e-6)
    np.testing.assert_allclose(out["none"], dev, rtol=1e-6)
    np.testing.assert_allclose(out["dr"], dev, rtol=1e-6)
    # ddof=0 (population std): group 1 std 0.5 -> +-1; group 2 std sqrt(0.75 / 4)
    np.testing.assert_allclose(out["ddof0"][:2], [1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(out["ddof0"][7], -.75 / math.sqrt(0.75 / 4), rtol=1e-6)


def test_rloo_two_groups_by_hand():
    np.testing.assert_allclose(jcall(lambda r: rloo(r, group_size=4), f32(TWO_GROUPS)),
                               [2 / 3, -2 / 3, 2 / 3, -2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0], rtol=1e-6)


@pytest.mark.parametrize("G", [2, 4, 8])
def test_group_estimators_equal_trl_and_verl_formulas(G):
    r = np.random.default_rng(G).normal(size=4 * G).astype(np.float32)
    r[:G] = 0.3  # one group with all rewards equal: exactly zero advantages (0.3 is not a float32 sum-friendly value)
    scales = ("group", "batch", "none")
    out = jcall(lambda x: ([grpo(x, group_size=G, scale=sc) for sc in scales], rloo(x, group_size=G),
                           dr_grpo(x, group_size=G)), f32(r))
    for sc, a in zip(scales, out[0]):
        np.testing.assert_allclose(a, np_group_adv(r, G, scale=sc), rtol=1e-5, atol=1e-6, err_msg=sc)
        np.testing.assert_array_equal(a[:G], 0.0)
    np.testing.assert_allclose(out[1], np_rloo(r, G), rtol=1e-5, atol=1e-6)
    # RLOO = G / (G - 1) x the centred rewards (Dr.GRPO's advantage)
    np.testing.assert_allclose(out[1], G / (G - 1) * out[2], rtol=1e-5, atol=1e-6)


def test_group_advantages_are_zero_sum_and_unit_std_within_groups():
    a, b = jcall(lambda r: (grpo(r, group_size=8, eps=0.0), rloo(r, group_size=8)),
                 f32(np.random.default_rng(1).normal(size=32)))
    a = np.asarray(a).reshape(4, 8)
    np.testing.assert_allclose(a.sum(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(a.std(-1, ddof=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(b).reshape(4, 8).sum(-1), 0.0, atol=1e-5)


def test_masked_rows_take_no_part():
    """Padding rows get 0 and leave every statistic alone: a batch with a dropped (masked) group gives the other
    groups' advantages unchanged, including the batch std; within a partly masked group the stats use the valid
    rows; a group with one valid row has no baseline (0). Padding may hold inf or NaN."""
    r = f32(TWO_GROUPS + [jnp.inf, -3.0, jnp.nan, 2.0])
    keep = jnp.asarray([1] * 8 + [0] * 4, bool)
    cases = ((grpo, {}), (grpo, dict(scale="batch")), (grpo, dict(scale="none")), (rloo, {}))
    got, want = jcall(lambda r: ([est(r, group_size=4, mask_B=keep, **kw) for est, kw in cases],
                                 [est(r[:8], group_size=4, **kw) for est, kw in cases]), r)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g[:8], w, rtol=1e-6)
        np.testing.assert_array_equal(g[8:], 0.0)
    # partly masked group: rows {0, 1, 2} of [1, 0, 1, junk] -> mean 2/3, std (ddof=1) sqrt(1/3)
    m = jnp.asarray([1, 1, 1, 0, 1, 1, 1, 1], bool)
    single = jnp.asarray([1, 0, 0, 0, 1, 1, 1, 1], bool)
    r2 = f32(TWO_GROUPS).at[3].set(100.0)
    a, b, singles, ones = jcall(lambda r2, r: (
        grpo(r2, group_size=4, eps=0.0, mask_B=m), rloo(r2, group_size=4, mask_B=m),
        [est(r, group_size=4, mask_B=single) for est in (grpo, rloo, dr_grpo)],
        [est(r, group_size=1) for est in (grpo, rloo, dr_grpo)]), r2, f32(TWO_GROUPS))
    np.testing.assert_allclose(a[:4], [(1 / 3) / math.sqrt(1 / 3), (-2 / 3) / math.sqrt(1 / 3),
                                       (1 / 3) / math.sqrt(1 / 3), 0.0], rtol=1e-6)
    np.testing.assert_allclose(b[:4], [.5, -1.0, .5, 0.0], rtol=1e-6)
    # one valid member, or a group of one: advantage 0 (no baseline), never NaN
    for x in singles:
        np.testing.assert_array_equal(x[:4], 0.0)
    for x in ones:
        np.testing.assert_array_equal(x, 0.0)


def test_advantages_carry_no_gradient():
    r = f32(TWO_GROUPS)
    total = lambda x: sum(jnp.sum(get_advantage_estimator(name)(x, group_size=4) * jnp.arange(8.0))
                          for name in SEQUENCE_LEVEL_ESTIMATORS)
    np.testing.assert_array_equal(jgrad(total, r), 0.0)
    b = rl_batch()
    g = jgrad(lambda v: jnp.sum(gae(b["returns"], b["mask"], values_BT=v)[0] + reinforce_pp(v, b["mask"])[0]),
              b["values"])
    np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# token-level advantages


def test_gae_four_tokens_by_hand():
    # rewards [0, 0, 0, 1] (outcome on the last token), values [.5, .4, .9, .6], gamma = 1, lam = 0.5:
    #   deltas  t3: 1 + 0 - .6 = .4   t2: 0 + .6 - .9 = -.3   t1: .9 - .4 = .5   t0: .4 - .5 = -.1
    #   A3 = .4;  A2 = -.3 + .5 x .4 = -.1;  A1 = .5 + .5 x (-.1) = .45;  A0 = -.1 + .5 x .45 = .125
    #   returns = A + V = [.625, .85, .8, 1.0]
    r, v, m = f32([[0, 0, 0, 1]]), f32([[.5, .4, .9, .6]]), jnp.ones((1, 4))
    out = jcall(lambda r, v: [gae(r, m, values_BT=v, gamma=g, lam=lam) for g, lam in ((1.0, .5), (1.0, 1.0), (.9, 0.))],
                r, v)
    adv, ret = out[0]
    np.testing.assert_allclose(adv, [[.125, .45, -.1, .4]], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ret, [[.625, .85, .8, 1.0]], rtol=1e-6)
    # lam = 1, gamma = 1: Monte Carlo, the return is the reward-to-go (1 everywhere), A = 1 - V
    adv, ret = out[1]
    np.testing.assert_allclose(ret, [[1, 1, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(adv, 1 - v, rtol=1e-6)
    # lam = 0: one-step TD errors
    adv, _ = out[2]
    np.testing.assert_allclose(adv, [[.9 * .4 - .5, .9 * .9 - .4, .9 * .6 - .9, 1 - .6]], rtol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_equals_numpy_loop_with_ragged_and_holed_masks(gamma, lam):
    rng = np.random.default_rng(3)
    B, T = 6, 9
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)  # holes anywhere (e.g. tool observations)
    mask[0] = 0  # an empty row
    mask[1, :] = 1
    rewards, values = rng.normal(size=(B, T)).astype(np.float32), rng.normal(size=(B, T)).astype(np.float32)
    want_adv, want_ret = np_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    # masked positions are 0 and do not propagate: garbage there changes nothing
    junk = np.where(mask > 0, 0.0, 1e3).astype(np.float32)
    f = lambda r, v: gae(r, f32(mask), values_BT=v, gamma=gamma, lam=lam)
    (adv, ret), (adv2, ret2) = jcall(lambda r, v, j: (f(r, v), f(r + j, v - j)), f32(rewards), f32(values),
                                     f32(junk))
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adv2, adv)
    np.testing.assert_array_equal(ret2, ret)


def test_gae_right_padding_equals_sliced():
    rng = np.random.default_rng(4)
    r, v = f32(rng.normal(size=(1, 5))), f32(rng.normal(size=(1, 5)))
    pad = lambda x: jnp.concatenate([x, f32(rng.normal(size=(1, 3)) * 9)], axis=1)
    m = jnp.concatenate([jnp.ones((1, 5)), jnp.zeros((1, 3))], axis=1)
    full, sliced = jcall(lambda pr, pv: (gae(pr, m, values_BT=pv, gamma=0.95, lam=0.9),
                                         gae(r, jnp.ones((1, 5)), values_BT=v, gamma=0.95, lam=0.9)), pad(r), pad(v))
    for a, b in zip(full, sliced):
        np.testing.assert_allclose(a[:, :5], b, rtol=1e-6)
        np.testing.assert_array_equal(a[:, 5:], 0.0)


def test_reinforce_pp_discounted_returns_and_global_whitening():
    # one sequence, outcome 1 on the last token, gamma = 0.5: returns [1/8, 1/4, 1/2, 1]
    adv, ret = jcall(lambda r: reinforce_pp(r, jnp.ones((1, 4)), gamma=0.5, whiten=False), f32([[0, 0, 0, 1]]))
    np.testing.assert_allclose(ret, [[.125, .25, .5, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(adv, ret)
    # with the KL penalty in the reward: r_t = 1[last] - beta k1_t, returns of that, whitened over all valid tokens
    b = rl_batch(5)

    def run(d):
        tok_r = kl_penalty_token_rewards(sequence_to_token_rewards(d["rewards"], d["mask"]),
                                         k1(d["old"], d["ref"], d["mask"]), d["mask"], beta=0.05)
        return tok_r, reinforce_pp(tok_r, d["mask"], gamma=0.99)

    tok_r, (adv, ret) = jcall(run, b)
    mask = np.asarray(b["mask"])
    want_ret = np_returns(np.asarray(tok_r, np.float64), mask, 0.99)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, np_whiten(want_ret, mask), rtol=1e-4, atol=1e-5)
    vals = np.asarray(adv)[mask > 0]
    np.testing.assert_allclose([vals.mean(), vals.std(ddof=1)], [0.0, 1.0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)


def test_masked_whiten_and_sequence_rewards():
    x, m = f32([[1.0, 2.0, 3.0, 99.0]]), f32([[1, 1, 1, 0]])
    # mean 2, unbiased variance 1
    m2 = f32([[0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    w, w_scale, w_pop, tok, bc = jcall(lambda x, r: (
        masked_whiten(x, m, eps=0.0), masked_whiten(x, m, eps=0.0, shift_mean=False),
        masked_whiten(x, m, eps=0.0, ddof=0), sequence_to_token_rewards(r, m2), broadcast_to_tokens(r, m2)),
        x, f32([2.0, 3.0, 4.0]))
    np.testing.assert_allclose(w, [[-1.0, 0.0, 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(w_scale, [[1.0, 2.0, 3.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(w_pop, [[-math.sqrt(1.5), 0, math.sqrt(1.5), 0]], rtol=1e-6)
    np.testing.assert_array_equal(tok, [[0, 0, 2, 0, 0], [0, 0, 0, 3, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(bc, m2 * f32([[2.0], [3.0], [4.0]]))


# ----------------------------------------------------------------------------------------------------------------------
# DAPO reward shaping and the dynamic-sampling filter


def test_overlong_penalty_by_hand():
    # L = 20, cache C = 4: no penalty up to 16 tokens, linear to -1 at 20, -1 beyond
    got = overlong_penalty(jnp.array([0, 16, 17, 18, 20, 25]), max_length=20, cache_length=4)
    np.testing.assert_allclose(got, [0, 0, -.25, -.5, -1, -1], rtol=1e-6)
    np.testing.assert_allclose(overlong_penalty(jnp.array([18]), max_length=20, cache_length=4, penalty_factor=0.5),
                               [-.25], rtol=1e-6)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(jnp.array([1]), max_length=4, cache_length=8)


def test_dynamic_sampling_keeps_groups_with_nonzero_reward_std():
    r = f32([1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, .5, .5, .5, .50001])
    keep, adv = jcall(lambda r: (dynamic_sampling_keep(r, group_size=4), grpo(r, group_size=4)), r)
    np.testing.assert_array_equal(keep, [False, True, False, True])
    # exactly the groups with non-zero GRPO advantages
    adv = np.asarray(adv).reshape(4, 4)
    np.testing.assert_array_equal(np.any(adv != 0, axis=-1), keep)


# ----------------------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_by_hand_and_against_definitions():
    # logp = -1, ref = -2: log r = -1; k1 = 1, k2 = 1/2, k3 = e^-1 - 1 + 1 = e^-1
    lp, rf = f32([[-1.0]]), f32([[-2.0]])
    np.testing.assert_allclose([k1(lp, rf)[0, 0], k2(lp, rf)[0, 0], k3(lp, rf)[0, 0]], [1.0, 0.5, math.exp(-1)],
                               rtol=1e-6)
    rng = np.random.default_rng(6)
    logp, ref = -rng.uniform(0.1, 4, (4, 7)), -rng.uniform(0.1, 4, (4, 7))
    m = f32(rng.random((4, 7)) > 0.5)
    bad = jnp.where(m > 0, f32(ref), jnp.inf)
    names = list(KL_ESTIMATORS)
    vals, same, masked = jcall(lambda lp, rf, bad: (
        {k: KL_ESTIMATORS[k](lp, rf) for k in names}, {k: KL_ESTIMATORS[k](lp, lp) for k in names},
        {k: KL_ESTIMATORS[k](lp, bad, m) for k in names}), f32(logp), f32(ref), bad)
    log_r = ref - logp
    np.testing.assert_allclose(vals["k1"], -log_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vals["k2"], log_r ** 2 / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vals["k3"], (np.exp(log_r) - 1) - log_r, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(vals["k3"]) >= 0) and np.all(np.asarray(vals["k2"]) >= 0)
    # equal log-probs: every estimator 0; masked tokens 0 whatever they hold
    for name in names:
        np.testing.assert_array_equal(same[name], 0.0)
        np.testing.assert_array_equal(np.asarray(masked[name])[np.asarray(m) == 0], 0.0)
        assert np.all(np.isfinite(masked[name])), name
    # optional clamp of log r (verl clamps to +-20)
    np.testing.assert_allclose(k1(f32([[0.0]]), f32([[-50.0]]), max_log_ratio=20.0), [[20.0]])


def _categorical(seed=7, V=6):
    rng = np.random.default_rng(seed)
    theta = f32(rng.normal(size=V))
    log_ref = jax.nn.log_softmax(f32(rng.normal(size=V)))
    return theta, log_ref


def test_kl_estimator_expectations_over_a_categorical():
    """Exact expectations under x ~ pi: E[k1] = E[k3] = KL(pi || ref); k2 agrees to second order only."""
    theta, log_ref = _categorical()
    log_pi = jax.nn.log_softmax(theta)
    pi = jnp.exp(log_pi)
    kl = float(jnp.sum(pi * (log_pi - log_ref)))
    e = lambda k, lp, lr: float(jnp.sum(jnp.exp(lp) * k(lp[None], lr[None])[0]))
    np.testing.assert_allclose(e(k1, log_pi, log_ref), kl, rtol=1e-5)
    np.testing.assert_allclose(e(k3, log_pi, log_ref), kl, rtol=1e-5)
    assert abs(e(k2, log_pi, log_ref) - kl) > 1e-3 * kl  # biased
    # close distributions: k2's expectation matches KL to second order
    near = jax.nn.log_softmax(theta + 0.01 * jnp.sin(jnp.arange(6.0)))
    kl_near = float(jnp.sum(pi * (log_pi - near)))
    np.testing.assert_allclose(e(k2, log_pi, near), kl_near, rtol=2e-2)


def test_kl_estimator_gradients_in_the_loss():
    """As a loss (samples from pi held fixed, gradient through log pi of the sample): in expectation k1 gives 0,
    k2 the gradient of KL(pi || ref) and k3 the gradient of the forward KL(ref || pi)."""
    theta, log_ref = _categorical()

    def expected_loss(th, name):
        log_pi = jax.nn.log_softmax(th)
        w = jax.lax.stop_gradient(jnp.exp(log_pi))  # the sampling distribution
        return jnp.sum(w * kl_loss(log_pi[None], log_ref[None], jnp.ones((1, 6)), beta=1.0, estimator=name)[0])

    reverse = jgrad(lambda th: jnp.sum(jax.nn.softmax(th) * (jax.nn.log_softmax(th) - log_ref)), theta)
    forward = jgrad(lambda th: jnp.sum(jnp.exp(log_ref) * (log_ref - jax.nn.log_softmax(th))), theta)
    g1, g2, g3 = jcall(lambda th: [jax.grad(expected_loss)(th, k) for k in ("k1", "k2", "k3")], theta)
    np.testing.assert_allclose(g1, 0.0, atol=1e-6)
    np.testing.assert_allclose(g2, reverse, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g3, forward, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(reverse - forward))) > 1e-2  # they really differ here
    # per token, d k / d logp: k1 1, k2 (logp - ref), k3 1 - ref / pi
    lp, rf = f32([[-1.0, -0.3]]), f32([[-2.0, -0.1]])
    total = lambda x, y, k: jnp.sum(kl_loss(x, y, jnp.ones((1, 2)), beta=1.0, estimator=k))
    grads = jcall(lambda x, y: [jax.grad(total, argnums=(0, 1))(x, y, k) for k in ("k1", "k2", "k3")], lp, rf)
    want = [[1.0, 1.0], [1.0, -0.2], [1 - math.exp(-1), 1 - math.exp(0.2)]]
    for (g_lp, g_ref), w, name in zip(grads, want, ("k1", "k2", "k3")):
        np.testing.assert_allclose(g_lp[0], w, rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(g_ref, 0.0)  # the reference is detached


def test_kl_in_the_reward():
    b = rl_batch(8)
    m = np.asarray(b["mask"])
    seq_pen = lambda old: kl_penalty_sequence_rewards(b["rewards"], k1(old, b["ref"], b["mask"]), b["mask"], beta=0.1)

    def run(d):
        kl_BT = k1(d["old"], d["ref"], d["mask"])
        tok = sequence_to_token_rewards(d["rewards"], d["mask"])
        return (kl_BT, tok, kl_penalty_token_rewards(tok, kl_BT, d["mask"], beta=0.1), seq_pen(d["old"]),
                jax.grad(lambda x: jnp.sum(seq_pen(x)))(d["old"]))

    kl_BT, tok, got, seq, g = jcall(run, b)
    np.testing.assert_allclose(got, (np.asarray(tok) - 0.1 * np.asarray(kl_BT)) * m, rtol=1e-6, atol=1e-7)
    # = r - beta (log pi(y) - log ref(y)) with k1; and the token version sums to the same per sequence
    want = np.asarray(b["rewards"]) - 0.1 * np.sum((np.asarray(b["old"]) - np.asarray(b["ref"])) * m, axis=-1)
    np.testing.assert_allclose(seq, want, rtol=1e-5, atol=1e-6)
    rows = m.sum(-1) > 0  # (a row without response tokens has nowhere to put its reward)
    np.testing.assert_allclose(jnp.sum(got, axis=-1)[rows], seq[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g, 0.0)  # a reward: detached


# ----------------------------------------------------------------------------------------------------------------------
# policy losses by hand


def _ppo_case():
    # ratios [1.5, 1.5, 4, 0.5, 0.5], advantages [+1, -1, -1, -1, +1], eps_low 0.2, eps_high 0.28, dual-clip c = 3:
    #   1.5, A=+1: -min(1.5, 1.28) = -1.28 (clipped high, no gradient)
    #   1.5, A=-1: -min(-1.5, -1.28) = 1.5 (unclipped: gradient -A rho = 1.5)
    #   4.0, A=-1: unclipped 4, dual-clip min(4, 3) = 3 (no gradient)
    #   0.5, A=-1: -min(-0.5, -0.8) = 0.8 (clipped low, no gradient)
    #   0.5, A=+1: -min(0.5, 0.8) = -0.5 (unclipped: gradient -A rho = -0.5)
    logp = jnp.log(f32([[1.5, 1.5, 4.0, 0.5, 0.5]]))
    return logp, jnp.zeros_like(logp), f32([[1.0, -1.0, -1.0, -1.0, 1.0]]), jnp.ones_like(logp)


def test_ppo_clip_by_hand():
    logp, old, adv, m = _ppo_case()
    f = lambda x: ppo_clip(x, old, adv, m, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    (loss, metrics), g = jcall(lambda x: (f(x), jax.grad(lambda y: jnp.sum(f(y)[0]))(x)), logp)
    np.testing.assert_allclose(loss, [[-1.28, 1.5, 3.0, 0.8, -0.5]], rtol=1e-6)
    np.testing.assert_allclose(g, [[0.0, 1.5, 0.0, 0.0, -0.5]], rtol=1e-6, atol=1e-7)
    mm = metric_means(metrics)
    np.testing.assert_allclose([mm["clip_frac_low"], mm["clip_frac_high"], mm["clip_frac"], mm["clip_frac_dual"]],
                               [.2, .2, .4, .2])
    np.testing.assert_allclose(mm["ratio"], 8.0 / 5, rtol=1e-6)
    r = np.array([1.5, 1.5, 4.0, 0.5, 0.5])
    np.testing.assert_allclose(mm["approx_kl"], np.mean(r - 1 - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(mm["approx_kl_k1"], np.mean(-np.log(r)), rtol=1e-5)
    # without dual-clip the ratio-4 token costs 4; symmetric eps 0.2 clips the first token at 1.2
    loss, _ = jcall(lambda x: ppo_clip(x, old, adv, m), logp)
    np.testing.assert_allclose(loss, [[-1.2, 1.5, 4.0, 0.8, -0.5]], rtol=1e-6)


def test_ppo_clip_equals_verl_formula_on_random_tokens():
    b = rl_batch(9)
    logp, old, adv, m = (np.asarray(b[k], np.float64) for k in ("logp", "old", "adv_BT", "mask"))
    el, eh, c = 0.2, 0.28, 3.0
    # verl compute_policy_loss (vanilla), written out
    ratio = np.exp(np.where(m > 0, logp - old, 0.0))
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - el, 1 + eh)
    clip1 = np.maximum(pg1, pg2)
    pg3 = -adv * c
    want = np.where(adv < 0, np.minimum(pg3, clip1), clip1) * m
    got, metrics = jcall(lambda x: ppo_clip(x, b["old"], b["adv_BT"], b["mask"], eps_low=el, eps_high=eh,
                                            dual_clip=c), b["logp"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # verl's pg_clipfrac: the clipped term is the larger one
    np.testing.assert_allclose(metric_means(metrics)["clip_frac"], np.sum((pg2 > pg1) * m) / m.sum(), rtol=1e-6)


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_old_equals_new_gives_ratio_one_no_clipping_and_the_reinforce_gradient(name):
    b = rl_batch(10)
    adv = b["adv_B"] if name in SEQUENCE_FORM else b["adv_BT"]
    obj = lambda f: lambda x: aggregate_loss(f(x, b["logp"], adv, b["mask"])[0], b["mask"],
                                             mode="seq_mean_token_mean", denominator=7.0)
    metrics, got, want = jcall(lambda x: (get_policy_loss(name)(x, x, adv, b["mask"])[1],
                                          jax.grad(obj(get_policy_loss(name)))(x), jax.grad(obj(reinforce))(x)),
                               b["logp"])
    mm = metric_means(metrics)
    np.testing.assert_allclose(mm["ratio"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(mm["approx_kl"], 0.0, atol=1e-7)
    for k in ("clip_frac", "clip_frac_low", "clip_frac_high"):
        if k in mm:
            np.testing.assert_array_equal(mm[k], 0.0)
    if name in ("gspo_seq", "luspo"):  # gradient of the sequence mean: -A / |y| on every token of the sequence
        n = jnp.maximum(jnp.sum(b["mask"], -1, keepdims=True), 1.0)
        want = -b["adv_B"][:, None] * b["mask"] / n / 7.0
    if name == "rloo_seq":  # the sequence's summed log-ratio: -A on every token of the sequence
        want = -b["adv_B"][:, None] * b["mask"] / 7.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reinforce_by_hand():
    lp, m = f32([[-1.0, -2.0, -0.5]]), f32([[1, 1, 0]])
    (loss, metrics), g = jcall(lambda x: (reinforce(x, x - 0.1, f32([2.0]), m),
                                          jax.grad(lambda y: jnp.sum(reinforce(y, x, f32([2.0]), m)[0]))(x)), lp)
    np.testing.assert_allclose(loss, [[2.0, 4.0, 0.0]])
    np.testing.assert_allclose(g, [[-2, -2, 0]])
    np.testing.assert_allclose(metric_means(metrics)["ratio"], math.exp(0.1), rtol=1e-6)


def test_gspo_by_hand():
    # one sequence of 2 tokens, log-ratios [0.2, 0.4]: s = exp(0.3) = 1.34986; A = +1
    #   eps_high 0.5: unclipped, loss -s on each token; gradient wrt each logp: -s (token form, summed over tokens)
    #   eps_high 0.2: clipped at 1.2, loss -1.2, no gradient
    lp, old, m = f32([[0.2, 0.4]]), jnp.zeros((1, 2)), jnp.ones((1, 2))
    s = math.exp(0.3)
    def run(x):
        out = {}
        for f in (gspo, gspo_seq):
            for eh in (0.5, 0.2):
                g = lambda y: f(y, old, f32([1.0]), m, eps_low=0.2, eps_high=eh)
                out[f.__name__, eh] = g(x), jax.grad(lambda y: jnp.sum(g(y)[0]))(x)
        return out

    out = jcall(run, lp)
    for f in ("gspo", "gspo_seq"):
        (loss, metrics), _ = out[f, 0.5]
        np.testing.assert_allclose(loss, [[-s, -s]], rtol=1e-6)
        np.testing.assert_allclose(metric_means(metrics)["seq_ratio"], s, rtol=1e-6)
        (loss, metrics), g = out[f, 0.2]
        np.testing.assert_allclose(loss, [[-1.2, -1.2]], rtol=1e-6)
        np.testing.assert_allclose(metric_means(metrics)["clip_frac_high"], 1.0)
        np.testing.assert_array_equal(g, 0.0)
    # token form, per token: -A sg(s) grad logp_t; sequence form: grad of -s = -s x (1/2) per token, both tokens
    # carrying the same loss -s (the sum over the two tokens doubles it)
    np.testing.assert_allclose(out["gspo", 0.5][1], [[-s, -s]], rtol=1e-6)
    np.testing.assert_allclose(out["gspo_seq", 0.5][1], [[-s, -s]], rtol=1e-6)


def test_gspo_token_and_sequence_forms_agree_under_seq_mean_token_mean():
    """With one advantage per sequence, GSPO-token aggregated by seq_mean_token_mean is the sequence-form objective:
    same value and gradient (Zheng et al. 2025, Sec. 4.3), clipped sequences included."""
    b = rl_batch(11)
    logp = b["old"] + 0.02 * jnp.sign(b["logp"] - b["old"]) * b["mask"]  # some sequences inside, some outside
    den = loss_denominator(b["mask"], mode="seq_mean_token_mean")

    def run(x):
        out = []
        for adv in (b["adv_B"], broadcast_to_tokens(b["adv_B"], b["mask"])):
            for f in (gspo, gspo_seq):
                obj = lambda y: aggregate_loss(f(y, b["old"], adv, b["mask"], eps_low=0.01, eps_high=0.012)[0],
                                               b["mask"], mode="seq_mean_token_mean", denominator=den)
                out.append(jax.value_and_grad(obj)(x))
        return out, gspo(x, b["old"], b["adv_B"], b["mask"], eps_low=0.01, eps_high=0.012)[1]

    vals, metrics = jcall(run, logp)
    for i in (0, 2):
        np.testing.assert_allclose(vals[i][0], vals[i + 1][0], rtol=1e-6)
        np.testing.assert_allclose(vals[i][1], vals[i + 1][1], rtol=1e-5, atol=1e-8)
    # and the per-sequence clip decisions are shared by all tokens: some sequences were clipped
    assert 0 < float(metric_means(metrics)["clip_frac"]) < 1


def test_value_loss_by_hand():
    # V = 1, V_old = .5, R = 0, eps .2: clipped V = .7; max(1, .49) = 1 -> 0.5, gradient (V - R) = 1
    # V = .6, V_old = .5, R = 1, eps .05: clipped V = .55; max(.16, .2025) -> .10125, clipped: no gradient
    v, vo, r, m = f32([[1.0, 0.6, 7.0]]), f32([[0.5, 0.5, 0.0]]), f32([[0.0, 1.0, 0.0]]), f32([[1, 1, 0]])
    loss_02, (loss, metrics), g, loss_none = jcall(lambda x: (
        value_loss(x, vo, r, m, clip_eps=0.2)[0], value_loss(x, vo, r, m, clip_eps=0.05),
        jax.grad(lambda y: jnp.sum(value_loss(y, vo, r, m, clip_eps=0.05)[0]))(x),
        value_loss(x, vo, r, m, clip_eps=None)[0]), v)
    np.testing.assert_allclose(loss_02[0, 0], 0.5)
    np.testing.assert_allclose(loss, [[0.5, 0.10125, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(metric_means(metrics)["vf_clip_frac"], 0.5)
    np.testing.assert_allclose(g, [[1.0, 0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(loss_none, [[0.5, 0.08, 0.0]], rtol=1e-6)


def test_entropy_bonus_and_aggregations_by_hand():
    ent, m = f32([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]), f32([[1, 1, 0], [1, 0, 0]])
    # per-token losses [[1, 2, junk], [3, junk, junk]] plus an empty padding row
    loss = f32([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0], [50.0, 50.0, 50.0]])
    mask = f32([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # token_mean (1 + 2 + 3) / 3 = 2; seq_mean_token_mean ((1 + 2) / 2 + 3) / 2 = 2.25;
    # seq_mean_token_sum_norm (3 + 3) / (2 sequences x 16) = 0.1875
    cases = (("token_mean", 6.0, 3.0, 2.0), ("seq_mean_token_mean", 4.5, 2.0, 2.25),
             ("seq_mean_token_sum_norm", 6.0, 32.0, 0.1875))
    z = jnp.zeros((2, 3))
    bonus, got, empty = jcall(lambda loss, mask, ent: (
        entropy_bonus(ent, m, coef=0.1),
        [(get_loss_aggregation(mode)(loss, mask, max_length=MAX_LEN),
          loss_denominator(mask, mode=mode, max_length=MAX_LEN),
          aggregate_loss(loss, mask, mode=mode, denominator=den)) for mode, _, den, _ in cases],
        aggregate_loss(loss[:2], z, mode="token_mean", denominator=loss_denominator(z, mode="token_mean"))),
        loss, mask, ent)
    np.testing.assert_allclose(bonus, [[-.1, -.2, 0], [-.3, 0, 0]], rtol=1e-6)
    for (mode, num, den, want), ((n, d), d2, value) in zip(cases, got):
        np.testing.assert_allclose([n, d, d2], [num, den, den], err_msg=mode)
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=mode)
    assert float(empty) == 0.0  # an empty batch gives 0, not NaN


# ----------------------------------------------------------------------------------------------------------------------
# micro-batch and device invariance: the gradient-accumulation normalisation bug cannot happen


POLICY_CASES = {
    "ppo": dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "gspo": dict(eps_low=0.01, eps_high=0.012),
    "gspo_seq": dict(eps_low=0.01, eps_high=0.012),
    "luspo": dict(eps_low=0.01, eps_high=0.012),
    "rloo_seq": dict(eps_low=0.2, eps_high=0.28),
    "reinforce": {},
    "cispo": dict(clip_max=1.1, clip_min=0.9),
    "sapo": dict(tau_pos=1.0, tau_neg=1.05),
    "vespo": {},
}


def _objective(name, mode, den, old, ref, adv, mask, ent):
    """The full per-token objective of a step (policy loss + k3 KL in the loss + entropy bonus), aggregated."""
    hyper = POLICY_CASES[name]

    def f(logp):
        loss_BT, _ = get_policy_loss(name)(logp, old, adv, mask, **hyper)
        loss_BT = loss_BT + kl_loss(logp, ref, mask, beta=0.04) + entropy_bonus(ent, mask, coef=1e-3)
        return aggregate_loss(loss_BT, mask, mode=mode, denominator=den)

    return f


@functools.cache
def _contributions(name):
    """jit: for every mode, the contribution and gradient of one micro-batch given the global denominators [3]."""

    def f(logp, old, ref, adv, mask, ent, dens):
        return {mode: jax.value_and_grad(_objective(name, mode, dens[i], old, ref, adv, mask, ent))(logp)
                for i, mode in enumerate(MODES)}

    return jit(f)


def _denominators(mask):
    return jnp.stack([loss_denominator(mask, mode=mode, max_length=MAX_LEN) for mode in MODES])


def _split_run(b, name, bounds, *, local_denominators=False):
    """Per mode: the sum of the micro-batch contributions and their concatenated gradients. The global denominators
    are summed from the micro-batches' masks (or, to show the bug, each micro-batch uses its own)."""
    dens = sum(_denominators(b["mask"][lo:hi]) for lo, hi in bounds)
    adv = b["adv_B"] if name in SEQUENCE_FORM else b["adv_BT"]
    parts = []
    for lo, hi in bounds:
        sl = lambda x: x[lo:hi]
        d = _denominators(sl(b["mask"])) if local_denominators else dens
        parts.append(_contributions(name)(sl(b["logp"]), sl(b["old"]), sl(b["ref"]), sl(adv), sl(b["mask"]),
                                          sl(b["entropy"]), d))
    return {mode: (sum(p[mode][0] for p in parts), jnp.concatenate([p[mode][1] for p in parts])) for mode in MODES}


SPLITS = {1: [(0, 8)], 2: [(0, 4), (4, 8)], 4: [(0, 2), (2, 4), (4, 6), (6, 8)], "uneven": [(0, 2), (2, 6), (6, 8)]}


@pytest.mark.parametrize("name", list(POLICY_CASES))
def test_loss_and_gradient_invariant_to_micro_batch_split(name):
    """For every aggregation mode: 1, 2, 4 and an uneven split into micro-batches give the full-batch loss and
    gradient (w.r.t. the new log-probs), with the policy loss, a KL term and an entropy bonus together."""
    b = rl_batch(12)
    full = _split_run(b, name, SPLITS[1])
    for mode in MODES:
        full_v, full_g = full[mode]
        assert np.all(np.isfinite(full_g)) and float(jnp.max(jnp.abs(full_g))) > 0
        # the gradient vanishes on masked tokens (padding garbage never leaks)
        np.testing.assert_array_equal(np.asarray(full_g)[np.asarray(b["mask"]) == 0], 0.0)
    for key in (2, 4, "uneven"):
        split = _split_run(b, name, SPLITS[key])
        for mode in MODES:
            np.testing.assert_allclose(split[mode][0], full[mode][0], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} {mode} {key}")
            np.testing.assert_allclose(split[mode][1], full[mode][1], rtol=1e-5, atol=1e-8,
                                       err_msg=f"{name} {mode} {key}")


def test_full_batch_values_equal_the_mode_definitions():
    """The full-batch value, from numpy: each mode's definition applied to the per-token objective."""
    b = rl_batch(13)
    full = _split_run(b, "ppo", SPLITS[1])
    l_BT = jcall(lambda lp: ppo_clip(lp, b["old"], b["adv_BT"], b["mask"], **POLICY_CASES["ppo"])[0]
                 + kl_loss(lp, b["ref"], b["mask"], beta=0.04) + entropy_bonus(b["entropy"], b["mask"], coef=1e-3),
                 b["logp"])
    l = np.asarray(l_BT, np.float64)
    m = np.asarray(b["mask"], np.float64)
    rows = m.sum(-1) > 0
    want = {"token_mean": (l * m).sum() / m.sum(),
            "seq_mean_token_mean": np.mean([(l[i] * m[i]).sum() / m[i].sum() for i in np.nonzero(rows)[0]]),
            "seq_mean_token_sum": np.mean([(l[i] * m[i]).sum() for i in np.nonzero(rows)[0]]),
            "seq_mean_token_sum_norm": (l * m).sum() / (rows.sum() * MAX_LEN)}
    for mode in MODES:
        np.testing.assert_allclose(float(full[mode][0]), want[mode], rtol=1e-5, err_msg=mode)


def test_a_mean_of_micro_batch_means_would_be_wrong():
    """The bug this design rules out: averaging per-micro-batch means weights tokens (or sequences) unequally when
    the micro-batches hold different numbers of them (the gradient-accumulation bug that hit TRL and veRL). With
    global denominators the split is exact (above); the naive alternative visibly differs."""
    b = rl_batch(14)
    exact = _split_run(b, "ppo", SPLITS[1])
    naive = _split_run(b, "ppo", SPLITS[2], local_denominators=True)
    for mode in ("token_mean", "seq_mean_token_mean"):
        assert abs(float(naive[mode][0]) / 2 - float(exact[mode][0])) > 1e-3, mode
        assert float(jnp.max(jnp.abs(naive[mode][1] / 2 - exact[mode][1]))) > 1e-4, mode


def test_value_loss_invariant_to_micro_batch_split():
    b = rl_batch(15)

    @jit
    def contribution(v, v_old, ret, mask, dens):
        return {mode: jax.value_and_grad(lambda x: aggregate_loss(
            value_loss(x, v_old, ret, mask, clip_eps=0.2)[0], mask, mode=mode, denominator=dens[i]))(v)
            for i, mode in enumerate(MODES)}

    def run(bounds):
        dens = sum(_denominators(b["mask"][lo:hi]) for lo, hi in bounds)
        outs = [contribution(*(b[k][lo:hi] for k in ("values", "old_values", "returns", "mask")), dens)
                for lo, hi in bounds]
        return {m: (sum(o[m][0] for o in outs), jnp.concatenate([o[m][1] for o in outs])) for m in MODES}

    full = run(SPLITS[1])
    for key in (2, 4, "uneven"):
        split = run(SPLITS[key])
        for mode in MODES:
            np.testing.assert_allclose(split[mode][0], full[mode][0], rtol=1e-5, err_msg=mode)
            np.testing.assert_allclose(split[mode][1], full[mode][1], rtol=1e-5, atol=1e-8, err_msg=mode)


def test_four_devices_with_psum_equal_the_full_batch():
    """Data parallelism over 4 emulated devices, every mode: each device psums its denominator, computes its
    contribution and gradient; the psum of the contributions and the gathered gradients equal the full batch."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    b = rl_batch(16)
    keys = ("logp", "old", "ref", "adv_BT", "mask", "entropy")

    def per_device(logp, old, ref, adv, mask, ent):
        out = []
        for mode in MODES:
            den = jax.lax.psum(loss_denominator(mask, mode=mode, max_length=MAX_LEN), "data")
            v, g = jax.value_and_grad(_objective("ppo", mode, den, old, ref, adv, mask, ent))(logp)
            out.append((jax.lax.psum(v, "data"), g))
        return out

    sharded = jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 6,
                                    out_specs=[(P(), P("data"))] * len(MODES)))
    got = sharded(*(b[k] for k in keys))
    full = _split_run(b, "ppo", SPLITS[1])
    for mode, (v, g) in zip(MODES, got):
        np.testing.assert_allclose(v, full[mode][0], rtol=1e-5, err_msg=mode)
        np.testing.assert_allclose(g, full[mode][1], rtol=1e-5, atol=1e-8, err_msg=mode)


def test_batch_statistics_under_shard_map_equal_the_full_batch():
    """grpo's batch std and reinforce_pp's whitening psum over the mesh axis: sharded = full batch."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    r = f32(np.random.default_rng(17).integers(0, 3, 16))
    b = rl_batch(18)
    tok_r = sequence_to_token_rewards(b["rewards"], b["mask"])
    want = jcall(lambda r, t, m: (grpo(r, group_size=4, scale="batch"), reinforce_pp(t, m, gamma=0.9)[0]),
                 r, tok_r, b["mask"])

    def per_device(r, tok_r, mask):
        a = grpo(r, group_size=4, scale="batch", axis_name="data")
        adv, _ = reinforce_pp(tok_r, mask, gamma=0.9, axis_name="data")
        return a, adv

    f = jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=(P("data"), P("data"))))
    a, adv = f(r, tok_r, b["mask"])
    np.testing.assert_allclose(a, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, want[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# jit, finite differences, masks, dtypes


def test_jit_equals_eager():
    b = rl_batch(19)
    for name in ("ppo",):  # (eager mode compiles op by op: one loss is enough here, the rest runs under jit)
        hyper = POLICY_CASES[name]
        adv = b["adv_B"] if name in SEQUENCE_FORM else b["adv_BT"]
        f = lambda lp: get_policy_loss(name)(lp, b["old"], adv, b["mask"], **hyper)
        eager, jitted = f(b["logp"]), jax.jit(f)(b["logp"])
        np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6, atol=1e-7, err_msg=name)
        for k in eager[1]:
            np.testing.assert_allclose(jitted[1][k], eager[1][k], rtol=1e-6, atol=1e-6, err_msg=f"{name} {k}")
    g = lambda tr, v: gae(tr, b["mask"], values_BT=v, gamma=0.99, lam=0.9)
    for x, y in zip(jax.jit(g)(b["returns"], b["values"]), g(b["returns"], b["values"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_gradients_match_finite_differences_float32():
    """Every policy loss (one check per loss, as separate outputs of one function) and the value loss, at a point
    away from the clip boundaries (ratios within +-5% of 1; the GSPO bounds are widened to contain them).
    GSPO-token's gradient is by design not the derivative of its value when advantages vary within a sequence (each
    token gets -A_t sg(s) grad logp_t): with one advantage per sequence the two agree, so GSPO gets those. CISPO's
    and VESPO's are by design not the derivative of their values either (a detached weight times logp: the
    REINFORCE form), so they are left out here; their gradients are checked by hand and against TRL."""
    b = rl_batch(20)
    logp = b["old"] + 0.03 * jnp.tanh(b["logp"] - b["old"]) * b["mask"]
    values = jnp.where(b["mask"] > 0, b["values"], 0.0)

    def f(lp, v):
        out = []
        for name in POLICY_CASES:
            if name in DETACHED_WEIGHT:
                continue
            hyper = dict(POLICY_CASES[name], **({"eps_low": 0.2, "eps_high": 0.3} if "gspo" in name
                                                or name == "luspo" else {}))
            adv = b["adv_B"] if name in SEQUENCE_FORM else b["adv_BT"]
            out.append(aggregate_loss(get_policy_loss(name)(lp, b["old"], adv, b["mask"], **hyper)[0], b["mask"],
                                      mode="token_mean", denominator=21.0))
        out.append(aggregate_loss(value_loss(v, b["old_values"], b["returns"], b["mask"], clip_eps=5.0)[0],
                                  b["mask"], mode="token_mean", denominator=21.0))
        return jnp.stack(out)

    check_grads(jax.jit(f), (logp, values), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def test_masked_equals_sliced_and_gradients_finite_under_garbage():
    """Padding columns holding inf / -inf / huge values change neither the loss nor the gradient of the real tokens
    (every policy loss, every mode), and give zero (finite) gradients themselves."""
    b = rl_batch(22)
    pad = lambda x, v: jnp.concatenate([x, jnp.full((x.shape[0], 3), v, x.dtype)], axis=1)

    def obj(lp, old, adv_BT, m, name, mode):
        adv = b["adv_B"] if name == "gspo_seq" else adv_BT
        return aggregate_loss(get_policy_loss(name)(lp, old, adv, m, **POLICY_CASES[name])[0], m, mode=mode,
                              denominator=loss_denominator(m, mode=mode, max_length=MAX_LEN))

    run = jit(lambda *args: {(name, mode): jax.value_and_grad(obj)(*args, name, mode)
                             for name in POLICY_CASES for mode in MODES})
    plain = run(b["logp"], b["old"], b["adv_BT"], b["mask"])
    padded = run(pad(b["logp"], 1e30), pad(b["old"], -jnp.inf), pad(b["adv_BT"], 1e30), pad(b["mask"], 0.0))
    for key in plain:
        (v0, g0), (v1, g1) = plain[key], padded[key]
        np.testing.assert_allclose(v1, v0, rtol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(g1[:, :-3], g0, rtol=1e-6, atol=1e-9, err_msg=str(key))
        np.testing.assert_array_equal(g1[:, -3:], 0.0)


def test_metrics_carry_no_gradient_and_sum_over_micro_batches():
    b = rl_batch(23)

    def metrics(name, lp, lo=0, hi=8):
        adv = b["adv_B"] if name in SEQUENCE_FORM else b["adv_BT"]
        return get_policy_loss(name)(lp[lo:hi], b["old"][lo:hi], adv[lo:hi], b["mask"][lo:hi],
                                     **POLICY_CASES[name])[1]

    def run(lp):
        total = lambda x: sum(s + n for name in POLICY_CASES for s, n in metrics(name, x).values())
        return jax.grad(total)(lp), {name: (metrics(name, lp), [metrics(name, lp, lo, hi)
                                                                for lo, hi in SPLITS["uneven"]])
                                     for name in POLICY_CASES}

    g, out = jcall(run, b["logp"])
    np.testing.assert_array_equal(g, 0.0)
    for name, (full, parts) in out.items():
        summed = jax.tree.map(lambda *xs: sum(xs), *parts)
        for k in full:
            np.testing.assert_allclose(summed[k], full[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


def test_bfloat16_inputs_compute_in_float32():
    b = rl_batch(24)
    bf = {k: v.astype(jnp.bfloat16) for k, v in b.items()}
    up = {k: v.astype(jnp.float32) for k, v in bf.items()}
    ppo = lambda d: ppo_clip(d["logp"], d["old"], d["adv_BT"], d["mask"])
    (loss, metrics), loss32 = jcall(lambda d, u: (ppo(d), ppo(u)[0]), bf, up)
    assert loss.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s, _ in metrics.values())
    np.testing.assert_allclose(loss, loss32, rtol=1e-6)
    outs = jax.eval_shape(lambda d: (grpo(d["rewards"], group_size=4), gae(d["returns"], d["mask"],
                                                                          values_BT=d["values"]),
                                     reinforce_pp(d["returns"], d["mask"]), k3(d["logp"], d["ref"]),
                                     value_loss(d["values"], d["old_values"], d["returns"], d["mask"])[0],
                                     gspo(d["logp"], d["old"], d["adv_B"], d["mask"])[0]), bf)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(outs))


# ----------------------------------------------------------------------------------------------------------------------
# registries and argument checks


def test_registries_and_unknown_names():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "gae"}
    assert SEQUENCE_LEVEL_ESTIMATORS | TOKEN_LEVEL_ESTIMATORS == set(ADVANTAGE_ESTIMATORS)
    assert not SEQUENCE_LEVEL_ESTIMATORS & TOKEN_LEVEL_ESTIMATORS
    assert set(POLICY_LOSSES) == {"ppo", "gspo", "gspo_seq", "luspo", "rloo_seq", "reinforce", "cispo", "sapo",
                                  "vespo"}
    assert set(LOSS_AGGREGATIONS) == set(MODES)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    for get, table in ((get_advantage_estimator, ADVANTAGE_ESTIMATORS), (get_policy_loss, POLICY_LOSSES),
                       (get_loss_aggregation, LOSS_AGGREGATIONS), (get_kl_estimator, KL_ESTIMATORS)):
        for name, f in table.items():
            assert get(name) is f
        with pytest.raises(ValueError, match="choose one of") as e:
            get("no_such_thing")
        assert all(name in str(e.value) for name in table)
    # uniform calls
    b = rl_batch(25)

    def calls(d):
        tok_r = sequence_to_token_rewards(d["rewards"], d["mask"])
        return ([get_advantage_estimator(n)(d["rewards"], group_size=4, mask_B=None)
                 for n in sorted(SEQUENCE_LEVEL_ESTIMATORS)],
                get_advantage_estimator("reinforce_pp")(tok_r, d["mask"]),
                get_advantage_estimator("gae")(tok_r, d["mask"], values_BT=d["values"]),
                [get_policy_loss(n)(d["logp"], d["old"], d["adv_B"], d["mask"])[0] for n in sorted(POLICY_LOSSES)],
                [get_kl_estimator(n)(d["logp"], d["ref"], d["mask"]) for n in sorted(KL_ESTIMATORS)])

    seq, rpp, g, pol, kls = jax.eval_shape(calls, b)
    assert all(x.shape == (8,) for x in seq)
    assert all(x.shape == (8, 6) for x in (*rpp, *g, *pol, *kls))


def test_bad_arguments_are_reported():
    r = f32(TWO_GROUPS)
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo(r, group_size=3)
    with pytest.raises(ValueError, match="scale"):
        grpo(r, group_size=4, scale="global")
    with pytest.raises(ValueError, match="group_size"):
        rloo(r, group_size=0)
    logp, old, adv, m = _ppo_case()
    with pytest.raises(ValueError, match="eps_low"):
        ppo_clip(logp, old, adv, m, eps_low=1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip(logp, old, adv, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="eps_high"):
        gspo(logp, old, adv, m, eps_high=-0.1)
    with pytest.raises(ValueError, match="max_length"):
        loss_denominator(m, mode="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(logp, old, old, m, clip_eps=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        aggregate_loss(logp, m, mode="token_mean", denominator=-1.0)
