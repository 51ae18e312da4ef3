"""The preference-loss variants: f-DPO divergences, LD-DPO, WPO, MPO loss lists, CPO / SimPO / AlphaPO without a
reference, ORPO's NLL over prompt + completion, and the `Preference` objective and `DPOConfig` around them.

1. Against TRL 1.16's own code (tests/trl_reference.py runs ``DPOTrainer._compute_loss``, ``CPOTrainer.cpo_loss``,
   ``ORPOTrainer.get_batch_loss_metrics`` on numpy inputs): the loss and its gradient with respect to the per-token
   policy log-probs (or the logits, for ORPO), in float64 (jaxpost keeps float64 under ``jax.enable_x64``; TRL's
   alpha-divergence and ORPO's odds ratio run in float32 in TRL itself, compared at float32 tolerance), on ragged
   pairs (chosen longer, rejected longer, equal lengths). Skipped when trl is not importable.
2. Hand-derived values (worked in the comments): ``ld_sequence_logps``, ``f_divergence_scores``, ``alpha_reward``,
   ``wpo_weights``, ``token_log_sum_sq_probs`` (chunked) against the naive formula.
3. The ``Preference`` objective on a tiny model: its step's loss and gradient equal a direct computation from the
   model's logits with the pure functions; grad_accum and an 8-device mesh change nothing; a precomputed
   length-desensitised reference equals the held one.
4. ``DPOConfig`` / ``Preference`` argument errors.

Known differences from TRL, by design (tested as the documented relation): TRL 1.16's ``sigmoid`` ignores
``label_smoothing`` (jaxpost's is cDPO); TRL's ``"sft"`` term (and ORPO's NLL) is one token mean over the batch's
chosen tokens, jaxpost's objective takes each sequence's token mean (``sft_denominator`` gives TRL's).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.batch import ROW_KEYS, split_microbatches
from jaxpost.losses import (
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    REFERENCE_FREE_LOSSES,
    alpha_reward,
    f_divergence_scores,
    get_dpo_loss,
    ld_sequence_logps,
    orpo,
    wpo_weights,
)
from jaxpost.ops import token_log_sum_sq_probs
from jaxpost.ops.logprobs import _num_chunks
from jaxpost.recipes.dpo import DPOConfig
from jaxpost.train.dpo import Preference, make_reference_logps
from jaxpost.train.state import TrainState, abstract_train_state, state_shardings
from jaxpost.train.step import make_step, step_fn
from tests.helpers import (
    cached_lm,
    max_abs_diff,
    mesh_of,
    single_device_mesh,
    tiny_config,
    trl_reference,
)

LOG2 = math.log(2.0)


_trl = trl_reference


def f64(x):
    return jnp.asarray(np.asarray(x, np.float64), jnp.float64)


# ----------------------------------------------------------------------------------------------------------------------
# 1. against TRL 1.16's own code

# Completion lengths: chosen longer (6 vs 3), rejected longer (2 vs 5), equal (4 vs 4), chosen longer (3 vs 1).
NC, NR = np.array([6, 2, 4, 3]), np.array([3, 5, 4, 1])
GARBAGE = -7.0  # on masked positions: neither side may read it


def dpo_data(seed: int = 0) -> dict:
    """Per-token log-probs of 4 ragged pairs (chosen [4, 6], rejected [4, 5], right-padded), a reference within
    ~0.3 nats per token, and WPO's log sum_v p_v^2 per token (in [-2, -0.5])."""
    rng = np.random.default_rng(seed)
    B, Tc, Tr = len(NC), 6, 5
    mc = (np.arange(Tc)[None, :] < NC[:, None]).astype(np.float64)
    mr = (np.arange(Tr)[None, :] < NR[:, None]).astype(np.float64)
    pc, pr = -rng.uniform(0.1, 2.0, (B, Tc)), -rng.uniform(0.1, 2.0, (B, Tr))
    rc, rr = pc + rng.normal(0, 0.3, (B, Tc)), pr + rng.normal(0, 0.3, (B, Tr))
    lc, lr = -rng.uniform(0.5, 2.0, (B, Tc)), -rng.uniform(0.5, 2.0, (B, Tr))
    g = lambda x, m: np.where(m > 0, x, GARBAGE)
    return dict(pc=g(pc, mc), pr=g(pr, mr), rc=g(rc, mc), rr=g(rr, mr), mc=mc, mr=mr, lc=g(lc, mc), lr=g(lr, mr))


def trl_dpo(d: dict, **kw) -> dict:
    return _trl().trl_dpo_loss(d["pc"], d["pr"], d["rc"], d["rr"], d["mc"].astype(np.int64),
                               d["mr"].astype(np.int64), **kw)


def ours_dpo(d: dict, terms, *, ld_alpha=None, use_weighting=False, sft="batch"):
    """jaxpost's batch-mean loss of `terms` [(name, weight, kwargs)] on the per-token arrays, in float64, with its
    gradient w.r.t. the per-token policy log-probs. Sequence log-probs are masked sums (or `ld_sequence_logps`, of
    the policy and of the reference alike); "sft" is the NLL of the chosen response with TRL's batch token mean
    (`sft="batch"`: sft_denominator = total chosen tokens / B) or each sequence's token mean (`sft="sequence"`), always
    on the plain (not length-desensitised) chosen log-probs. Returns (loss, grad_chosen, grad_rejected, metrics of
    the first preference term as batch means)."""
    with jax.enable_x64(True):
        pc, pr, rc, rr, mc, mr, lc, lr = (f64(d[k]) for k in ("pc", "pr", "rc", "rr", "mc", "mr", "lc", "lr"))
        nc, nr = jnp.sum(mc, -1), jnp.sum(mr, -1)
        B = pc.shape[0]

        def f(pc, pr):
            plain_c = jnp.sum(jnp.where(mc > 0, pc, 0.0), -1)
            if ld_alpha is None:
                c, r = plain_c, jnp.sum(jnp.where(mr > 0, pr, 0.0), -1)
                ref_c, ref_r = jnp.sum(jnp.where(mc > 0, rc, 0.0), -1), jnp.sum(jnp.where(mr > 0, rr, 0.0), -1)
            else:
                c, r = ld_sequence_logps(pc, mc, pr, mr, ld_alpha=ld_alpha)
                ref_c, ref_r = ld_sequence_logps(rc, mc, rr, mr, ld_alpha=ld_alpha)
            w_B = wpo_weights(pc, lc, mc) * wpo_weights(pr, lr, mr) if use_weighting else 1.0
            total, metrics = 0.0, None
            for name, weight, kw in terms:
                if name == "sft":
                    den = jnp.sum(nc) / B if sft == "batch" else nc
                    total = total + weight * jnp.mean(-plain_c / den)
                    continue
                loss_B, m = get_dpo_loss(name)(c, r, ref_c, ref_r, chosen_tokens_B=nc, rejected_tokens_B=nr, **kw)
                assert loss_B.dtype == jnp.float64
                metrics = m if metrics is None else metrics
                total = total + weight * jnp.mean(loss_B * w_B)
            return total, metrics

        (v, m), (gc, gr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pc, pr)
        return float(v), np.asarray(gc), np.asarray(gr), {k: float(jnp.mean(x)) for k, x in m.items()}


def assert_equals_trl(ours, trl, what, *, rtol=1e-10, atol=1e-13, grad_rtol=None):
    v, gc, gr, m = ours
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    assert np.max(np.abs(trl["grad_chosen"])) > 0 and np.max(np.abs(trl["grad_rejected"])) > 0, what
    np.testing.assert_allclose(v, trl["loss"], rtol=rtol, atol=atol, err_msg=f"{what}: loss")
    scale_c, scale_r = np.max(np.abs(trl["grad_chosen"])), np.max(np.abs(trl["grad_rejected"]))
    np.testing.assert_allclose(gc, trl["grad_chosen"], rtol=grad_rtol, atol=atol * max(1.0, scale_c),
                               err_msg=f"{what}: gradient (chosen)")
    np.testing.assert_allclose(gr, trl["grad_rejected"], rtol=grad_rtol, atol=atol * max(1.0, scale_r),
                               err_msg=f"{what}: gradient (rejected)")
    if m is not None:  # TRL logs beta * log-ratio as rewards whatever the divergence, and the (LD) sequence logps
        tm = trl["metrics"]
        for ours_key, trl_key in (("chosen_rewards", "rewards/chosen"), ("rejected_rewards", "rewards/rejected"),
                                  ("margins", "rewards/margins"), ("accuracies", "rewards/accuracies"),
                                  ("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected")):
            np.testing.assert_allclose(m[ours_key], tm[trl_key], rtol=rtol, atol=rtol,  # O(1) values
                                       err_msg=f"{what}: metric {ours_key}")


# (name, jaxpost kwargs, TRL kwargs) of every loss that takes f_divergence
F_LOSSES = {
    "sigmoid": ({}, {}),
    "hinge": ({}, {}),
    "ipo": ({}, {}),
    "sigmoid_norm": ({}, {}),
    "robust": ({"label_smoothing": 0.1}, {"label_smoothing": 0.1}),
    "exo_pair": ({"label_smoothing": 1e-3}, {"label_smoothing": 1e-3}),
    "discopop": ({"tau": 0.05}, {"discopop_tau": 0.05}),
}
DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]
BETA = 0.5


def test_f_divergence_loss_set_is_trls():
    assert set(F_LOSSES) == set(F_DIVERGENCE_LOSSES)
    assert set(F_DIVERGENCES) == {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}


@pytest.mark.parametrize("divergence,f_alpha", DIVERGENCES)
@pytest.mark.parametrize("name", list(F_LOSSES))
def test_f_divergence_losses_equal_trl(name, divergence, f_alpha):
    d = dpo_data(1)
    if divergence == "alpha_divergence":
        # TRL computes it in float32 (its clamp table has no float64 entry): give jaxpost (float64) the float32
        # values TRL sees, so that only TRL's float32 arithmetic remains, and compare at float32 tolerance
        d = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in d.items()}
    ours_kw, trl_kw = F_LOSSES[name]
    ours = ours_dpo(d, [(name, 1.0, dict(beta=BETA, f_divergence=divergence, f_alpha=f_alpha, **ours_kw))])
    trl = trl_dpo(d, loss_type=name, beta=BETA, f_divergence_type=divergence, f_alpha_divergence_coef=f_alpha,
                  **trl_kw)
    # the divergence matters: the loss differs from plain DPO's
    plain = ours_dpo(d, [(name, 1.0, dict(beta=BETA, **ours_kw))])[0]
    assert abs(plain - ours[0]) > 1e-4 * abs(plain)
    if divergence == "alpha_divergence":
        # the log-ratios s = sum(logp) - ref (sums of ~6 nats, s ~ 0.1) lose ~1e-6 relative in float32, which
        # discopop's sigma(x / 0.05) amplifies to ~1e-5 relative in the gradient (a float32 replica of TRL's formula
        # deviates from the float64 one by as much): float32 tolerance for the gradient
        assert_equals_trl(ours, trl, f"{name}/{divergence}", rtol=2e-6, atol=1e-8, grad_rtol=3e-5)
    elif name == "exo_pair":
        # TRL's exo_pair builds epsilon as a float32 tensor, so log(eps) and log(1 - eps) are float32 constants
        # (test_trl_exo_pair_uses_float32_epsilon_constants pins that relation exactly): float32-constant tolerance
        assert_equals_trl(ours, trl, f"{name}/{divergence}", rtol=1e-7, atol=1e-13)
    else:
        assert_equals_trl(ours, trl, f"{name}/{divergence}")


def test_trl_exo_pair_uses_float32_epsilon_constants():
    """TRL 1.16's exo_pair computes log(1 - eps) and log(eps) of `torch.tensor(label_smoothing)`, a float32 tensor:
    its float64 loss differs from the exact one (jaxpost's) by exactly mean(q_w dc_w + q_l dc_l), dc the float64
    minus the float32 constants; ~1e-8 relative."""
    import torch

    d, eps = dpo_data(1), 1e-3
    trl = trl_dpo(d, loss_type="exo_pair", beta=BETA, label_smoothing=eps)
    ours = ours_dpo(d, [("exo_pair", 1.0, dict(beta=BETA, label_smoothing=eps))])[0]
    h = ((d["pc"] - d["rc"]) * d["mc"]).sum(1) - ((d["pr"] - d["rr"]) * d["mr"]).sum(1)
    qw, ql = 1.0 / (1.0 + np.exp(-BETA * h)), 1.0 / (1.0 + np.exp(BETA * h))
    e32 = torch.tensor(eps)
    assert e32.dtype == torch.float32
    dcw = math.log1p(-eps) - torch.log1p(-e32).item()
    dcl = math.log(eps) - torch.log(e32).item()
    assert abs(dcl) > 1e-8
    np.testing.assert_allclose(trl["loss"] - ours, np.mean(qw * dcw + ql * dcl), rtol=1e-5, atol=1e-15)
    assert abs(trl["loss"] - ours) > 1e-9


@pytest.mark.parametrize("ld_alpha", [0.5, 0.0])
def test_ld_dpo_equals_trl_policy_and_reference_desensitised(ld_alpha):
    d = dpo_data(2)
    trl = trl_dpo(d, loss_type="sigmoid", beta=BETA, ld_alpha=ld_alpha)
    # TRL's reference sequence log-probs are desensitised too: they equal ld_sequence_logps of the reference
    with jax.enable_x64(True):
        ref_c, ref_r = ld_sequence_logps(f64(d["rc"]), f64(d["mc"]), f64(d["rr"]), f64(d["mr"]), ld_alpha=ld_alpha)
    np.testing.assert_allclose(np.asarray(ref_c), trl["ref_chosen_logps"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ref_r), trl["ref_rejected_logps"], rtol=1e-12)
    assert_equals_trl(ours_dpo(d, [("sigmoid", 1.0, dict(beta=BETA))], ld_alpha=ld_alpha), trl, f"ld {ld_alpha}")
    # it is not plain DPO (the tails count less) ...
    assert abs(trl_dpo(d, loss_type="sigmoid", beta=BETA)["loss"] - trl["loss"]) > 1e-4
    # ... and the tail tokens' gradient is exactly ld_alpha times what plain DPO would give them: pair 0's chosen
    # has 6 tokens against 3 rejected, so its tokens 4..6 are the tail (ld_alpha = 0: no gradient at all)
    g = trl["grad_chosen"]
    np.testing.assert_allclose(g[0, 3:6], ld_alpha * g[0, 0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sigmoid", "ipo"])
def test_wpo_weighting_equals_trl(name):
    d = dpo_data(3)
    trl = trl_dpo(d, loss_type=name, beta=BETA, use_weighting=True, chosen_log_sum_sq_probs=d["lc"],
                  rejected_log_sum_sq_probs=d["lr"])
    assert_equals_trl(ours_dpo(d, [(name, 1.0, dict(beta=BETA))], use_weighting=True), trl, f"wpo {name}")
    assert abs(trl_dpo(d, loss_type=name, beta=BETA)["loss"] - trl["loss"]) > 1e-3  # the weights matter


MPO = [("sigmoid", 0.8, dict(beta=BETA)), ("bco_pair", 0.2, dict(beta=BETA)), ("sft", 1.0, {})]


def test_mpo_weighted_loss_list_equals_trl_with_batch_token_mean_sft():
    d = dpo_data(4)
    trl = trl_dpo(d, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=BETA)
    assert_equals_trl(ours_dpo(d, MPO, sft="batch"), trl, "mpo")

    # the same with the pure losses' own SFT argument: sigmoid's sft_weight 1.0 / 0.8 with TRL's denominator
    # (total chosen tokens / B), so 0.8 * (sigmoid + 1.25 NLL) + 0.2 * bco = TRL's sum
    with jax.enable_x64(True):
        args = [jnp.sum(f64(d[k]) * f64(d[m]), -1) for k, m in (("pc", "mc"), ("pr", "mr"), ("rc", "mc"),
                                                               ("rr", "mr"))]
        nc, nr = jnp.sum(f64(d["mc"]), -1), jnp.sum(f64(d["mr"]), -1)
        common = dict(chosen_tokens_B=nc, rejected_tokens_B=nr, beta=BETA)
        sig_B, _ = get_dpo_loss("sigmoid")(*args, sft_weight=1.0 / 0.8, sft_denominator=jnp.sum(nc) / 4, **common)
        bco_B, _ = get_dpo_loss("bco_pair")(*args, **common)
        np.testing.assert_allclose(float(0.8 * jnp.mean(sig_B) + 0.2 * jnp.mean(bco_B)), trl["loss"], rtol=1e-12)

    # the documented difference: jaxpost's objective takes each sequence's token mean; on ragged lengths it differs
    # from TRL's batch token mean by exactly w_sft * (mean_i(-pi_c,i / n_c,i) - (-sum_i pi_c,i / sum_i n_c,i))
    per_seq = ours_dpo(d, MPO, sft="sequence")[0]
    plain_c = (d["pc"] * d["mc"]).sum(1)
    gap = np.mean(-plain_c / NC) - (-plain_c.sum() / NC.sum())
    assert abs(gap) > 1e-3
    np.testing.assert_allclose(per_seq - trl["loss"], 1.0 * gap, rtol=1e-9)


def test_mpo_sft_term_uses_the_plain_chosen_logps_under_ld_alpha_in_trl():
    """TRL's "sft" term is the token mean of the raw per-token log-probs even with ld_alpha: only the preference
    terms see the length-desensitised sums."""
    d = dpo_data(5)
    trl = trl_dpo(d, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=BETA, ld_alpha=0.5)
    assert_equals_trl(ours_dpo(d, [("sigmoid", 1.0, dict(beta=BETA)), ("sft", 0.5, {})], ld_alpha=0.5), trl,
                      "mpo + ld")


# (jaxpost name, TRL loss_type, hyperparameters, kind of log-prob TRL is given: "sum" or "mean")
CPO_CASES = [
    ("cpo", "sigmoid", dict(beta=0.1, label_smoothing=0.1), "sum"),
    ("cpo", "sigmoid", dict(beta=0.1, alpha=0.25), "sum"),  # AlphaPO's shape on summed log-probs, as TRL
    ("cpo_hinge", "hinge", dict(beta=0.3), "sum"),
    ("cpo_ipo", "ipo", dict(beta=0.1), "mean"),
    ("simpo", "simpo", dict(beta=2.0, gamma=0.7, label_smoothing=0.1), "mean"),
    ("alphapo", "alphapo", dict(beta=2.0, gamma=0.7, alpha=0.25), "mean"),
]


@pytest.mark.parametrize("name,trl_type,hyper,kind", CPO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CPO_CASES)])
def test_reference_free_losses_equal_trl_cpo(name, trl_type, hyper, kind):
    d = dpo_data(6)
    with jax.enable_x64(True):
        mc, mr = f64(d["mc"]), f64(d["mr"])
        nc, nr = jnp.sum(mc, -1), jnp.sum(mr, -1)
        extra = {} if name in ("simpo", "alphapo") else {"sft_weight": 0.0}  # TRL's cpo_loss has no NLL term

        def f(pc, pr):
            loss_B, m = REFERENCE_FREE_LOSSES[name](jnp.sum(jnp.where(mc > 0, pc, 0.0), -1),
                                                    jnp.sum(jnp.where(mr > 0, pr, 0.0), -1), chosen_tokens_B=nc,
                                                    rejected_tokens_B=nr, **hyper, **extra)
            return jnp.mean(loss_B), (loss_B, m)

        (v, (loss_B, m)), (gc, gr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(f64(d["pc"]), f64(d["pr"]))
    sc, sr = (d["pc"] * d["mc"]).sum(1), (d["pr"] * d["mr"]).sum(1)
    xc, xr = (sc / NC, sr / NR) if kind == "mean" else (sc, sr)
    trl = _trl().trl_cpo_loss(xc, xr, loss_type=trl_type, beta=hyper["beta"],
                              label_smoothing=hyper.get("label_smoothing", 0.0),
                              simpo_gamma=hyper.get("gamma", 0.5), alpha=hyper.get("alpha", 0.0))
    np.testing.assert_allclose(np.asarray(loss_B), trl["losses"], rtol=1e-10, err_msg="per-example losses")
    np.testing.assert_allclose(v, trl["loss"], rtol=1e-10)
    # TRL's gradient w.r.t. its per-sequence input, carried to the tokens: d sum / d token = 1, d mean / d token = 1/n
    per_tok_c = (1.0 / NC if kind == "mean" else np.ones(4))[:, None] * d["mc"]
    per_tok_r = (1.0 / NR if kind == "mean" else np.ones(4))[:, None] * d["mr"]
    assert np.max(np.abs(trl["grad_chosen"])) > 0
    np.testing.assert_allclose(np.asarray(gc), trl["grad_chosen"][:, None] * per_tok_c, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(np.asarray(gr), trl["grad_rejected"][:, None] * per_tok_r, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(np.asarray(m["chosen_rewards"]), trl["chosen_rewards"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(m["rejected_rewards"]), trl["rejected_rewards"], rtol=1e-12)
    if trl_type == "hinge":  # both sides of the hinge are exercised
        assert 0 < np.sum(trl["losses"] > 0) < 4


def orpo_rows(seed: int = 7):
    """TRL's ORPO layout: rows [prompt, completion, right padding], logits (B, L, V) at i predicting token i + 1."""
    rng = np.random.default_rng(seed)
    B, V, Lc, Lr = 3, 7, 8, 7
    P = np.array([2, 3, 2])  # prompt lengths
    len_c, len_r = P + np.array([6, 2, 4]), P + np.array([3, 4, 5])  # completion lengths 6 / 3, 2 / 4, 4 / 5
    am_c = (np.arange(Lc)[None, :] < len_c[:, None]).astype(np.int64)
    am_r = (np.arange(Lr)[None, :] < len_r[:, None]).astype(np.int64)
    ids_c = np.where(am_c == 1, rng.integers(3, V, (B, Lc)), 0)
    ids_r = np.where(am_r == 1, rng.integers(3, V, (B, Lr)), 0)
    ids_r[:, :3] = ids_c[:, :3]  # a shared prompt
    return dict(P=P, am_c=am_c, am_r=am_r, ids_c=ids_c, ids_r=ids_r, lc=2.0 * rng.normal(size=(B, Lc, V)),
                lr=2.0 * rng.normal(size=(B, Lr, V)))


def test_orpo_with_nll_over_prompt_and_completion_equals_trl():
    o = orpo_rows()
    trl = _trl().trl_orpo_nll(o["lc"], o["lr"], o["ids_c"], o["ids_r"], o["am_c"], o["am_r"], o["P"], beta=0.1)
    B = 3
    with jax.enable_x64(True):
        def token_logps(logits, ids):  # (B, L - 1): log-prob of token j + 1 at position j
            lsm = jax.nn.log_softmax(logits, -1)
            return jnp.take_along_axis(lsm[:, :-1], f64(ids)[:, 1:, None].astype(jnp.int32), -1)[..., 0]

        def masks(am, L):
            seq = f64(am[:, 1:])  # every attended target: prompt (but its first token) + completion
            comp = seq * (np.arange(1, L)[None, :] >= o["P"][:, None])
            return seq, comp

        seq_c, comp_c = masks(o["am_c"], o["lc"].shape[1])
        _, comp_r = masks(o["am_r"], o["lr"].shape[1])

        def f(lc, lr):
            tc, tr = token_logps(lc, o["ids_c"]), token_logps(lr, o["ids_r"])
            nll_tokens = jnp.sum(seq_c, -1)
            loss_B, m = orpo(jnp.sum(tc * comp_c, -1), jnp.sum(tr * comp_r, -1), chosen_tokens_B=jnp.sum(comp_c, -1),
                             rejected_tokens_B=jnp.sum(comp_r, -1), beta=0.1,
                             nll_logps_B=jnp.sum(tc * seq_c, -1), nll_tokens_B=nll_tokens,
                             sft_denominator=jnp.sum(nll_tokens) / B)
            return jnp.mean(loss_B), m

        (v, m), (gc, gr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(f64(o["lc"]), f64(o["lr"]))
    # TRL casts the odds-ratio part to float32 (the NLL stays float64): float32 tolerance on that part
    np.testing.assert_allclose(v, trl["loss"], rtol=1e-7)
    np.testing.assert_allclose(float(np.mean(np.asarray(m["nll"]))), trl["nll_loss"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(m["chosen_logps"]), trl["chosen_logps"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(m["rejected_logps"]), trl["rejected_logps"], rtol=1e-12)
    for key in ("log_odds_ratio", "log_odds_chosen"):
        np.testing.assert_allclose(float(np.mean(np.asarray(m[key]))), trl["metrics"][key], rtol=1e-6)
    np.testing.assert_allclose(float(np.mean(np.asarray(m["chosen_rewards"]))), trl["metrics"]["rewards/chosen"],
                               rtol=1e-6)
    for ours, theirs in ((gc, trl["grad_chosen_logits"]), (gr, trl["grad_rejected_logits"])):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-8)
    # the NLL covers the prompt: the completion-only NLL (the paper's, orpo's default) is a different number
    lsm = o["lc"] - np.log(np.exp(o["lc"]).sum(-1, keepdims=True))
    tok = np.take_along_axis(lsm[:, :-1], o["ids_c"][:, 1:, None], -1)[..., 0]
    comp = np.asarray(comp_c)
    assert abs(-(tok * comp).sum() / comp.sum() - trl["nll_loss"]) > 1e-2


def test_sigmoid_label_smoothing_convention():
    """TRL 1.16's sigmoid ignores label_smoothing; jaxpost's label_smoothing is cDPO, its 0 is TRL's loss."""
    d = dpo_data(8)
    t0 = trl_dpo(d, loss_type="sigmoid", beta=BETA, label_smoothing=0.0)
    t2 = trl_dpo(d, loss_type="sigmoid", beta=BETA, label_smoothing=0.2)
    assert t2["loss"] == t0["loss"]
    np.testing.assert_array_equal(t2["grad_chosen"], t0["grad_chosen"])
    assert_equals_trl(ours_dpo(d, [("sigmoid", 1.0, dict(beta=BETA, label_smoothing=0.0))]), t0, "sigmoid eps=0")
    # cDPO by hand: h = (pi_c - ref_c) - (pi_r - ref_r), loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    h = ((d["pc"] - d["rc"]) * d["mc"]).sum(1) - ((d["pr"] - d["rr"]) * d["mr"]).sum(1)
    logsig = lambda x: -np.logaddexp(0.0, -x)
    cdpo = np.mean(-0.8 * logsig(BETA * h) - 0.2 * logsig(-BETA * h))
    ours2 = ours_dpo(d, [("sigmoid", 1.0, dict(beta=BETA, label_smoothing=0.2))])[0]
    np.testing.assert_allclose(ours2, cdpo, rtol=1e-12)
    assert abs(ours2 - t2["loss"]) > 1e-4  # so the difference from TRL is real, by design


# ----------------------------------------------------------------------------------------------------------------------
# 2. hand-derived values


def test_ld_sequence_logps_by_hand():
    # Pair 0: chosen 3 tokens (mask positions 1-3), rejected 5 tokens -> min 3: the chosen counts fully,
    #   -1 - 2 - 3 = -6; the rejected's first 3 (-0.5 - 1 - 1.5 = -3) fully, its tail (-2 - 2.5 = -4.5) times 0.5:
    #   -3 - 2.25 = -5.25.
    # Pair 1: chosen 5 tokens: first 3 -3, tail (-2 - 2) * 0.5 = -2 -> -5; rejected 3 tokens (positions 2-4): -12.
    # The -9 entries are masked positions (garbage): they must not count.
    mc = np.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], np.float32)
    lc = np.array([[-9, -1, -2, -3, -9, -9], [-1, -1, -1, -2, -2, -9]], np.float32)
    mr = np.array([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]], np.float32)
    lr = np.array([[-0.5, -1, -1.5, -2, -2.5, -9], [-9, -9, -4, -4, -4, -9]], np.float32)
    c, r = ld_sequence_logps(lc, mc, lr, mr, ld_alpha=0.5)
    np.testing.assert_allclose(c, [-6.0, -5.0], rtol=1e-6)
    np.testing.assert_allclose(r, [-5.25, -12.0], rtol=1e-6)
    # ld_alpha = 0 cuts the tails (-3, -3); ld_alpha = 1 gives the plain masked sums (-7.5, -7)
    c0, r0 = ld_sequence_logps(lc, mc, lr, mr, ld_alpha=0.0)
    np.testing.assert_allclose(c0, [-6.0, -3.0], rtol=1e-6)
    np.testing.assert_allclose(r0, [-3.0, -12.0], rtol=1e-6)
    c1, r1 = ld_sequence_logps(lc, mc, lr, mr, ld_alpha=1.0)
    np.testing.assert_allclose(c1, (lc * mc).sum(1), rtol=1e-6)
    np.testing.assert_allclose(r1, (lr * mr).sum(1), rtol=1e-6)
    # the gradient of the chosen sum is each token's weight: 1 on the shared part, ld_alpha on the tail, 0 off-mask
    g = jax.grad(lambda x: jnp.sum(ld_sequence_logps(x, mc, lr, mr, ld_alpha=0.5)[0]))(jnp.asarray(lc))
    np.testing.assert_array_equal(g, [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0.5, 0.5, 0]])
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\]"):
        ld_sequence_logps(lc, mc, lr, mr, ld_alpha=1.5)


def test_f_divergence_scores_by_hand():
    s0 = jnp.zeros(1)
    # s = 0 (pi = ref): every score is 0; js: log 2 + log sigma(0) = log 2 + log(1/2) = 0
    for name, a in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)):
        np.testing.assert_allclose(f_divergence_scores(s0, name, a), [0.0], atol=1e-7, err_msg=name)
    s1 = jnp.ones(1)
    # s = 1: reverse_kl 1; forward_kl 1 - e^-1 = 0.6321205588; js log 2 + log sigma(1) = log(2e / (e + 1))
    # = 0.3798854930; alpha 0.5: (e^-0.5 - 1) / (-0.5) = 2 (1 - e^-0.5) = 0.7869386806; alpha 1: s itself
    expected = {("reverse_kl", 0.5): 1.0, ("forward_kl", 0.5): 0.6321205588, ("js_divergence", 0.5): 0.3798854930,
                ("alpha_divergence", 0.5): 0.7869386806, ("alpha_divergence", 1.0): 1.0}
    for (name, a), want in expected.items():
        np.testing.assert_allclose(f_divergence_scores(s1, name, a), [want], rtol=1e-6, err_msg=f"{name} {a}")
    # the alpha-divergence clamps (alpha - 1) s at 80 (TRL's float32 clamp): s = -200, alpha 0.3 -> 140 -> 80,
    # score (e^80 - 1) / (-0.7), finite in float32
    big = f_divergence_scores(jnp.array([-200.0]), "alpha_divergence", 0.3)
    assert np.isfinite(big).all()
    np.testing.assert_allclose(big, [math.expm1(80.0) / -0.7], rtol=1e-5)
    with pytest.raises(ValueError, match="f_divergence must be one of"):
        f_divergence_scores(s1, "kl")


def test_alpha_reward_by_hand():
    # m = -2, alpha 0.5: p = e^-2, p^-0.5 = e, r = (1 - e) / 0.5 = -3.4365636569
    np.testing.assert_allclose(alpha_reward(jnp.array([-2.0]), 0.5), [2.0 * (1.0 - math.e)], rtol=1e-6)
    # alpha = 0 is SimPO's mean log-prob itself; a tiny alpha tends to it (r = m - alpha m^2 / 2 + ...)
    m = jnp.array([-2.0, -0.3])
    np.testing.assert_array_equal(alpha_reward(m, 0.0), m)
    np.testing.assert_allclose(alpha_reward(m, 1e-4), m, rtol=2e-4)
    # alpha -0.25, m = -2: p^0.25 = e^-0.5, r = (1 - e^-0.5) / -0.25 = -1.5738773611
    np.testing.assert_allclose(alpha_reward(jnp.array([-2.0]), -0.25), [-4.0 * (1.0 - math.exp(-0.5))], rtol=1e-6)


def test_wpo_weights_by_hand_and_without_gradient():
    # row 0: two tokens, logp - log sum p^2 = (-1 + 0.5, -2 + 1) = (-0.5, -1), mean -0.75 -> e^-0.75 = 0.4723665527
    #        (the masked third position is garbage);
    # row 1: no token -> mean 0 -> 1;
    # row 2: (-0.2 + 0.1, -0.3 + 0.1, -0.4 + 0.1) -> mean -0.2 -> e^-0.2 = 0.8187307531
    logp = jnp.array([[-1.0, -2.0, -50.0], [-3.0, -3.0, -3.0], [-0.2, -0.3, -0.4]])
    lss = jnp.array([[-0.5, -1.0, 7.0], [-1.0, -1.0, -1.0], [-0.1, -0.1, -0.1]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], jnp.float32)
    np.testing.assert_allclose(wpo_weights(logp, lss, mask), [0.4723665527, 1.0, 0.8187307531], rtol=1e-6)
    g = jax.grad(lambda x, y: jnp.sum(wpo_weights(x, y, mask)), argnums=(0, 1))(logp, lss)
    for gi in g:
        np.testing.assert_array_equal(gi, 0.0)


def test_token_log_sum_sq_probs_chunked_equals_naive_and_carries_no_gradient():
    rng = np.random.default_rng(9)
    B, T, D, V = 2, 8, 4, 16
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(2.0 * rng.normal(size=(D, V)), jnp.float32)
    budget = 1024  # 16 bytes per vocabulary entry of a token -> 4 tokens per chunk -> 4 chunks
    assert _num_chunks(B, T, V, budget) == 4

    def naive(h, w, temperature):
        p = jax.nn.softmax(jnp.einsum("btd,dv->btv", h, w) / temperature, -1)
        return jnp.log(jnp.sum(p ** 2, -1))

    for temperature in (1.0, 0.7):
        want = naive(h, w, temperature)
        got = token_log_sum_sq_probs(h, w, temperature=temperature, chunk_budget_bytes=budget)
        assert got.shape == (B, T) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(token_log_sum_sq_probs(h, w.T, temperature=temperature, vocab_major=True,
                                                          chunk_budget_bytes=budget), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(token_log_sum_sq_probs(h, w, temperature=temperature), want, rtol=1e-5,
                                   atol=1e-6)  # one chunk
    # log sum p^2 lies in [-log V, 0]
    got = np.asarray(token_log_sum_sq_probs(h, w, chunk_budget_bytes=budget))
    assert (got <= 1e-6).all() and (got >= -math.log(V) - 1e-5).all()
    gh, gw = jax.grad(lambda h, w: jnp.sum(token_log_sum_sq_probs(h, w, chunk_budget_bytes=budget)),
                      argnums=(0, 1))(h, w)
    np.testing.assert_array_equal(gh, 0.0)
    np.testing.assert_array_equal(gw, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        token_log_sum_sq_probs(h, w, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# 3. the Preference objective on a tiny model
#
# Compilation dominates these tests on a CPU: every jit here is compiled at XLA's optimisation level 0, the jitted
# steps are cached by configuration and shared between tests, and one jitted "direct" function serves every direct
# comparison (its terms are selected by traced coefficients).

V_MODEL = 128
PAIRS, T_MODEL = 8, 12
O0 = {"xla_backend_optimization_level": 0}


def chat_pair_batch(rng: np.random.Generator, pairs: int, T: int, *, prompt_len: int = 3) -> dict:
    """Interleaved pairs laid out as jaxpost.data.preference writes them: a sequence x = prompt + completion of L
    tokens is `inputs = x[:-1]`, `targets = x[1:]`, `segment_ids` 1 on those L - 1 positions, `loss_mask` on the
    completion targets. Chosen longer in even pairs, rejected longer in odd ones, so LD-DPO has tails to weigh."""
    R = 2 * pairs
    out = {k: np.zeros((R, T), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((R, T), np.float32)
    max_c = T + 1 - prompt_len
    for i in range(pairs):
        prompt = rng.integers(3, V_MODEL, prompt_len)
        c_len = sorted(int(x) for x in rng.choice(np.arange(2, max_c + 1), 2, replace=False))
        if i % 2 == 0:
            c_len = c_len[::-1]
        for side in (0, 1):
            r = 2 * i + side
            seq = np.concatenate([prompt, rng.integers(3, V_MODEL, c_len[side])])
            m = np.concatenate([np.zeros(prompt_len), np.ones(c_len[side])])
            n = len(seq) - 1
            out["inputs"][r, :n], out["targets"][r, :n] = seq[:-1], seq[1:]
            out["loss_mask"][r, :n] = m[1:]
            out["segment_ids"][r, :n] = 1
            out["positions"][r, :n] = np.arange(n)
    out["pair_mask"] = np.ones(pairs, np.float32)
    return out


@functools.cache
def model_batch() -> dict:
    return chat_pair_batch(np.random.default_rng(0), PAIRS, T_MODEL)


def _row_arrays(batch):
    return {k: jnp.asarray(batch[k]) for k in ROW_KEYS}


def _sgd_state(params):
    tx = optax.sgd(1.0)  # one step: new params = params - gradient
    return tx, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))


@functools.cache
def jit_step(**kw):
    """The jitted step of `Preference(lm, **kw)` (kw: hashable values; loss_kwargs as a tuple of items)."""
    lm, _ = cached_lm(tiny_config())
    kw = dict(kw)
    kw["loss_kwargs"] = dict(kw.get("loss_kwargs", ()))
    objective = Preference(lm, **kw)
    return jax.jit(step_fn(lm, optax.sgd(1.0), optax.constant_schedule(1.0), objective), compiler_options=O0)


FULL = dict(loss="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0), loss_kwargs=(("beta", 0.5),), ld_alpha=0.5,
            use_weighting=True, reference="model")


def _logits_logps(lm, params, b):
    """Naive per-token log-probs [R, T] and log sum_v p_v^2 [R, T] from the model's full logits."""
    logits = lm.logits(params, b["inputs"], b["positions"], b["segment_ids"])
    lsm = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(lsm, b["targets"][..., None], -1)[..., 0]
    return logp, jax.nn.logsumexp(2.0 * lsm, -1)


# the terms `direct` can combine (coefficient vector order)
TERMS = ("sigmoid", "bco_pair", "sigmoid_ld", "bco_pair_ld", "sft", "sft_ld", "orpo_sequence")


def _coeffs(**w):
    assert set(w) <= set(TERMS)
    return jnp.asarray([w.get(t, 0.0) for t in TERMS], jnp.float32)


@functools.cache
def _direct_fn():
    lm, _ = cached_lm(tiny_config())

    def direct(params, ref_params, b, coeffs, orpo_den):
        """The objective written out from the model's logits with the pure functions: mean over pairs of
        sum_k coeffs_k term_k. DPO terms (beta 0.5) times the WPO weights, on plain or LD (ld_alpha 0.5) sums of the
        policy and of the reference; "sft" each sequence's token-mean NLL of the chosen completion (on the raw
        log-probs; "sft_ld": on the length-desensitised sum, what jaxpost computes); "orpo_sequence" ORPO (beta 0.1)
        with the NLL over the chosen row's every target (segment_ids > 0), denominator `orpo_den`."""
        logp, lss = _logits_logps(lm, params, b)
        ref_logp = jax.lax.stop_gradient(_logits_logps(lm, ref_params, b)[0])
        mask = b["loss_mask"]
        c_tok, r_tok, c_m, r_m = logp[0::2], logp[1::2], mask[0::2], mask[1::2]
        nc, nr = jnp.sum(c_m, -1), jnp.sum(r_m, -1)
        plain = (jnp.sum(c_tok * c_m, -1), jnp.sum(r_tok * r_m, -1))
        ref_plain = (jnp.sum(ref_logp[0::2] * c_m, -1), jnp.sum(ref_logp[1::2] * r_m, -1))
        ld = ld_sequence_logps(c_tok, c_m, r_tok, r_m, ld_alpha=0.5)
        ref_ld = ld_sequence_logps(ref_logp[0::2], c_m, ref_logp[1::2], r_m, ld_alpha=0.5)
        # WPO: exp(mean_t(logp - log sum p^2)) of each response, detached
        dev = jax.lax.stop_gradient((logp - lss) * mask)
        w_R = jnp.exp(jnp.sum(dev, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
        w_B = w_R[0::2] * w_R[1::2]
        common = dict(chosen_tokens_B=nc, rejected_tokens_B=nr, beta=0.5)
        row = (b["segment_ids"][0::2] > 0).astype(jnp.float32)
        orpo_B = orpo(*plain, chosen_tokens_B=nc, rejected_tokens_B=nr, beta=0.1, sft_denominator=orpo_den,
                      nll_logps_B=jnp.sum(c_tok * row, -1), nll_tokens_B=jnp.sum(row, -1))[0]
        terms = [
            w_B * get_dpo_loss("sigmoid")(*plain, *ref_plain, **common)[0],
            w_B * get_dpo_loss("bco_pair")(*plain, *ref_plain, **common)[0],
            w_B * get_dpo_loss("sigmoid")(*ld, *ref_ld, **common)[0],
            w_B * get_dpo_loss("bco_pair")(*ld, *ref_ld, **common)[0],
            -plain[0] / nc,
            -ld[0] / nc,
            orpo_B,
        ]
        return jnp.dot(coeffs, jnp.stack([jnp.mean(t) for t in terms]))

    return jax.jit(jax.value_and_grad(direct), compiler_options=O0)


def _ref_params(params, scale=0.9):
    return jax.tree.map(lambda x: x * scale, params)


def check_step_against_direct(step, coeffs, *, ref=True, orpo_den=1.0):
    """The step's loss equals the direct one, and (SGD, lr 1) its new params are params - the direct gradient."""
    _, params = cached_lm(tiny_config())
    ref_params = _ref_params(params)
    batch = model_batch()
    _, state = _sgd_state(params)
    new_state, metrics = step(state, ref_params if ref else None, split_microbatches(batch, 1))
    loss, grads = _direct_fn()(params, ref_params, _row_arrays(batch), coeffs, jnp.float32(orpo_den))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert max_abs_diff(new_state.params, jax.tree.map(lambda p, g: p - g, params, grads)) < 1e-5
    return metrics


def test_objective_mpo_with_wpo_equals_direct_computation():
    step = jit_step(loss="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0), loss_kwargs=(("beta", 0.5),),
                    use_weighting=True, reference="model")
    m = check_step_against_direct(step, _coeffs(sigmoid=0.8, bco_pair=0.2, sft=1.0))
    assert 0.0 < float(m["wpo_weight"]) < 0.99  # the weights are in play


def test_objective_ld_dpo_with_wpo_equals_direct_computation():
    step = jit_step(loss=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), loss_kwargs=(("beta", 0.5),), ld_alpha=0.5,
                    use_weighting=True, reference="model")
    check_step_against_direct(step, _coeffs(sigmoid_ld=0.8, bco_pair_ld=0.2))


def test_objective_mpo_ld_wpo_equals_direct_computation():
    """The full configuration: "sft" stays the chosen response's NLL, each sequence's token mean (Preference's
    docstring, docs/losses.md), on the plain per-token log-probs even under ld_alpha, as TRL's "sft" (see
    test_mpo_sft_term_uses_the_plain_chosen_logps_under_ld_alpha_in_trl)."""
    check_step_against_direct(jit_step(**FULL), _coeffs(sigmoid_ld=0.8, bco_pair_ld=0.2, sft=1.0))


def test_objective_orpo_sequence_nll_equals_direct_computation_and_trl():
    """Preference(orpo, orpo_nll="sequence") with TRL's batch token mean as sft_denominator is the direct
    computation over the segment_ids > 0 targets, and TRL's ORPO loss on the same model's logits (the chosen row's
    NLL over prompt + completion, the first token never predicted)."""
    trl_reference = _trl()
    lm, params = cached_lm(tiny_config())
    batch = model_batch()
    seg = batch["segment_ids"]
    den = float(seg[0::2].sum()) / PAIRS  # total NLL tokens of the chosen rows / pairs
    step = jit_step(loss="orpo", loss_kwargs=(("beta", 0.1), ("sft_denominator", den)), reference="none",
                    orpo_nll="sequence")
    metrics = check_step_against_direct(step, _coeffs(orpo_sequence=1.0), ref=False, orpo_den=den)
    # TRL's rows: the full sequences x (L = n + 1 tokens) with their logits; the last position predicts nothing
    b = _row_arrays(batch)
    logits = np.asarray(jax.jit(lm.logits, compiler_options=O0)(params, b["inputs"], b["positions"],
                                                                 b["segment_ids"]), np.float64)
    R, T = seg.shape
    n = seg.sum(1)
    ids, am = np.zeros((R, T + 1), np.int64), np.zeros((R, T + 1), np.int64)
    full_logits = np.zeros((R, T + 1, logits.shape[-1]))
    for r in range(R):
        ids[r, 0], ids[r, 1:n[r] + 1] = batch["inputs"][r, 0], batch["targets"][r, :n[r]]
        am[r, :n[r] + 1] = 1
        full_logits[r, :n[r]] = logits[r, :n[r]]
    trl = trl_reference.trl_orpo_nll(full_logits[0::2], full_logits[1::2], ids[0::2], ids[1::2], am[0::2], am[1::2],
                                     np.full(PAIRS, 3), beta=0.1)
    np.testing.assert_allclose(float(metrics["loss"]), trl["loss"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), trl["nll_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["chosen_logps"]), np.mean(trl["chosen_logps"]), rtol=1e-5)


def test_grad_accum_and_eight_device_mesh_give_the_same_step():
    """The full configuration (MPO list, LD-DPO, WPO): one step on one device with 1 micro-batch, with 2, and on a
    (data, fsdp, tensor) = (2, 2, 2) mesh with 2: the same loss, metrics and params."""
    lm, params = cached_lm(tiny_config())
    batch = model_batch()
    tx = optax.sgd(1.0)
    host = jax.device_get(params)  # fresh buffers: the sharded step donates its state
    out = {}
    for accum in (1, 2):
        _, state = _sgd_state(params)
        s, m = jit_step(**FULL)(state, _ref_params(params), split_microbatches(batch, accum))
        out[f"single/{accum}"] = (jax.device_get(m), jax.device_get(s.params))
    mesh = mesh_of(2, 2, 2)
    sh = state_shardings(abstract_train_state(lm, tx), lm.param_shardings(mesh), tx, mesh, model=lm)
    state8 = jax.device_put(TrainState(step=np.zeros((), np.int32), params=host, opt_state=tx.init(host),
                                       rng=np.asarray(jax.random.PRNGKey(0))), sh)
    ref8 = jax.device_put(_ref_params(host), sh.params)
    full = dict(FULL, loss_kwargs=dict(FULL["loss_kwargs"]))
    step8 = make_step(lm, tx, optax.constant_schedule(1.0), Preference(lm, **full), mesh=mesh, state_shardings=sh,
                      units=PAIRS, grad_accum=2)
    s8, m8 = step8(state8, ref8, split_microbatches(batch, 2))
    out["mesh8/2"] = (jax.device_get(m8), jax.device_get(s8.params))
    m0, p0 = out["single/1"]
    assert abs(float(m0["loss"]) - LOG2) > 1e-2 and max_abs_diff(p0, host) > 1e-3  # a real step
    for name in ("single/2", "mesh8/2"):
        m, p = out[name]
        for k in ("loss", "grad_norm", "margins", "wpo_weight", "chosen_logps", "pairs"):
            np.testing.assert_allclose(m[k], m0[k], rtol=1e-5, atol=1e-7, err_msg=f"{name}: {k}")
        assert max_abs_diff(p, p0) < 1e-5, name


def test_precomputed_ld_reference_equals_held_reference():
    lm, params = cached_lm(tiny_config())
    ref_params = _ref_params(params)
    batch = model_batch()
    mesh = single_device_mesh()
    ref_ld = np.asarray(make_reference_logps(lm, mesh, lm.param_shardings(mesh), rows=2 * PAIRS, ld_alpha=0.5)(
        ref_params, batch))
    # the precomputed values are the LD sums of the reference's per-token log-probs, not the plain sums
    lp = np.asarray(jax.jit(_logits_logps, static_argnums=0, compiler_options=O0)(
        lm, ref_params, _row_arrays(batch))[0])
    m = batch["loss_mask"]
    c, r = ld_sequence_logps(lp[0::2], m[0::2], lp[1::2], m[1::2], ld_alpha=0.5)
    np.testing.assert_allclose(ref_ld[0::2], c, rtol=1e-5)
    np.testing.assert_allclose(ref_ld[1::2], r, rtol=1e-5)
    assert np.max(np.abs(ref_ld - (lp * m).sum(1))) > 1e-1
    kw = dict(loss=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), loss_kwargs=(("beta", 0.5),), ld_alpha=0.5,
              use_weighting=True)
    _, state = _sgd_state(params)
    s1, m1 = jit_step(**kw, reference="model")(state, ref_params, split_microbatches(batch, 1))
    s2, m2 = jit_step(**kw, reference="precomputed")(state, None, split_microbatches(dict(batch, ref_logps=ref_ld), 1))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    assert abs(float(m1["loss"]) - 0.8 * LOG2 - 0.2 * 2 * LOG2) > 1e-3  # the reference differs from the policy
    assert max_abs_diff(s1.params, s2.params) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# 4. configuration errors


@pytest.mark.parametrize("kw,match", [
    (dict(loss="nca_pair", f_divergence="forward_kl"), r"applies to the losses .* not \['nca_pair'\]"),
    (dict(loss="sigmoid,nca_pair", f_divergence="js_divergence"), r"not \['nca_pair'\]"),
    (dict(loss="simpo", reference="none", f_divergence="alpha_divergence"), r"not \['simpo'\]"),
    (dict(f_divergence="kl"), "f_divergence must be one of"),
    (dict(ld_alpha=1.5), r"ld_alpha must lie in \[0, 1\]"),
    (dict(ld_alpha=-0.1), r"ld_alpha must lie in \[0, 1\]"),
    (dict(loss="simpo", reference="none", ld_alpha=0.5), "needs a reference"),
    (dict(loss="sigmoid,dpo_new"), "unknown preference loss 'dpo_new'"),
    (dict(loss=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2)), "loss_weights has 2 entries for 3 losses"),
    (dict(loss="sigmoid,sigmoid"), "appears twice"),
    (dict(loss="sft"), "'sft' alone"),
    (dict(orpo_nll="prompt"), "orpo_nll must be one of"),
])
def test_dpo_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kw)


def test_dpo_config_accepts_the_variants_and_passes_their_hyperparameters():
    cfg = DPOConfig(loss="sigmoid,ipo,sft", loss_weights=(0.8, 0.2, 1.0), f_divergence="js_divergence",
                    ld_alpha=0.5, use_weighting=True, reference="model")
    assert cfg.loss_names == ("sigmoid", "ipo", "sft")
    kw = cfg.loss_kwargs()
    assert kw["f_divergence"] == "js_divergence" and kw["beta"] == 0.1
    cfg = DPOConfig(loss="alphapo", alpha=0.25, reference="none", orpo_nll="sequence")
    assert cfg.loss_kwargs()["alpha"] == 0.25
    lm, _ = cached_lm(tiny_config())
    with pytest.raises(ValueError, match="orpo_nll must be one of"):
        Preference(lm, loss="orpo", reference="none", orpo_nll="all")
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\]"):
        Preference(lm, loss="sigmoid", ld_alpha=2.0)


def test_nll_mean_batch_is_trls_batch_token_mean_under_any_split():
    """nll_mean="batch": the NLL denominator is the whole batch's chosen NLL tokens / pairs (`Preference.prepare`),
    so the step equals the one with that denominator given explicitly (TRL's batch token mean), and 1 or 2
    micro-batches give the same step (each micro-batch's own count would not)."""
    _, params = cached_lm(tiny_config())
    batch = model_batch()
    seg = batch["segment_ids"]
    den = float(seg[0::2].sum()) / PAIRS
    fixed = jit_step(loss="orpo", loss_kwargs=(("beta", 0.1), ("sft_denominator", den)), reference="none",
                     orpo_nll="sequence")
    by_batch = jit_step(loss="orpo", loss_kwargs=(("beta", 0.1),), reference="none", orpo_nll="sequence",
                        nll_mean="batch")
    _, state = _sgd_state(params)
    s_fixed, m_fixed = fixed(state, None, split_microbatches(batch, 1))
    for accum in (1, 2):
        s_batch, m_batch = by_batch(state, None, split_microbatches(batch, accum))
        np.testing.assert_allclose(float(m_batch["loss"]), float(m_fixed["loss"]), rtol=1e-6)
        assert max_abs_diff(s_batch.params, s_fixed.params) < 1e-6
    per_sequence = jit_step(loss="orpo", loss_kwargs=(("beta", 0.1),), reference="none", orpo_nll="sequence")
    per_sequence_loss = float(per_sequence(state, None, split_microbatches(batch, 1))[1]["loss"])
    assert abs(per_sequence_loss - float(m_fixed["loss"])) > 1e-4


@pytest.mark.parametrize("name,kwargs", [("cpo", (("beta", 0.5), ("label_smoothing", 0.1))), ("cpo_hinge", ()),
                                         ("cpo_ipo", ()), ("alphapo", (("alpha", 0.25), ("gamma", 0.3)))])
def test_reference_free_cpo_forms_run_in_the_preference_step(name, kwargs):
    """CPO's sigmoid / hinge / IPO forms and AlphaPO are usable in the preference step without a reference: the
    step's loss is the pure loss of the model's own summed log-probs (sft_weight 0: the objective's NLL term is off)."""
    from jaxpost.losses import REFERENCE_FREE_LOSSES
    from jaxpost.train.dpo import split_pairs

    lm, params = cached_lm(tiny_config())
    batch = model_batch()
    _, state = _sgd_state(params)
    step = jit_step(loss=name, loss_kwargs=kwargs, reference="none")
    _, metrics = step(state, None, split_microbatches(batch, 1))
    b = _row_arrays(batch)
    logp, _ = _logits_logps(lm, params, b)
    m = b["loss_mask"].astype(jnp.float32)
    (c, r), (nc, nr) = split_pairs(jnp.sum(logp * m, -1)), split_pairs(jnp.sum(m, -1))
    want, _ = REFERENCE_FREE_LOSSES[name](c, r, chosen_tokens_B=nc, rejected_tokens_B=nr, sft_weight=0.0,
                                          **dict(kwargs))
    np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(want)), rtol=1e-5)
