"""Every loss jaxpost names after a TRL loss type, against TRL 1.16's own code on identical inputs.

`tests/trl_reference.py` runs TRL's trainer methods (`DPOTrainer._compute_loss`, `GRPOTrainer._compute_loss`) on given
per-token log-probs; here jaxpost's pure losses get the same log-probs (summed over each completion's tokens by the
caller, as the objectives do) and must give the same loss and the same gradient with respect to every per-token
log-prob. The newer variants (f-divergences, LD-DPO, WPO, CPO, ORPO, CISPO, SAPO, VESPO, ...) have their own files
(test_preference_variants.py, test_rl_variants.py); this file covers the loss types the earlier tests only checked
against TRL's formulas written out, and the one documented difference (TRL 1.16 ignores label_smoothing for sigmoid).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import DPO_LOSSES, aggregate_loss, loss_denominator, ppo_clip

pytest.importorskip("trl")
from tests.trl_reference import trl_dpo_loss, trl_grpo_loss  # noqa: E402

B, T = 6, 5
LENGTHS_C, LENGTHS_R = [5, 3, 4, 2, 5, 1], [4, 5, 2, 3, 1, 5]


def _mask(lengths):
    return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)


def _pairs(seed):
    rng = np.random.default_rng(seed)
    mc, mr = _mask(LENGTHS_C), _mask(LENGTHS_R)
    pc, pr = -rng.uniform(0.1, 2.0, (B, T)) * mc, -rng.uniform(0.1, 2.0, (B, T)) * mr
    # reference log-probs spread so that h takes both signs and several magnitudes
    rc = pc + rng.normal(0, 0.8, (B, T)) * mc
    rr = pr + rng.normal(0, 0.8, (B, T)) * mr
    return pc, pr, rc, rr, mc, mr


def _jaxpost_dpo(name, pc, pr, rc, rr, mc, mr, **kw):
    """(loss, d loss / d per-token chosen, ... rejected): the batch mean of the per-pair loss (TRL's reduction)."""
    fn = DPO_LOSSES[name]

    def loss(pc, pr):
        sums = lambda x, m: jnp.sum(x * m, axis=-1)
        out, _ = fn(sums(pc, mc), sums(pr, mr), sums(rc, mc), sums(rr, mr), chosen_tokens_B=jnp.sum(mc, -1),
                    rejected_tokens_B=jnp.sum(mr, -1), **kw)
        return jnp.mean(out)

    with jax.enable_x64():
        value, (gc, gr) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    return float(value), np.asarray(gc), np.asarray(gr)


# (TRL loss_type, TRL options, jaxpost options)
CASES = [
    ("sigmoid", {}, {}),
    ("hinge", {}, {}),
    ("ipo", {}, {}),
    ("sigmoid_norm", {}, {}),
    ("exo_pair", {"label_smoothing": 1e-3}, {"label_smoothing": 1e-3}),
    ("nca_pair", {}, {}),
    ("robust", {"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    ("bco_pair", {}, {}),
    ("sppo_hard", {}, {}),
    ("aot", {}, {}),
    ("aot_unpaired", {}, {}),
    ("apo_zero", {}, {}),
    ("apo_down", {}, {}),
    ("discopop", {"discopop_tau": 0.05}, {"tau": 0.05}),
]


@pytest.mark.parametrize("name,trl_kw,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_every_trl_dpo_loss_type_matches_trl_in_value_and_gradient(name, trl_kw, kw, beta):
    pc, pr, rc, rr, mc, mr = _pairs(hash(name) % 1000)
    want = trl_dpo_loss(pc, pr, rc, rr, mc, mr, loss_type=(name,), beta=beta, **trl_kw)
    value, gc, gr = _jaxpost_dpo(name, pc, pr, rc, rr, mc, mr, beta=beta, **kw)
    # (TRL builds exo_pair's epsilon as a float32 tensor: its log(1 - eps) and log(eps) carry float32 rounding)
    rtol = 1e-7 if name == "exo_pair" else 1e-10
    np.testing.assert_allclose(value, want["loss"], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(gc, want["grad_chosen"], rtol=100 * rtol, atol=1e-12)
    np.testing.assert_allclose(gr, want["grad_rejected"], rtol=100 * rtol, atol=1e-12)


def test_the_sft_term_with_trl_batch_token_mean_matches_trl():
    # TRL's "sft" loss type is -mean of the chosen per-token log-probs over the batch's chosen tokens; jaxpost's
    # sft_weight term reproduces it with sft_denominator = chosen tokens / pairs (its default, each sequence's token
    # mean, differs: checked below)
    pc, pr, rc, rr, mc, mr = _pairs(7)
    want = trl_dpo_loss(pc, pr, rc, rr, mc, mr, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.7), beta=0.2)
    value, gc, gr = _jaxpost_dpo("sigmoid", pc, pr, rc, rr, mc, mr, beta=0.2, sft_weight=0.7,
                                 sft_denominator=mc.sum() / B)
    np.testing.assert_allclose(value, want["loss"], rtol=1e-10)
    np.testing.assert_allclose(gc, want["grad_chosen"], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gr, want["grad_rejected"], rtol=1e-8, atol=1e-12)
    per_sequence, _, _ = _jaxpost_dpo("sigmoid", pc, pr, rc, rr, mc, mr, beta=0.2, sft_weight=0.7)
    assert abs(per_sequence - want["loss"]) > 1e-3  # the documented difference of the default


def test_trl_ignores_label_smoothing_for_sigmoid_and_jaxpost_makes_it_cdpo():
    pc, pr, rc, rr, mc, mr = _pairs(11)
    trl_0 = trl_dpo_loss(pc, pr, rc, rr, mc, mr, loss_type=("sigmoid",), beta=0.3)["loss"]
    trl_02 = trl_dpo_loss(pc, pr, rc, rr, mc, mr, loss_type=("sigmoid",), beta=0.3, label_smoothing=0.2)["loss"]
    assert trl_02 == trl_0  # TRL 1.16: label_smoothing has no effect on "sigmoid"
    ours_0, _, _ = _jaxpost_dpo("sigmoid", pc, pr, rc, rr, mc, mr, beta=0.3)
    ours_02, _, _ = _jaxpost_dpo("sigmoid", pc, pr, rc, rr, mc, mr, beta=0.3, label_smoothing=0.2)
    np.testing.assert_allclose(ours_0, trl_0, rtol=1e-10)
    h = (pc * mc - rc * mc).sum(-1) - (pr * mr - rr * mr).sum(-1)
    z = 0.3 * h
    log_sig = lambda x: -np.logaddexp(0.0, -x)
    cdpo = np.mean(-0.8 * log_sig(z) - 0.2 * log_sig(-z))  # Mitchell 2023's conservative DPO
    np.testing.assert_allclose(ours_02, cdpo, rtol=1e-10)
    assert abs(ours_02 - trl_0) > 1e-3


# ---------------------------------------------------------------------------------------------------- GRPO family


def _rl_inputs(seed):
    rng = np.random.default_rng(seed)
    m = _mask([5, 3, 4, 2, 5, 1])
    old = -rng.uniform(0.2, 2.0, (B, T)) * m
    logp = old + rng.normal(0, 0.3, (B, T)) * m  # ratios well outside 1 +- 0.2: clipping happens
    adv = rng.normal(0, 1, B)
    return logp, old, adv, m


# TRL loss_type -> the jaxpost aggregation with the same normaliser (one process, one micro-batch)
AGGREGATIONS = [("dapo", "token_mean"), ("bnpo", "token_mean"), ("grpo", "seq_mean_token_mean"),
                ("dr_grpo", "seq_mean_token_sum_norm")]


@pytest.mark.parametrize("trl_type,mode", AGGREGATIONS)
def test_ppo_clip_with_each_aggregation_matches_trl_loss_types(trl_type, mode):
    logp, old, adv, m = _rl_inputs(3)
    want = trl_grpo_loss(logp, old, adv, m, loss_type=trl_type, epsilon=0.2, epsilon_high=0.28,
                         max_completion_length=T)

    def loss(lp):
        l_BT, metrics = ppo_clip(lp, old, adv, m, eps_low=0.2, eps_high=0.28)
        return aggregate_loss(l_BT, m, mode=mode, denominator=loss_denominator(m, mode=mode, max_length=T)), metrics

    with jax.enable_x64():
        (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp))
    assert float(metrics["clip_frac"][0]) > 0  # the clip is exercised
    np.testing.assert_allclose(float(value), want["loss"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), want["grad"], rtol=1e-8, atol=1e-12)
