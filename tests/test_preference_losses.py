"""Preference losses: hand-derived values, TRL's formulas written out independently in numpy, gradients against finite
differences, jit, micro-batch and device splits, the KTO baseline across micro-batches, registries and metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from jaxpost.losses import (
    BATCH_LEVEL_DPO_LOSSES,
    DPO_LOSSES,
    REFERENCE_FREE_LOSSES,
    REWARD_LOSSES,
    UNPAIRED_LOSSES,
    apo_zero_unpaired,
    bco_update_delta,
    bradley_terry,
    dpo_aot,
    dpo_aot_unpaired,
    dpo_ipo,
    dpo_robust,
    dpo_exo_pair,
    dpo_sigmoid,
    get_dpo_loss,
    get_reference_free_loss,
    get_reward_loss,
    get_unpaired_loss,
    kto,
    kto_kl_baseline,
    kto_kl_sums,
    orpo,
    simpo,
)

LOG2 = math.log(2.0)
LOG3 = math.log(3.0)

# TRL 1.x DPOConfig.loss_type values (docs and dpo_config.py), less "sft", which is the sft_weight argument here.
TRL_DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]

# Non-default hyperparameters, so that every knob is exercised.
HYPER = {
    "sigmoid": dict(beta=0.3, label_smoothing=0.1),
    "robust": dict(beta=0.3, label_smoothing=0.2),
    "exo_pair": dict(beta=0.3, label_smoothing=1e-2),
    "bco_pair": dict(beta=0.3, delta=0.15),
    "discopop": dict(beta=0.3, tau=0.05),
    "aot": dict(beta=0.3, label_smoothing=0.1),
    "aot_unpaired": dict(beta=0.3, label_smoothing=0.1),
    "aot_pair": dict(beta=0.3, label_smoothing=0.1),
}


def hyper(name):
    return HYPER.get(name, dict(beta=0.3))


def pair_batch(seed: int, B: int = 8, dtype=np.float32) -> dict:
    """Summed log-probs of plausible pairs: per-token means in [-2, -0.3], reference within a few nats."""
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(2, 30, B), rng.integers(2, 30, B)
    pc, pr = -nc * rng.uniform(0.3, 2.0, B), -nr * rng.uniform(0.3, 2.0, B)
    rc, rr = pc + rng.normal(0, 2.0, B), pr + rng.normal(0, 2.0, B)
    arr = lambda x: np.asarray(x, dtype)
    return dict(pc=arr(pc), pr=arr(pr), rc=arr(rc), rr=arr(rr), nc=nc.astype(np.int32), nr=nr.astype(np.int32))


def call_dpo(name, b, **kw):
    f = get_dpo_loss(name)
    return f(jnp.asarray(b["pc"]), jnp.asarray(b["pr"]), jnp.asarray(b["rc"]), jnp.asarray(b["rr"]),
             chosen_tokens_B=jnp.asarray(b["nc"]), rejected_tokens_B=jnp.asarray(b["nr"]), **{**hyper(name), **kw})


def pairs(s_c, s_r, *, base_c=-5.0, base_r=-7.0):
    """Arrays (pc, pr, rc, rr) with the given per-response log-ratios s = pi - ref, as float32 [B]."""
    s_c, s_r = np.atleast_1d(np.asarray(s_c, np.float64)), np.atleast_1d(np.asarray(s_r, np.float64))
    rc, rr = np.full_like(s_c, base_c), np.full_like(s_r, base_r)
    return tuple(jnp.asarray(x, jnp.float32) for x in (rc + s_c, rr + s_r, rc, rr))


# ----------------------------------------------------------------------------------------------------------------------
# TRL's formulas, written out in numpy from TRL's DPOTrainer (1.x `_compute_loss`, 0.x `dpo_loss`), CPOTrainer,
# ORPOTrainer, KTOTrainer and RewardTrainer. Deliberately in TRL's own variable names and order of operations.


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def trl_dpo_losses(loss_type, pc, pr, rc, rr, nc, nr, *, beta, label_smoothing=0.0, discopop_tau=0.05, delta=0.0):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    nc, nr = np.asarray(nc, np.float64), np.asarray(nr, np.float64)
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    logits = (pc - pr) - (rc - rr)  # TRL 0.x: pi_logratios - ref_logratios; TRL 1.x: delta_score
    ls = label_smoothing
    if loss_type == "sigmoid":  # TRL 0.x (cDPO label smoothing); TRL 1.x is the ls = 0 case
        return -_logsigmoid(beta * logits) * (1 - ls) - _logsigmoid(-beta * logits) * ls
    if loss_type == "robust":
        return (-_logsigmoid(beta * logits) * (1 - ls) + _logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * logits)
    if loss_type == "ipo":  # TRL 0.x: concatenated_forward averages every log-prob over its tokens for ipo
        a_pc, a_pr, a_rc, a_rr = pc / nc, pr / nr, rc / nc, rr / nr
        avg_logits = (a_pc - a_pr) - (a_rc - a_rr)
        return (avg_logits - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = ls if ls > 0 else 1e-3
        return (_sigmoid(beta * logits) * (_logsigmoid(beta * logits) - math.log(1 - eps))
                + _sigmoid(-beta * logits) * (_logsigmoid(-beta * logits) - math.log(eps)))
    if loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = chosen_logratios * beta, rejected_logratios * beta
        return (-_logsigmoid(chosen_rewards) - 0.5 * _logsigmoid(-chosen_rewards)
                - 0.5 * _logsigmoid(-rejected_rewards))
    if loss_type == "bco_pair":  # delta = TRL 0.x's running mean (0 in TRL 1.x)
        return (-_logsigmoid(beta * chosen_logratios - delta)
                - _logsigmoid(-(beta * rejected_logratios - delta)))
    if loss_type == "sppo_hard":
        a, b = chosen_logratios, rejected_logratios
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        return -_logsigmoid(beta * d) * (1 - ls) - _logsigmoid(-beta * d) * ls
    if loss_type in ("aot_unpaired", "aot_pair"):
        d = np.sort(chosen_logratios) - np.sort(rejected_logratios)
        return -_logsigmoid(beta * d) * (1 - ls) - _logsigmoid(-beta * d) * ls
    if loss_type == "apo_zero":
        return (1 - _sigmoid(beta * chosen_logratios)) + _sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return _sigmoid(beta * chosen_logratios) + (1 - _sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        lg = logits * beta
        mod = _sigmoid(lg / discopop_tau)
        return -_logsigmoid(lg) * (1 - mod) + np.exp(-lg) * mod
    if loss_type == "sigmoid_norm":  # TRL 1.x: scores divided by completion_mask.sum().clamp(min=1)
        d = chosen_logratios / np.maximum(nc, 1.0) - rejected_logratios / np.maximum(nr, 1.0)
        return -_logsigmoid(beta * d)
    raise KeyError(loss_type)


def _trl_kwargs(name):
    h = dict(hyper(name))
    if "tau" in h:
        h["discopop_tau"] = h.pop("tau")
    return h


@pytest.mark.parametrize("name", TRL_DPO_LOSS_TYPES + ["aot_pair"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_equals_trl_formula(name, seed):
    b = pair_batch(seed)
    loss_B, metrics = call_dpo(name, b)
    expected = trl_dpo_losses(name, b["pc"], b["pr"], b["rc"], b["rr"], b["nc"], b["nr"], **_trl_kwargs(name))
    np.testing.assert_allclose(np.asarray(loss_B), expected, rtol=2e-5, atol=2e-5)
    # TRL 1.x: chosen_rewards = beta * chosen_logratios etc., on the summed log-probs, for every loss type
    beta = hyper(name)["beta"]
    cr, rr = beta * (b["pc"] - b["rc"]), beta * (b["pr"] - b["rr"])
    np.testing.assert_allclose(metrics["chosen_rewards"], cr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rejected_rewards"], rr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["margins"], cr - rr, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(metrics["accuracies"], (cr > rr).astype(np.float32))
    np.testing.assert_array_equal(metrics["chosen_logps"], b["pc"])


def test_trl_1x_sigmoid_is_the_unsmoothed_case_and_exo_defaults_to_1e3():
    b = pair_batch(3)
    loss_B, _ = call_dpo("sigmoid", b, label_smoothing=0.0)
    np.testing.assert_allclose(loss_B, trl_dpo_losses("sigmoid", **_np(b), beta=0.3), rtol=2e-5)
    f = lambda **kw: dpo_exo_pair(*(jnp.asarray(b[k]) for k in ("pc", "pr", "rc", "rr")), beta=0.3, **kw)[0]
    np.testing.assert_allclose(f(), trl_dpo_losses("exo_pair", **_np(b), beta=0.3, label_smoothing=0.0), rtol=2e-5)


def _np(b):
    return dict(pc=b["pc"], pr=b["pr"], rc=b["rc"], rr=b["rr"], nc=b["nc"], nr=b["nr"])


class TRLRunningMoments:
    """TRL's RunningMoments (trl/trainer/utils.py), single process: mean 0, var 1, count 1e-24."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs = np.atleast_1d(np.asarray(xs, np.float64))
        xs_count, xs_mean, xs_var = xs.size, xs.mean(), xs.var()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        self.mean += delta * xs_count / tot_count
        self.var = (old_sum + new_sum) / tot_count
        self.count = tot_count


def test_bco_pair_with_running_mean_delta_equals_trl_0x_over_steps():
    beta, running = 0.2, TRLRunningMoments()
    delta, count = jnp.zeros(()), jnp.zeros(())
    for step in range(4):
        b = pair_batch(10 + step)
        # TRL 0.x: rewards = cat(beta * chosen_logratios, beta * rejected_logratios).mean(); update; delta = mean
        rewards = np.concatenate([beta * (b["pc"] - b["rc"]), beta * (b["pr"] - b["rr"])]).astype(np.float64).mean()
        running.update(rewards)
        expected = trl_dpo_losses("bco_pair", **_np(b), beta=beta, delta=running.mean)
        # here: the step updates delta from the batch's reward metrics, then calls the loss with it
        _, m = call_dpo("bco_pair", b, beta=beta, delta=delta)
        delta, count = bco_update_delta(delta, count, jnp.mean((m["chosen_rewards"] + m["rejected_rewards"]) / 2))
        np.testing.assert_allclose(float(delta), running.mean, rtol=1e-5, atol=1e-6)
        loss_B, _ = call_dpo("bco_pair", b, beta=beta, delta=delta)
        np.testing.assert_allclose(loss_B, expected, rtol=2e-5, atol=2e-5)
    assert float(count) == 4.0


def trl_cpo_simpo_loss(pc, pr, nc, nr, *, beta, simpo_gamma, label_smoothing, cpo_alpha):
    """CPOTrainer: averaged log-probs (average_log_prob for simpo), logits - gamma / beta, plus cpo_alpha * NLL,
    the NLL being cross-entropy over all chosen tokens of the batch (a token mean)."""
    chosen, rejected = pc / nc, pr / nr
    logits = chosen - rejected
    logits = logits - simpo_gamma / beta
    losses = -_logsigmoid(beta * logits) * (1 - label_smoothing) - _logsigmoid(-beta * logits) * label_smoothing
    policy_nll_loss = -pc.sum() / nc.sum()
    return losses.mean() + cpo_alpha * policy_nll_loss, beta * chosen, beta * rejected


def trl_orpo_loss(pc, pr, nc, nr, *, beta):
    """ORPOTrainer: average_log_prob=True, odds_ratio_loss, loss = policy_nll_loss - losses.mean()."""
    chosen, rejected = pc / nc, pr / nr
    log_odds = (chosen - rejected) - (np.log1p(-np.exp(chosen)) - np.log1p(-np.exp(rejected)))
    ratio = _logsigmoid(log_odds)
    losses = beta * ratio
    policy_nll_loss = -pc.sum() / nc.sum()
    return policy_nll_loss - losses.mean(), beta * chosen, ratio.mean(), log_odds.mean()


@pytest.mark.parametrize("ls,alpha", [(0.0, 0.0), (0.1, 1.0)])
def test_simpo_equals_trl_cpo_formula(ls, alpha):
    b = {k: np.asarray(v, np.float64) for k, v in pair_batch(4).items()}
    B = len(b["pc"])
    expected, cr, rr = trl_cpo_simpo_loss(b["pc"], b["pr"], b["nc"], b["nr"], beta=2.0, simpo_gamma=0.8,
                                          label_smoothing=ls, cpo_alpha=alpha)
    loss_B, m = simpo(jnp.asarray(b["pc"], jnp.float32), jnp.asarray(b["pr"], jnp.float32),
                      chosen_tokens_B=b["nc"], rejected_tokens_B=b["nr"], beta=2.0, gamma=0.8, label_smoothing=ls,
                      sft_weight=alpha, sft_denominator=b["nc"].sum() / B)
    np.testing.assert_allclose(float(jnp.mean(loss_B)), expected, rtol=1e-5)
    np.testing.assert_allclose(m["chosen_rewards"], cr, rtol=1e-5)
    np.testing.assert_allclose(m["rejected_rewards"], rr, rtol=1e-5)


def test_orpo_equals_trl_formula_with_batch_token_mean_nll():
    b = {k: np.asarray(v, np.float64) for k, v in pair_batch(5).items()}
    B = len(b["pc"])
    expected, cr, ratio, log_odds = trl_orpo_loss(b["pc"], b["pr"], b["nc"], b["nr"], beta=0.25)
    loss_B, m = orpo(jnp.asarray(b["pc"], jnp.float32), jnp.asarray(b["pr"], jnp.float32), chosen_tokens_B=b["nc"],
                     rejected_tokens_B=b["nr"], beta=0.25, sft_denominator=b["nc"].sum() / B)
    np.testing.assert_allclose(float(jnp.mean(loss_B)), expected, rtol=1e-5)
    np.testing.assert_allclose(m["chosen_rewards"], cr, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.mean(m["log_odds_ratio"])), ratio, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.mean(m["log_odds_chosen"])), log_odds, rtol=1e-4)
    # default: the paper's per-sequence token mean
    loss_B, m = orpo(jnp.asarray(b["pc"], jnp.float32), jnp.asarray(b["pr"], jnp.float32), chosen_tokens_B=b["nc"],
                     rejected_tokens_B=b["nr"], beta=0.25)
    np.testing.assert_allclose(m["nll"], -b["pc"] / b["nc"], rtol=1e-5)
    np.testing.assert_allclose(loss_B, -b["pc"] / b["nc"] - 0.25 * m["log_odds_ratio"], rtol=1e-5)


def trl_kto_loss(logps, ref_logps, labels, kl_logps, ref_kl_logps, *, beta, desirable_weight, undesirable_weight,
                 loss_type="kto"):
    """KTOTrainer.kto_loss: kl = (KL_logps - ref_KL_logps).mean().detach().clamp(min=0) (one process), chosen and
    rejected losses concatenated, loss = losses.nanmean()."""
    kl = max(float(np.mean(kl_logps - ref_kl_logps)), 0.0)
    chosen_logratios = logps[labels] - ref_logps[labels]
    rejected_logratios = logps[~labels] - ref_logps[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - _sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - _sigmoid(beta * (kl - rejected_logratios))
    else:  # apo_zero_unpaired
        chosen_losses = 1 - _sigmoid(beta * chosen_logratios)
        rejected_losses = _sigmoid(beta * rejected_logratios)
    losses = np.concatenate([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return losses.mean(), beta * chosen_logratios, beta * rejected_logratios, kl


def kto_batch(seed, B=8, kl_shift=0.5):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(5, 40, B)
    ref = logps + rng.normal(0, 3, B)
    kl_ref = -rng.uniform(5, 40, B)
    kl_logps = kl_ref + rng.normal(kl_shift, 1.0, B)
    labels = rng.random(B) < 0.6
    labels[:2] = [True, False]
    return logps, ref, labels, kl_logps, kl_ref


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [0.5, -2.0])  # -2: the KL estimate is negative and clamped to 0
def test_kto_equals_trl_formula(loss_type, kl_shift):
    logps, ref, labels, kl_logps, kl_ref = kto_batch(6, kl_shift=kl_shift)
    expected, cr, rr, kl = trl_kto_loss(logps, ref, labels, kl_logps, kl_ref, beta=0.2, desirable_weight=1.3,
                                        undesirable_weight=0.7, loss_type=loss_type)
    z0 = kto_kl_baseline(*kto_kl_sums(jnp.asarray(kl_logps, jnp.float32), jnp.asarray(kl_ref, jnp.float32)))
    np.testing.assert_allclose(float(z0), kl, atol=2e-5)
    loss_B, m = get_unpaired_loss(loss_type)(jnp.asarray(logps, jnp.float32), jnp.asarray(ref, jnp.float32),
                                             jnp.asarray(labels), kl=z0, beta=0.2, desirable_weight=1.3,
                                             undesirable_weight=0.7)
    np.testing.assert_allclose(float(jnp.mean(loss_B)), expected, rtol=1e-5)
    d = np.asarray(m["desirable"]) > 0
    np.testing.assert_array_equal(d, labels)
    np.testing.assert_allclose(np.asarray(m["chosen_rewards"])[d], cr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m["rejected_rewards"])[~d], rr, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["chosen_rewards"])[~d], 0.0)


def trl_reward_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """RewardTrainer.compute_loss."""
    if margin is not None:
        loss = -_logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    else:
        loss = -_logsigmoid(rewards_chosen - rewards_rejected).mean()
    if center_rewards_coefficient is not None:
        loss += center_rewards_coefficient * np.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_equals_trl_reward_trainer(use_margin, center):
    rng = np.random.default_rng(7)
    rc, rr, margin = rng.normal(1, 2, 16), rng.normal(0, 2, 16), rng.uniform(0, 2, 16)
    expected = trl_reward_loss(rc, rr, margin if use_margin else None, center)
    loss_B, m = get_reward_loss("bradley_terry")(jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32),
                                                 margin_B=jnp.asarray(margin) if use_margin else None,
                                                 center_rewards_coefficient=center)
    np.testing.assert_allclose(float(jnp.mean(loss_B)), expected, rtol=1e-5)
    np.testing.assert_allclose(m["margins"], rc - rr, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m["accuracies"], (rc > rr).astype(np.float32))
    assert ("center_penalty" in m) == (center is not None)


# ----------------------------------------------------------------------------------------------------------------------
# hand-derived values


ZERO_MARGIN = {  # policy == reference, beta = 0.3
    "sigmoid": LOG2, "robust": LOG2, "aot": LOG2, "aot_unpaired": LOG2, "aot_pair": LOG2, "sigmoid_norm": LOG2,
    "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0,
    "ipo": 1.0 / (4 * 0.3 ** 2), "sppo_hard": 1.0 / (2 * 0.3 ** 2),
    "nca_pair": 2 * LOG2,
    # bco_pair (delta = 0.15): -log sigma(-delta) - log sigma(delta) = log(1 + e^delta) + log(1 + e^-delta)
    "bco_pair": math.log1p(math.exp(0.15)) + math.log1p(math.exp(-0.15)),
    "exo_pair": -LOG2 - 0.5 * math.log(1e-2 * (1 - 1e-2)),
    "discopop": (LOG2 + 1.0) / 2,
}


@pytest.mark.parametrize("name", list(DPO_LOSSES))
def test_zero_margin_values(name):
    pc, pr, _, _ = _grad_point(jnp.float32)  # varied log-probs, pi == ref
    loss_B, m = get_dpo_loss(name)(pc, pr, pc, pr, chosen_tokens_B=TOKENS[0], rejected_tokens_B=TOKENS[1],
                                   **hyper(name))
    np.testing.assert_allclose(loss_B, ZERO_MARGIN[name], rtol=1e-6)
    np.testing.assert_array_equal(m["margins"], 0.0)
    np.testing.assert_array_equal(m["accuracies"], 0.0)  # a tie is not a correct ranking


def test_dpo_hand_values_away_from_zero():
    beta = 0.5
    z = LOG3 / beta  # beta * h = log 3, sigma = 3/4
    args = pairs(z / 2, -z / 2)
    np.testing.assert_allclose(dpo_sigmoid(*args, beta=beta)[0], math.log(4 / 3), rtol=1e-6)
    np.testing.assert_allclose(dpo_sigmoid(*args, beta=beta, label_smoothing=0.2)[0],
                               -0.8 * math.log(3 / 4) - 0.2 * math.log(1 / 4), rtol=1e-6)
    np.testing.assert_allclose(dpo_robust(*args, beta=beta, label_smoothing=0.25)[0],
                               (-0.75 * math.log(3 / 4) + 0.25 * math.log(1 / 4)) / 0.5, rtol=1e-6)
    eps = 1e-3
    np.testing.assert_allclose(dpo_exo_pair(*args, beta=beta)[0],
                               0.75 * (math.log(0.75) - math.log(1 - eps)) + 0.25 * (math.log(0.25) - math.log(eps)),
                               rtol=1e-6)
    # hinge: 1 - beta h at beta h = 0.25, 2 (past the margin), -1
    for bh, want in ((0.25, 0.75), (2.0, 0.0), (-1.0, 2.0)):
        np.testing.assert_allclose(get_dpo_loss("hinge")(*pairs(bh / beta, 0.0), beta=beta)[0], want, rtol=1e-6)
    # nca: beta s_c = log 3, beta s_r = -log 3
    np.testing.assert_allclose(get_dpo_loss("nca_pair")(*pairs(LOG3 / beta, -LOG3 / beta), beta=beta)[0],
                               1.5 * math.log(4 / 3) + LOG2, rtol=1e-6)
    # bco: beta s_c - delta = log 3 and beta s_r - delta = -log 3
    np.testing.assert_allclose(get_dpo_loss("bco_pair")(*pairs((LOG3 + 0.2) / beta, (0.2 - LOG3) / beta), beta=beta,
                                                        delta=0.2)[0], 2 * math.log(4 / 3), rtol=1e-5)
    # sppo_hard: the optimum s_c = 1/(2 beta), s_r = -1/(2 beta)
    np.testing.assert_allclose(get_dpo_loss("sppo_hard")(*pairs(1.0, -1.0), beta=beta)[0], 0.0, atol=1e-6)
    # apo: sigma(beta s_c) = 3/4, sigma(beta s_r) = 1/4, sigma(beta h) = 9/10
    args = pairs(LOG3 / beta, -LOG3 / beta)
    np.testing.assert_allclose(get_dpo_loss("apo_zero")(*args, beta=beta)[0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(get_dpo_loss("apo_down")(*args, beta=beta)[0], 0.75 + 0.1, rtol=1e-6)
    # discopop at x = tau log 3: m = 3/4
    tau = 0.05
    x = tau * LOG3
    np.testing.assert_allclose(get_dpo_loss("discopop")(*pairs(x / beta, 0.0), beta=beta, tau=tau)[0],
                               0.25 * math.log1p(math.exp(-x)) + 0.75 * math.exp(-x), rtol=1e-6)
    # discopop far out: ~0 for a large margin; for a very negative x, m ~ 0 and the loss is -log sigma(x) ~ -x
    # (no overflow from the exp(-x) term)
    np.testing.assert_allclose(get_dpo_loss("discopop")(*pairs(100.0, 0.0), beta=beta)[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(get_dpo_loss("discopop")(*pairs(-400.0, 0.0), beta=beta)[0], 200.0, rtol=1e-6)


def test_length_normalised_hand_values():
    # s_c = 3 over 2 tokens, s_r = -2 over 4 tokens: h' = 1.5 + 0.5 = 2
    args = pairs(3.0, -2.0)
    toks = dict(chosen_tokens_B=jnp.array([2]), rejected_tokens_B=jnp.array([4]))
    np.testing.assert_allclose(dpo_ipo(*args, beta=0.5, **toks)[0], (2.0 - 1.0) ** 2, rtol=1e-6)
    # the paper's literal form on summed log-probs: h = 5
    np.testing.assert_allclose(dpo_ipo(*args, beta=0.5, length_normalize=False)[0], (5.0 - 1.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(get_dpo_loss("sigmoid_norm")(*args, beta=LOG3 / 2, **toks)[0], math.log(4 / 3),
                               rtol=1e-6)
    # zero-token rows are clamped to one token (TRL clamp(min=1)), not divided by zero
    zero = dict(chosen_tokens_B=jnp.array([0]), rejected_tokens_B=jnp.array([0]))
    np.testing.assert_allclose(dpo_ipo(*args, beta=0.5, **zero)[0], (5.0 - 1.0) ** 2, rtol=1e-6)


def test_aot_sorts_quantiles_by_hand():
    beta = 0.5
    # pi_c - pi_r = [3, 1], ref_c - ref_r = [0, 2]: sorted [1, 3] - [0, 2] = [1, 1] although per example h = [3, -1]
    pc, pr = jnp.array([3.0, 1.0]), jnp.zeros(2)
    rc, rr = jnp.array([0.0, 2.0]), jnp.zeros(2)
    np.testing.assert_allclose(dpo_aot(pc, pr, rc, rr, beta=beta)[0], [math.log1p(math.exp(-0.5))] * 2, rtol=1e-6)
    np.testing.assert_allclose(dpo_sigmoid(pc, pr, rc, rr, beta=beta)[0],
                               [math.log1p(math.exp(-1.5)), math.log1p(math.exp(0.5))], rtol=1e-6)
    # unpaired: s_c = [3, -1], s_r = [0, 0]: sorted [-1, 3] - [0, 0]
    np.testing.assert_allclose(dpo_aot_unpaired(pc, pr, rc, rr, beta=beta)[0],
                               [math.log1p(math.exp(0.5)), math.log1p(math.exp(-1.5))], rtol=1e-6)


def test_reference_free_hand_values():
    toks = dict(chosen_tokens_B=jnp.array([4.0]), rejected_tokens_B=jnp.array([2.0]))
    # SimPO: equal per-token log-probs -> -log sigma(-gamma) = log(1 + e^gamma)
    loss, _ = simpo(jnp.array([-4.0]), jnp.array([-2.0]), beta=2.0, gamma=0.7, **toks)
    np.testing.assert_allclose(loss, math.log1p(math.exp(0.7)), rtol=1e-6)
    # beta (m_c - m_r) - gamma = log 3: m_c - m_r = (gamma + log 3) / beta
    gap = (0.7 + LOG3) / 2.0
    loss, m = simpo(jnp.array([4 * (-1.0 + gap)]), jnp.array([-2.0]), beta=2.0, gamma=0.7, **toks)
    np.testing.assert_allclose(loss, math.log(4 / 3), rtol=1e-5)
    np.testing.assert_allclose(m["chosen_rewards"], 2.0 * (-1.0 + gap), rtol=1e-6)
    # ORPO: p_c = 1/2 per token (odds 1), p_r = 1/5 (odds 1/4): log odds ratio = log 4, L_OR = log(5/4)
    toks = dict(chosen_tokens_B=jnp.array([3]), rejected_tokens_B=jnp.array([5]))
    loss, m = orpo(jnp.array([3 * math.log(0.5)]), jnp.array([5 * math.log(0.2)]), beta=0.4, **toks)
    np.testing.assert_allclose(m["log_odds_chosen"], math.log(4.0), rtol=1e-5)
    np.testing.assert_allclose(m["nll"], LOG2, rtol=1e-6)
    np.testing.assert_allclose(loss, LOG2 + 0.4 * math.log(5 / 4), rtol=1e-5)
    # equal per-token probabilities: L_OR = log 2
    loss, _ = orpo(jnp.array([3 * math.log(0.3)]), jnp.array([5 * math.log(0.3)]), beta=1.0, **toks)
    np.testing.assert_allclose(loss, -math.log(0.3) + LOG2, rtol=1e-5)


def test_kto_and_reward_hand_values():
    beta, kl = 0.5, 0.4
    # r = z0 gives w / 2; r - z0 = log 3 / beta gives 1/4 (desirable) and 3/4 (undesirable)
    ref = jnp.array([-10.0, -10.0, -10.0, -10.0])
    logps = ref + jnp.array([kl, kl, kl + LOG3 / beta, kl + LOG3 / beta])
    desirable = jnp.array([True, False, True, False])
    loss, m = kto(logps, ref, desirable, kl=kl, beta=beta, desirable_weight=2.0, undesirable_weight=0.5)
    np.testing.assert_allclose(loss, [1.0, 0.25, 2.0 * 0.25, 0.5 * 0.75], rtol=1e-5)
    assert float(m["kl"]) == pytest.approx(kl)
    # a negative baseline is clamped to 0
    np.testing.assert_allclose(kto(ref, ref, desirable, kl=-3.0, beta=beta)[0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(apo_zero_unpaired(ref, ref, desirable, beta=beta, undesirable_weight=3.0)[0],
                               [0.5, 1.5, 0.5, 1.5], rtol=1e-6)
    # Bradley-Terry
    rc = jnp.array([1.0, 2.0 + LOG3, 0.5])
    rr = jnp.array([1.0, 2.0, 0.5])
    loss, _ = bradley_terry(rc, rr)
    np.testing.assert_allclose(loss, [LOG2, math.log(4 / 3), LOG2], rtol=1e-6)
    loss, _ = bradley_terry(rc, rr, margin_B=jnp.array([0.0, LOG3, 0.0]))
    np.testing.assert_allclose(loss[1], LOG2, rtol=1e-6)
    loss, m = bradley_terry(rc, rr, center_rewards_coefficient=0.1)
    np.testing.assert_allclose(loss[0], LOG2 + 0.1 * 4.0, rtol=1e-6)
    np.testing.assert_allclose(m["center_penalty"], 0.1 * (rc + rr) ** 2, rtol=1e-6)


def test_hand_derived_gradients():
    beta, z8 = 0.3, jnp.zeros(8)
    # DPO: dL/dpi_c = -beta [(1 - eps) sigma(-beta h) - eps sigma(beta h)] = -dL/dpi_r; at h = 0, eps = 0: -beta / 2
    g = jax.grad(lambda pc: dpo_sigmoid(pc, z8, z8, z8, beta=beta)[0].sum())(z8)
    np.testing.assert_allclose(g, -beta / 2, rtol=1e-6)
    h_B = jnp.linspace(-3.0, 3.0, 8)
    g = jax.grad(lambda pr: dpo_sigmoid(h_B, pr, z8, z8, beta=beta, label_smoothing=0.1)[0].sum())(z8)
    s_B = 1 / (1 + np.exp(-beta * np.asarray(h_B)))
    np.testing.assert_allclose(g, beta * (1 - s_B) * 0.9 - beta * s_B * 0.1, rtol=1e-5)
    # Bradley-Terry: dL/dr_c = -(1 - sigma(r_c - r_r)) + 2 c (r_c + r_r)
    g = jax.grad(lambda rc: bradley_terry(rc, z8 - 0.2, center_rewards_coefficient=0.05)[0].sum())(h_B)
    np.testing.assert_allclose(g, -(1 - 1 / (1 + np.exp(-(np.asarray(h_B) + 0.2)))) + 0.1 * (np.asarray(h_B) - 0.2),
                               rtol=1e-5, atol=1e-7)
    # KTO at r = z0: d/dlogp = -w_D beta / 4 (desirable), +w_U beta / 4 (undesirable); none into the baseline
    desirable = jnp.arange(8) % 2 == 0
    grads = jax.grad(lambda lp, kl: kto(lp, z8, desirable, kl=kl, beta=beta, desirable_weight=2.0)[0].sum(),
                     argnums=(0, 1))(z8 + 0.5, 0.5)
    np.testing.assert_allclose(grads[0], np.where(desirable, -2.0 * beta / 4, beta / 4), rtol=1e-6)
    assert float(grads[1]) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# every pairwise loss behind one signature f(pc, pr, rc, rr, nc, nr) -> loss_B, for the generic tests below.
# (They run eagerly on few distinct shapes: op-by-op compilation is then shared by all losses, which keeps this file
# fast; jit is tested separately.)


def _all_pair_losses():
    out = {}
    for name in DPO_LOSSES:
        out[name] = lambda pc, pr, rc, rr, nc, nr, f=get_dpo_loss(name), h=hyper(name): f(
            pc, pr, rc, rr, chosen_tokens_B=nc, rejected_tokens_B=nr, sft_weight=0.3, **h)[0]
    for name, f in REFERENCE_FREE_LOSSES.items():
        out[name] = lambda pc, pr, rc, rr, nc, nr, f=f: f(pc, pr, chosen_tokens_B=nc, rejected_tokens_B=nr,
                                                          beta=0.7)[0]
    # rewards r_c, r_r taken from the first two arrays, the margin from the third
    out["bradley_terry"] = lambda pc, pr, rc, rr, nc, nr: bradley_terry(pc, pr, margin_B=rc,
                                                                        center_rewards_coefficient=0.01)[0]
    for name, f in UNPAIRED_LOSSES.items():  # the chosen half desirable, the rejected half undesirable
        out[name] = lambda pc, pr, rc, rr, nc, nr, f=f: f(
            jnp.concatenate([pc, pr]), jnp.concatenate([rc, rr]),
            jnp.concatenate([jnp.ones(pc.shape, bool), jnp.zeros(pr.shape, bool)]), kl=0.3, beta=0.4,
            undesirable_weight=1.5)[0]
    return out


PAIR_LOSSES = _all_pair_losses()
SPLITTABLE = [n for n in PAIR_LOSSES if n not in BATCH_LEVEL_DPO_LOSSES]
TOKENS = (jnp.array([3, 5, 7, 2, 11, 4, 6, 9]), jnp.array([4, 2, 9, 6, 3, 12, 5, 8]))


def _grad_point(dtype):
    # per-token means well below 0 (ORPO), distinct sorted values (AOT), hinge margins away from its kink
    pc = np.array([-4.1, -9.3, -12.2, -3.0, -15.5, -6.6, -8.8, -10.0])
    pr = np.array([-6.4, -5.1, -20.7, -7.9, -4.4, -19.2, -9.7, -13.1])
    rc = np.array([-5.0, -8.2, -13.9, -2.2, -17.0, -6.1, -7.3, -12.5])
    rr = np.array([-5.8, -6.6, -18.1, -9.0, -4.0, -16.9, -11.4, -12.0])
    return tuple(jnp.asarray(x, dtype) for x in (pc, pr, rc, rr))


def _on_logps(name):
    return lambda pc, pr, rc, rr: PAIR_LOSSES[name](pc, pr, rc, rr, *TOKENS)


# ----------------------------------------------------------------------------------------------------------------------
# gradients against finite differences; finiteness at extremes


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_gradients_match_finite_differences_float64(name):
    with jax.enable_x64(True):
        args = _grad_point(jnp.float64)
        assert _on_logps(name)(*args).dtype == jnp.float64
        check_grads(_on_logps(name), args, order=1, modes=("rev",))  # float64 tolerance 1e-5


@pytest.mark.parametrize("name", ["sigmoid", "orpo", "kto"])
def test_gradients_match_finite_differences_float32(name):
    check_grads(_on_logps(name), _grad_point(jnp.float32), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("scale", [0.0, 1e4])
def test_losses_and_gradients_finite_at_extremes(scale):
    # scale 0: padding rows (every log-prob 0); 1e4: huge margins of both signs (log-probs kept <= 0 for ORPO)
    s = jnp.array([1.0, -1.0] * 4) * scale
    pc, pr = jnp.minimum(-s, 0.0) - 1e-3 * scale, jnp.minimum(s, 0.0) - 1e-3 * scale
    rc, rr = jnp.minimum(s, 0.0), jnp.minimum(-s, 0.0)
    for name in PAIR_LOSSES:
        value, grads = jax.value_and_grad(lambda *a: jnp.sum(_on_logps(name)(*a)), argnums=(0, 1, 2, 3))(
            pc, pr, rc, rr)
        assert np.isfinite(float(value)), name
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), name


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_jit_equals_eager(name):
    args = _grad_point(jnp.float32)
    np.testing.assert_allclose(jax.jit(_on_logps(name))(*args), _on_logps(name)(*args), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# micro-batch and device splits


def test_per_example_losses_do_not_depend_on_the_rest_of_the_batch():
    """Every loss but the batch-level aot: computed on micro-batches of one example each, the losses are those of the
    same examples in the full batch (so sum(loss_B) / B_global over any split is the full-batch mean)."""
    args = _grad_point(jnp.float32) + TOKENS
    for name in SPLITTABLE:
        full = PAIR_LOSSES[name](*args)
        rows = [PAIR_LOSSES[name](*(a[i:i + 1] for a in args)) for i in range(8)]
        if name in UNPAIRED_LOSSES:  # laid out [chosen; rejected] within each call
            rows = [r[:1] for r in rows] + [r[1:] for r in rows]
        np.testing.assert_allclose(jnp.concatenate(rows), full, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["sigmoid+sft_token_mean", "ipo", "orpo", "bradley_terry"])
def test_loss_and_gradient_invariant_to_micro_batch_split(name):
    """Each micro-batch contributes sum(loss_B) / B_global and its gradient; over an uneven split they add up to the
    full-batch mean and gradient, including the SFT term with TRL's batch token-mean denominator (a global scalar,
    computed once)."""
    pc, pr, rc, rr = _grad_point(jnp.float32)
    nc, nr = TOKENS
    B = len(pc)
    sft_den = jnp.sum(nc) / B
    if name == "sigmoid+sft_token_mean":
        f = lambda pc, pr, rc, rr, nc, nr: dpo_sigmoid(pc, pr, rc, rr, sft_weight=0.5, sft_denominator=sft_den)[0]
    else:
        f = PAIR_LOSSES[name]

    def contribution(lo, hi):
        return jax.value_and_grad(lambda a, b: jnp.sum(f(a, b, rc[lo:hi], rr[lo:hi], nc[lo:hi], nr[lo:hi])) / B,
                                  argnums=(0, 1))(pc[lo:hi], pr[lo:hi])

    full, g_full = contribution(0, B)
    parts = [contribution(lo, hi) for lo, hi in ((0, 3), (3, B))]
    np.testing.assert_allclose(sum(float(v) for v, _ in parts), float(full), rtol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(np.concatenate([g[i] for _, g in parts]), g_full[i], rtol=1e-6, atol=1e-9)
    # the full-batch value is the plain mean of the per-example losses (TRL's reduction)
    np.testing.assert_allclose(float(full), float(jnp.mean(f(pc, pr, rc, rr, nc, nr))), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(BATCH_LEVEL_DPO_LOSSES))
def test_aot_is_batch_level_permutation_invariant_but_split_dependent(name):
    args, B = _grad_point(jnp.float32) + TOKENS, 8
    loss = lambda idx: PAIR_LOSSES[name](*(a[idx] for a in args))
    perm = np.random.default_rng(0).permutation(B)
    full = float(jnp.mean(loss(np.arange(B))))
    np.testing.assert_allclose(float(jnp.mean(loss(perm))), full, rtol=1e-6)
    # sorting sees the batch it is given: one example per micro-batch is per-example DPO, not the full-batch AOT
    singles = sum(float(loss(np.arange(i, i + 1))[0]) for i in range(B)) / B
    assert abs(singles - full) > 1e-3


def test_kto_baseline_computed_globally_makes_micro_batches_exact():
    """The KL baseline is a batch statistic. Computed once over the step's batch (sums and counts over every
    micro-batch), passed to every micro-batch as an input, the per-example losses sum to the full-batch loss.
    Recomputing it per micro-batch (what TRL does under gradient accumulation) is a different estimator."""
    logps, ref, labels, kl_logps, kl_ref = kto_batch(12)
    logps, ref, kl_logps, kl_ref = (jnp.asarray(x, jnp.float32) for x in (logps, ref, kl_logps, kl_ref))
    labels = jnp.asarray(labels)
    B, parts = 8, [(0, 3), (3, 8)]

    def micro(lo, hi, kl):
        return jax.value_and_grad(lambda lp: jnp.sum(kto(lp, ref[lo:hi], labels[lo:hi], kl=kl, beta=0.2)[0]) / B)(
            logps[lo:hi])

    sums = [kto_kl_sums(kl_logps[lo:hi], kl_ref[lo:hi]) for lo, hi in parts]
    z0 = kto_kl_baseline(sum(s for s, _ in sums), sum(c for _, c in sums))
    np.testing.assert_allclose(float(z0), max(float(jnp.mean(kl_logps - kl_ref)), 0.0), rtol=1e-6)
    full, g_full = micro(0, B, z0)
    pieces = [micro(lo, hi, z0) for lo, hi in parts]
    np.testing.assert_allclose(sum(float(v) for v, _ in pieces), float(full), rtol=1e-6)
    np.testing.assert_allclose(jnp.concatenate([g for _, g in pieces]), g_full, rtol=1e-6)
    # per-micro-batch baselines: a different (noisier) estimate, hence a different loss
    local = sum(float(micro(lo, hi, kto_kl_baseline(*s))[0]) for (lo, hi), s in zip(parts, sums))
    assert abs(local - float(full)) > 1e-5
    # the baseline carries no gradient back into the KL completions
    g_kl = jax.grad(lambda x: jnp.sum(kto(logps, ref, labels, kl=kto_kl_baseline(*kto_kl_sums(x, kl_ref)))[0]))(
        kl_logps)
    np.testing.assert_array_equal(g_kl, 0.0)


def test_kto_baseline_over_eight_devices_equals_single_device():
    """In a data-parallel step the baseline is psum(sum) / psum(count) across devices, then every device computes its
    examples' losses with it: identical to one device holding the whole batch."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    logps, ref, labels, kl_logps, kl_ref = kto_batch(13)
    logps, ref, kl_logps, kl_ref = (jnp.asarray(x, jnp.float32) for x in (logps, ref, kl_logps, kl_ref))
    labels = jnp.asarray(labels)

    def per_device(lp, rf, lab, klp, klr):
        s, c = kto_kl_sums(klp, klr)
        z0 = kto_kl_baseline(jax.lax.psum(s, "data"), jax.lax.psum(c, "data"))
        return kto(lp, rf, lab, kl=z0, beta=0.2)[0]

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P("data")))
    got = sharded(logps, ref, labels, kl_logps, kl_ref)
    want = kto(logps, ref, labels, kl=kto_kl_baseline(*kto_kl_sums(kl_logps, kl_ref)), beta=0.2)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid_norm", "orpo"])
def test_losses_sharded_over_eight_devices_equal_single_device(name):
    spec = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), P("data"))
    args = _grad_point(jnp.float32) + TOKENS
    f = jax.jit(jax.value_and_grad(lambda pc, pr, *rest: jnp.mean(PAIR_LOSSES[name](pc, pr, *rest)), argnums=(0, 1)))
    v1, g1 = f(*args)
    v8, g8 = f(*(jax.device_put(a, spec) for a in args))
    np.testing.assert_allclose(float(v8), float(v1), rtol=1e-6)
    for a, b in zip(g8, g1):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        assert a.sharding.is_equivalent_to(spec, 1)


# ----------------------------------------------------------------------------------------------------------------------
# the SFT term, metrics, dtypes, registries, argument checks


def test_sft_term_per_sequence_and_trl_batch_token_mean():
    b = {k: jnp.asarray(v) for k, v in pair_batch(15).items()}
    base, _ = call_dpo("sigmoid", b)
    loss, m = call_dpo("sigmoid", b, sft_weight=0.5)
    np.testing.assert_allclose(loss, base + 0.5 * (-b["pc"] / b["nc"]), rtol=1e-6)
    np.testing.assert_allclose(m["preference_loss"], base, rtol=1e-6)
    np.testing.assert_allclose(m["sft_loss"], -b["pc"] / b["nc"], rtol=1e-6)
    # TRL's "sft" loss type: cross-entropy over all chosen tokens of the batch, weighted, added to the mean
    B = len(b["pc"])
    loss, _ = call_dpo("sigmoid", b, sft_weight=0.5, sft_denominator=jnp.sum(b["nc"]) / B)
    np.testing.assert_allclose(float(jnp.mean(loss)),
                               float(jnp.mean(base)) + 0.5 * float(-jnp.sum(b["pc"]) / jnp.sum(b["nc"])), rtol=1e-6)
    # the weight may be traced (a schedule)
    loss_t = jax.jit(lambda w: call_dpo("sigmoid", b, sft_weight=w)[0])(0.5)
    np.testing.assert_allclose(loss_t, base + 0.5 * (-b["pc"] / b["nc"]), rtol=1e-6)


def _metrics_of(name, pc, pr, rc, rr):
    nc, nr = TOKENS
    if name in DPO_LOSSES:
        return get_dpo_loss(name)(pc, pr, rc, rr, chosen_tokens_B=nc, rejected_tokens_B=nr, sft_weight=0.3,
                                  **hyper(name))[1]
    if name in REFERENCE_FREE_LOSSES:
        return REFERENCE_FREE_LOSSES[name](pc, pr, chosen_tokens_B=nc, rejected_tokens_B=nr)[1]
    if name in UNPAIRED_LOSSES:
        return UNPAIRED_LOSSES[name](pc, rc, jnp.arange(8) % 2 == 0, kl=0.1)[1]
    return bradley_terry(pc, pr, center_rewards_coefficient=0.1)[1]


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_metrics_carry_no_gradient(name):
    args = _grad_point(jnp.float32)
    total = lambda *a: sum(jnp.sum(v) for v in _metrics_of(name, *a).values())
    for g in jax.grad(total, argnums=(0, 1, 2, 3))(*args):
        np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_inputs_compute_in_float32():
    args16 = tuple(a.astype(jnp.bfloat16) for a in _grad_point(jnp.float32))
    for name in PAIR_LOSSES:
        out = _on_logps(name)(*args16)
        assert out.dtype == jnp.float32, name
        np.testing.assert_allclose(out, _on_logps(name)(*(a.astype(jnp.float32) for a in args16)), rtol=1e-6,
                                   err_msg=name)


def test_registries_cover_trl_names_and_report_unknown_ones():
    assert set(TRL_DPO_LOSS_TYPES) | {"aot_pair"} == set(DPO_LOSSES)
    assert DPO_LOSSES["aot_pair"] is DPO_LOSSES["aot_unpaired"]
    assert set(REFERENCE_FREE_LOSSES) == {"simpo", "alphapo", "cpo", "cpo_hinge", "cpo_ipo", "orpo"}
    assert set(UNPAIRED_LOSSES) == {"kto", "apo_zero_unpaired"}
    assert set(REWARD_LOSSES) == {"bradley_terry"}
    for get, table in ((get_dpo_loss, DPO_LOSSES), (get_reference_free_loss, REFERENCE_FREE_LOSSES),
                       (get_unpaired_loss, UNPAIRED_LOSSES), (get_reward_loss, REWARD_LOSSES)):
        for name, f in table.items():
            assert get(name) is f
        with pytest.raises(ValueError, match="choose one of"):
            get("no_such_loss")
    # every DPO loss accepts the uniform call a step makes (token counts and SFT arguments included)
    b = {k: jnp.asarray(v) for k, v in pair_batch(16).items()}
    for name in DPO_LOSSES:
        loss_B, metrics = get_dpo_loss(name)(b["pc"], b["pr"], b["rc"], b["rr"], chosen_tokens_B=b["nc"],
                                             rejected_tokens_B=b["nr"], beta=0.1, sft_weight=0.0,
                                             sft_denominator=None)
        assert loss_B.shape == (8,) and {"chosen_rewards", "rejected_rewards", "margins", "accuracies"} <= set(metrics)


def test_bad_arguments_are_reported():
    args = pairs([1.0], [0.0])
    with pytest.raises(ValueError, match="chosen_tokens_B"):
        dpo_ipo(*args)
    with pytest.raises(ValueError, match="chosen_tokens_B"):
        get_dpo_loss("sigmoid_norm")(*args)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_robust(*args, label_smoothing=0.5)
    with pytest.raises(ValueError, match="epsilon"):
        dpo_exo_pair(*args, label_smoothing=0.0)
    with pytest.raises(ValueError, match="sft_denominator"):
        dpo_sigmoid(*args, sft_weight=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid(*args, label_smoothing=0.7)
