"""The RL loss variants and the advantages around them: CISPO, SAPO, VESPO, LUSPO, RLOO's sequence ratio, PPO's
two-sided (delta) clip, the importance-weighted KL, the rollout-trainer mismatch correction (TRL's four vLLM
importance-sampling modes), the RLOO / REINFORCE / multi-reward advantages.

1. Against TRL 1.16's own loss code (tests/trl_reference.py runs ``GRPOTrainer._compute_loss`` /
   ``RLOOTrainer._compute_loss`` on numpy inputs): loss value and gradient w.r.t. the per-token log-probs, in float64
   (jaxpost keeps float64 inputs in float64 under ``jax.enable_x64``), on a batch with ragged responses, mixed-sign
   advantages and ratios both inside and outside the clip ranges (each test asserts that its clipping / gating
   really happens). Skipped when trl is not importable.
2. Advantages against TRL's (float64 and float32 reproductions of its inline blocks).
3. Small cases worked by hand in the comments.
4. The importance-weighted KL against exact expectations over a small categorical distribution.
5. Micro-batch splits and an 8-device data-parallel ``shard_map`` give the full-batch loss and gradient (with
   rollout-correction weights and the importance-weighted KL); padding garbage changes nothing; bfloat16 inputs
   compute in float32.

Differences from TRL, each tested as the relation that holds instead:
* the sequence-mean aggregations count only the rows with a response token (documented; TRL's ``.mean()`` and
  dr_grpo's ``B * max_completion_length`` count every row of the micro-batch);
* with ``importance_sampling_level="sequence"`` TRL weights the bias-corrected KL by the *sequence* ratio;
  ``kl_loss(old_logp_BT=...)`` always uses the token ratio;
* GSPO-token (``gspo``) with token-level rollout weights that vary within a sequence: same value as TRL's sequence
  level, different gradient (``gspo_seq`` is TRL's exactly);
* TRL builds SAPO's temperatures (and VESPO's k, lambda) as float32 tensors even in float64: the SAPO comparisons use
  temperatures that are float32 numbers.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxpost.losses import (
    aggregate_loss,
    cispo,
    get_policy_loss,
    grpo,
    gspo,
    k3,
    kl_loss,
    loss_denominator,
    metric_means,
    ppo_clip,
    reinforce_returns,
    rloo,
    rloo_seq,
    rollout_correction,
    sapo,
    vespo,
)
from jaxpost.rollout.rewards import RewardSet
from tests.helpers import trl_reference
from tests.test_rl_losses import MAX_LEN, MODES, SEQUENCE_FORM, f32, jcall, jit, rl_batch


_trl = trl_reference


def f64(x):
    return jnp.asarray(np.asarray(x, np.float64), jnp.float64)


# ----------------------------------------------------------------------------------------------------------------------
# a batch for the TRL comparisons: 6 sequences, T = 5, ragged responses, mixed-sign advantages, and a per-sequence
# drift of the log-ratio so that some sequence ratios leave the clip range and some stay inside


TRL_LENGTHS = np.array([5, 3, 4, 2, 5, 1])
TRL_OFFSETS = np.array([0.5, -0.4, 0.05, -0.05, 0.35, -0.3])
TRL_ADV = np.array([1.2, -0.7, 0.9, -1.1, -0.6, 0.8])


def trl_batch(seed=0, lengths=TRL_LENGTHS):
    rng = np.random.default_rng(seed)
    B, T = len(lengths), 5
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)
    logp = -rng.uniform(0.2, 2.5, (B, T))
    old = logp - TRL_OFFSETS[:B, None] - rng.normal(0, 0.3, (B, T))
    ref = logp + rng.normal(0, 0.3, (B, T))
    samp = old + rng.normal(0, 0.15, (B, T))
    pad = mask == 0
    for x in (logp, old, ref, samp):  # finite garbage on padding (TRL multiplies by the mask: inf would give NaN)
        x[pad] = rng.normal(-1.0, 2.0, int(pad.sum()))
    return dict(logp=logp, old=old, ref=ref, samp=samp, mask=mask, adv=TRL_ADV[:B].copy())


@functools.partial(jax.jit, static_argnames=("name", "hyper", "mode", "kl"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _ours(logp, old, ref, adv, mask, isw, *, name, hyper, mode, kl=None):
    """(loss, d loss / d logp, metric means) of one whole-batch step: policy loss (+ beta * KL) aggregated by
    ``mode`` with the batch's own denominator (max_length = T for seq_mean_token_sum_norm, TRL's default)."""
    den = loss_denominator(mask, mode=mode, max_length=mask.shape[1])

    def f(lp):
        loss_BT, metrics = get_policy_loss(name)(lp, old, adv, mask, is_weight_BT=isw, **dict(hyper))
        if kl is not None:
            beta, weighted = kl
            loss_BT = loss_BT + kl_loss(lp, ref, mask, beta=beta, old_logp_BT=old if weighted else None)
        return aggregate_loss(loss_BT, mask, mode=mode, denominator=den), metric_means(metrics)

    (v, mm), g = jax.value_and_grad(f, has_aux=True)(logp)
    return v, g, mm


@functools.partial(jax.jit, static_argnames=("mode", "clip_min", "clip_max"),
                   compiler_options={"xla_backend_optimization_level": 0})
def _correction(old, samp, mask, *, mode, clip_min, clip_max):
    return rollout_correction(old, samp, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)


def ours64(b, name, hyper, mode, *, adv=None, isw=None, kl=None):
    """`_ours` in float64 on a `trl_batch` (numpy) -> (loss float, grad numpy, metric means as floats)."""
    with jax.enable_x64(True):
        args = [f64(b[k]) for k in ("logp", "old", "ref")]
        v, g, mm = _ours(*args, f64(b["adv"] if adv is None else adv), f64(b["mask"]),
                         None if isw is None else f64(isw), name=name, hyper=tuple(sorted(hyper.items())),
                         mode=mode, kl=kl)
        assert v.dtype == jnp.float64 and g.dtype == jnp.float64
        return float(v), np.asarray(g), {k: float(x) for k, x in mm.items()}


def correction64(b, mode, clip_min, clip_max):
    with jax.enable_x64(True):
        w, metrics = _correction(f64(b["old"]), f64(b["samp"]), f64(b["mask"]), mode=mode, clip_min=clip_min,
                                 clip_max=clip_max)
        return np.asarray(w), {k: float(x) for k, x in metrics.items()}


def assert_equals_trl(ours, trl, what):
    v, g, _ = ours
    assert np.max(np.abs(trl["grad"])) > 0, what
    np.testing.assert_allclose(v, trl["loss"], rtol=1e-10, atol=1e-13, err_msg=f"{what}: loss")
    np.testing.assert_allclose(g, trl["grad"], rtol=1e-9, atol=1e-13, err_msg=f"{what}: gradient")


def token_ratios(b):
    return np.where(b["mask"] > 0, np.exp(b["logp"] - b["old"]), np.nan)


def sequence_ratios(b, *, mean):
    d = ((b["logp"] - b["old"]) * b["mask"]).sum(-1)
    return np.exp(d / b["mask"].sum(-1) if mean else d)


# ----------------------------------------------------------------------------------------------------------------------
# 1. policy losses against TRL's _compute_loss


EPS = dict(eps_low=0.2, eps_high=0.28)
TRL_EPS = dict(epsilon=0.2, epsilon_high=0.28)

# case -> (jaxpost loss, hyperparameters, aggregation, TRL GRPO arguments)
TRL_CASES = {
    # TRL's cispo: clamp(coef_1, max=epsilon_high), dapo normalisation (token sum / num_items_in_batch)
    "cispo": ("cispo", dict(clip_max=1.3), "token_mean", dict(loss_type="cispo", epsilon_high=1.3)),
    # sapo: per-sequence token means (TRL's "grpo" normalisation); non-default temperatures check the mapping.
    # TRL builds its temperatures (and VESPO's k, lambda) with torch.where on Python floats: a float32 tensor even in
    # a float64 run, so the temperatures here are float32 numbers (0.875, 1.25 exactly; TRL's default 1.05 is
    # 1.0499999523 in float32, given so to jaxpost: with 1.05 itself the float64 results differ by ~1e-8 relative)
    "sapo": ("sapo", dict(tau_pos=0.875, tau_neg=1.25), "seq_mean_token_mean",
             dict(loss_type="sapo", sapo_temperature_pos=0.875, sapo_temperature_neg=1.25)),
    "sapo_default": ("sapo", dict(tau_pos=1.0, tau_neg=float(np.float32(1.05))), "seq_mean_token_mean",
                     dict(loss_type="sapo")),
    "vespo": ("vespo", dict(k_pos=1.5, lambda_pos=2.5, k_neg=2.5, lambda_neg=1.5), "token_mean",
              dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)),
    "vespo_default": ("vespo", {}, "token_mean", dict(loss_type="vespo")),
    "luspo": ("luspo", EPS, "seq_mean_token_sum", dict(loss_type="luspo", importance_sampling_level="sequence",
                                                         **TRL_EPS)),
    "ppo_delta": ("ppo", dict(EPS, delta=1.5), "token_mean", dict(loss_type="dapo", delta=1.5, **TRL_EPS)),
    "ppo_grpo": ("ppo", EPS, "seq_mean_token_mean", dict(loss_type="grpo", **TRL_EPS)),
    # TRL importance_sampling_level="sequence" = GSPO(-token) with one advantage per sequence, any aggregation
    "gspo_grpo": ("gspo", EPS, "seq_mean_token_mean", dict(loss_type="grpo", importance_sampling_level="sequence",
                                                           **TRL_EPS)),
    "gspo_dapo": ("gspo", EPS, "token_mean", dict(loss_type="dapo", importance_sampling_level="sequence", **TRL_EPS)),
    "gspo_dr_grpo": ("gspo", EPS, "seq_mean_token_sum_norm",
                     dict(loss_type="dr_grpo", importance_sampling_level="sequence", **TRL_EPS)),
    "gspo_seq_grpo": ("gspo_seq", EPS, "seq_mean_token_mean",
                      dict(loss_type="grpo", importance_sampling_level="sequence", **TRL_EPS)),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_policy_loss_and_gradient_equal_trl(case):
    trl = _trl()
    name, hyper, mode, trl_kw = TRL_CASES[case]
    b = trl_batch()
    got = ours64(b, name, hyper, mode)
    want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], **trl_kw)
    assert_equals_trl(got, want, case)
    mm, tm = got[2], want["metrics"]
    r, s = token_ratios(b), sequence_ratios(b, mean=True)
    neg = (b["adv"] < 0)[:, None]
    # the clipping / gating really happens on this batch, and TRL's logged metrics agree where defined alike
    if name in ("ppo", "gspo", "gspo_seq", "luspo"):
        assert 0.0 < mm["clip_frac"] < 1.0, mm
        for ours_key, trl_key in (("clip_frac", "region"), ("clip_frac_low", "low"), ("clip_frac_high", "high")):
            np.testing.assert_allclose(mm[ours_key], tm[f"clip_ratio/{trl_key}_mean"], rtol=1e-6, err_msg=ours_key)
        assert mm["clip_frac_low"] > 0 and mm["clip_frac_high"] > 0
        if name != "ppo":  # some sequence ratios outside [0.8, 1.28], some inside
            assert np.any((s > 1.28) | (s < 0.8)) and np.any((s < 1.28) & (s > 0.8))
    if case == "ppo_delta":
        # delta matters only where A < 0 and rho > delta (the unclipped term, now bounded at delta |A|)
        assert np.any((r > 1.5) & neg) and mm["clip_frac_delta"] > 0
        no_delta = ours64(b, "ppo", EPS, mode)
        assert abs(no_delta[0] - got[0]) > 1e-3
    if name == "cispo":
        assert 0.0 < mm["clip_frac"] < 1.0 and mm["clip_frac"] == mm["clip_frac_high"]
    if name == "sapo":
        assert mm["gate"] < 0.95  # ratios away from 1: the gate is below REINFORCE's scale
    if name == "vespo":
        np.testing.assert_allclose(mm["phi"], tm["vespo/phi_seq_mean"], rtol=1e-6)  # float32 metric sums
        assert abs(mm["phi"] - 1.0) > 0.05


def test_cispo_clip_metrics_and_trls():
    """``clip_frac_high_pos`` counts the tokens whose weight was capped with A > 0, TRL's ``cispo_clip_ratio``;
    ``clip_frac_high`` (and ``clip_frac`` without a lower bound) every capped weight, whatever the sign of A."""
    trl = _trl()
    b = trl_batch()
    _, _, mm = ours64(b, "cispo", dict(clip_max=1.3), "token_mean")
    tm = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], loss_type="cispo", epsilon_high=1.3)["metrics"]
    r, m = token_ratios(b), b["mask"] > 0
    pos = np.broadcast_to((b["adv"] > 0)[:, None], m.shape)
    # (both sides count in float32, even for float64 inputs)
    all_frac, trl_frac = np.sum((r > 1.3) & m) / m.sum(), np.sum((r > 1.3) & m & pos) / m.sum()
    assert all_frac > trl_frac > 0  # clipped tokens of both signs
    np.testing.assert_allclose(mm["clip_frac_high_pos"], trl_frac, rtol=1e-6)
    np.testing.assert_allclose(tm["cispo_clip_ratio"], trl_frac, rtol=1e-6)  # (.float(): float32 in TRL too)
    np.testing.assert_allclose(mm["clip_frac_high"], all_frac, rtol=1e-6)
    np.testing.assert_allclose(mm["clip_frac"], all_frac, rtol=1e-6)


def test_per_token_advantages_equal_trl():
    """TRL also accepts (B, T) advantages: the token-level losses agree with them too (VESPO's k and lambda then
    follow each token's sign)."""
    trl = _trl()
    b = trl_batch(1)
    adv_BT = b["adv"][:, None] + np.random.default_rng(5).normal(0, 1.0, b["mask"].shape)
    for case in ("cispo", "sapo", "vespo", "ppo_delta"):
        name, hyper, mode, trl_kw = TRL_CASES[case]
        got = ours64(b, name, hyper, mode, adv=adv_BT)
        assert_equals_trl(got, trl.trl_grpo_loss(b["logp"], b["old"], adv_BT, b["mask"], **trl_kw), case)


def test_rloo_sequence_ratio_equals_trl():
    trl = _trl()
    b = trl_batch()
    s = sequence_ratios(b, mean=False)
    assert np.any((s > 1.28) & (b["adv"] > 0)) or np.any((s < 0.8) & (b["adv"] < 0))  # some clipped
    assert np.any((s < 1.28) & (s > 0.8))  # some inside
    got = ours64(b, "rloo_seq", EPS, "seq_mean_token_mean")
    want = trl.trl_rloo_loss(b["logp"], (b["old"] * b["mask"]).sum(1), b["adv"], b["mask"], **TRL_EPS)
    assert_equals_trl(got, want, "rloo_seq")
    mm, tm = got[2], want["metrics"]
    assert 0.0 < mm["clip_frac"] < 1.0
    for ours_key, trl_key in (("clip_frac", "region"), ("clip_frac_low", "low"), ("clip_frac_high", "high")):
        np.testing.assert_allclose(mm[ours_key], tm[f"clip_ratio/{trl_key}_mean"], rtol=1e-6, err_msg=ours_key)


@pytest.mark.parametrize("loss_type,mode", [("dapo", "token_mean"), ("grpo", "seq_mean_token_mean")])
@pytest.mark.parametrize("weighted", [True, False])
def test_kl_term_equals_trl(loss_type, mode, weighted):
    """ppo + beta * kl_loss(k3), importance weighted by the token ratio (``old_logp_BT``) = TRL's beta = 0.04 with
    ``use_bias_correction_kl=True``; without ``old_logp_BT`` = ``use_bias_correction_kl=False``."""
    trl = _trl()
    b = trl_batch(2)
    got = ours64(b, "ppo", EPS, mode, kl=(0.04, weighted))
    want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], loss_type=loss_type, beta=0.04,
                             ref_per_token_logps=b["ref"], use_bias_correction_kl=weighted, **TRL_EPS)
    assert_equals_trl(got, want, f"{loss_type} weighted={weighted}")
    # the two KL forms really differ here (off-policy ratios): the weighted one's gradient has the extra
    # beta * k3 * rho term
    other = ours64(b, "ppo", EPS, mode, kl=(0.04, not weighted))
    assert np.max(np.abs(other[1] - got[1])) > 1e-4


# rollout-correction bounds per mode: chosen so that some tokens / sequences are truncated or masked and some not
IS_BOUNDS = {"token_truncate": (0.9, 1.1), "token_mask": (0.9, 1.1), "sequence_truncate": (0.95, 1.2),
             "sequence_mask": (None, 1.2)}


def is_batch():
    b = trl_batch(3)
    b["samp"][0, 2] = np.nan  # a token the sampler could not score: no correction (weight 1), as in TRL
    return b


@pytest.mark.parametrize("mode", list(IS_BOUNDS))
def test_rollout_correction_equals_trl(mode):
    """TRL's vLLM importance-sampling ratio (its four modes) = ``rollout_correction``'s weights on the response
    tokens (a sequence weight on each of the sequence's tokens); ppo(is_weight_BT=w) = TRL's dapo loss with
    ``sampling_per_token_logps``."""
    trl = _trl()
    b = is_batch()
    lo, hi = IS_BOUNDS[mode]
    w, metrics = correction64(b, mode, lo, hi)
    ratio = trl.trl_grpo_vllm_importance_sampling_ratio(b["old"], b["samp"], b["mask"],
                                                        vllm_importance_sampling_mode=mode,
                                                        vllm_importance_sampling_clip_min=lo,
                                                        vllm_importance_sampling_clip_max=hi)
    m = b["mask"] > 0
    want = np.broadcast_to(ratio, m.shape)
    np.testing.assert_allclose(w[m], want[m], rtol=1e-12)
    np.testing.assert_array_equal(w[~m], 1.0)
    assert 0.0 < metrics["is_clipped_frac"] < 1.0, metrics
    if mode.endswith("mask"):
        assert np.any(w[m] == 0.0) and np.any(w[m] != 0.0)
    else:
        assert np.any(np.isin(w[m], [v for v in (lo, hi) if v is not None]))
    got = ours64(b, "ppo", EPS, "token_mean", isw=w)
    trl_out = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], loss_type="dapo",
                                sampling_per_token_logps=b["samp"], vllm_importance_sampling_mode=mode,
                                vllm_importance_sampling_clip_min=lo, vllm_importance_sampling_clip_max=hi,
                                **TRL_EPS)
    assert_equals_trl(got, trl_out, mode)


@pytest.mark.parametrize("case", ["cispo", "sapo", "luspo", "gspo_seq_grpo", "gspo_grpo", "ppo_delta"])
def test_rollout_correction_multiplies_every_loss_as_trl(case):
    """TRL multiplies the per-token loss of every loss type but VESPO by the IS ratio: so does ``is_weight_BT``
    (token weights under the token_mask mode, sequence weights under sequence_truncate). GSPO-token agrees with
    TRL's sequence level under sequence weights only (next test)."""
    trl = _trl()
    b = is_batch()
    name, hyper, agg, trl_kw = TRL_CASES[case]
    for mode in ("token_mask", "sequence_truncate") if case != "gspo_grpo" else ("sequence_truncate",):
        lo, hi = IS_BOUNDS[mode]
        w, _ = correction64(b, mode, lo, hi)
        got = ours64(b, name, hyper, agg, isw=w)
        want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], sampling_per_token_logps=b["samp"],
                                 vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
                                 vllm_importance_sampling_clip_max=hi, **trl_kw)
        assert_equals_trl(got, want, f"{case} {mode}")


@pytest.mark.parametrize("mode", ["token_mask", "token_truncate"])
def test_gspo_token_with_token_weights_differs_from_trl_sequence_level(mode):
    """Token-level weights that vary within a sequence: the *values* of GSPO-token (``gspo``) and of TRL's
    ``importance_sampling_level="sequence"`` agree, their *gradients* do not. GSPO-token gives token t the gradient
    -A sg(s) w_t grad logp_t / n (each token's weight scales its own gradient; a token masked out by token_mask gets
    none), TRL's sequence ratio spreads d s / d logp_t = s / n to every token, so each token gets the sequence's mean
    weight (a masked-out token still moves). The sequence form ``gspo_seq`` is TRL's exactly (previous test)."""
    trl = _trl()
    b = is_batch()
    lo, hi = IS_BOUNDS[mode]
    w, _ = correction64(b, mode, lo, hi)
    m = b["mask"]
    trl_kw = dict(loss_type="grpo", importance_sampling_level="sequence", **TRL_EPS)
    want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], m, sampling_per_token_logps=b["samp"],
                             vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
                             vllm_importance_sampling_clip_max=hi, **trl_kw)
    want_plain = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], m, **trl_kw)
    got = ours64(b, "gspo", EPS, "seq_mean_token_mean", isw=w)
    got_plain = ours64(b, "gspo", EPS, "seq_mean_token_mean")
    np.testing.assert_allclose(got[0], want["loss"], rtol=1e-10)
    mean_w = (w * m).sum(-1, keepdims=True) / m.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[1], w * m * got_plain[1], rtol=1e-9, atol=1e-13)  # jaxpost: per-token weight
    np.testing.assert_allclose(want["grad"], mean_w * want_plain["grad"], rtol=1e-9, atol=1e-13)  # TRL: mean
    assert np.max(np.abs(got[1] - want["grad"])) > 1e-3
    if mode == "token_mask":  # a dropped token (w = 0) of an unclipped sequence: no gradient here, some in TRL
        dropped = (w == 0) & (m > 0) & (want["grad"] != 0)
        assert np.any(dropped) and np.all(got[1][dropped] == 0)


def test_is_weight_multiplies_the_per_token_loss():
    """Every loss but VESPO: loss_BT(is_weight_BT=w) = w * loss_BT on the response tokens (RLOO's sequence loss
    included, which TRL's RLOOTrainer has no correction for), and the gradient of sum(loss_BT(w)) is that of
    sum(sg(w) * loss_BT): the weight is detached."""
    b = inv_batch(44)
    m = np.asarray(b["mask"]) > 0

    def run(lp, isw):
        out = {}
        for name in ("ppo", "gspo", "gspo_seq", "luspo", "rloo_seq", "reinforce", "cispo", "sapo"):
            adv = b["adv_B"] if name in SEQUENCE_FORM else b["adv_BT"]
            f = lambda y, w: get_policy_loss(name)(y, b["old"], adv, b["mask"], is_weight_BT=w)[0]
            out[name] = (f(lp, isw), f(lp, None), jax.grad(lambda y, w: jnp.sum(f(y, w)), argnums=(0, 1))(lp, isw),
                         jax.grad(lambda y: jnp.sum(isw * f(y, None)))(lp))
        return out

    for name, (weighted, plain, (g, g_w), g_want) in jcall(run, b["logp"], b["isw"]).items():
        np.testing.assert_allclose(np.asarray(weighted)[m], (np.asarray(b["isw"]) * np.asarray(plain))[m],
                                   rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(g_w, 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
def test_vespo_with_rollout_correction_equals_trl(mode):
    """VESPO folds the token weights into its sequence ratio (log w += sum_t log is_w_t) instead of multiplying the
    loss, as TRL's get_gamma_weights does (TRL allows the token modes only with VESPO)."""
    trl = _trl()
    b = is_batch()
    lo, hi = IS_BOUNDS[mode]
    w, _ = correction64(b, mode, lo, hi)
    name, hyper, agg, trl_kw = TRL_CASES["vespo"]
    got = ours64(b, name, hyper, agg, isw=w)
    want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], sampling_per_token_logps=b["samp"],
                             vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
                             vllm_importance_sampling_clip_max=hi, **trl_kw)
    assert_equals_trl(got, want, mode)
    # the weights changed the loss (not multiplied onto it: folded into phi)
    assert abs(ours64(b, name, hyper, agg)[0] - got[0]) > 1e-4


@pytest.mark.parametrize("case", ["sapo", "luspo", "gspo_dr_grpo", "cispo"])
def test_rows_without_response_tokens_documented_difference(case):
    """jaxpost's sequence aggregations count only the rows with a response token; TRL's ``.mean()`` (grpo, sapo,
    luspo) and ``B * max_completion_length`` (dr_grpo) count every row. With an empty row the two differ by exactly
    B / (rows with a response token); token_mean (TRL dapo / cispo / vespo) counts tokens and agrees."""
    trl = _trl()
    name, hyper, mode, trl_kw = TRL_CASES[case]
    b = trl_batch(4, lengths=np.array([5, 3, 4, 0, 5, 1]))
    got = ours64(b, name, hyper, mode)
    want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], **trl_kw)
    scale = 1.0 if mode == "token_mean" else 6 / 5
    assert_equals_trl(got, dict(loss=want["loss"] * scale, grad=want["grad"] * scale), case)


def test_sampler_log_probs_of_infinity_are_bounded_or_masked_as_trl():
    """A NaN sampler log-prob on a response token counts as no difference in both (``is_batch`` above holds one).
    An infinite difference gives an infinite ratio in both: the token (token modes) or the whole sequence (sequence
    modes) gets the clip bound (truncate) or 0 (mask); the metrics average the finite differences only."""
    trl = _trl()
    for bad in (np.inf, -np.inf):
        b = is_batch()
        b["samp"][1, 1] = bad
        for mode, (lo, hi) in IS_BOUNDS.items():
            w, metrics = correction64(b, mode, lo, hi)
            ratio = np.broadcast_to(trl.trl_grpo_vllm_importance_sampling_ratio(
                b["old"], b["samp"], b["mask"], vllm_importance_sampling_mode=mode,
                vllm_importance_sampling_clip_min=lo, vllm_importance_sampling_clip_max=hi), w.shape)
            trl_w = 0.0 if mode.endswith("mask") else (hi if bad == -np.inf else lo)  # old - samp = +-inf
            assert ratio[1, 1] == trl_w == w[1, 1], (bad, mode)
            m = b["mask"] > 0
            np.testing.assert_allclose(w[m], ratio[m], rtol=1e-12, err_msg=f"{bad} {mode}")
            assert all(np.isfinite(float(v)) for k, v in metrics.items() if k.startswith(("mismatch", "logp"))), mode


def test_sequence_level_kl_weighting_differs_from_trl():
    """With ``importance_sampling_level="sequence"`` TRL's ``use_bias_correction_kl`` multiplies the k3 term by the
    *sequence* ratio coef_1 = exp(mean_t log-ratio); ``kl_loss(old_logp_BT=...)`` always uses the token ratio. So
    TRL's GSPO + KL = jaxpost's gspo + beta * k3_t * s_i (s_i with its gradient), not gspo + kl_loss(old_logp_BT)."""
    trl = _trl()
    b = trl_batch(2)
    want = trl.trl_grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], loss_type="grpo", beta=0.04,
                             importance_sampling_level="sequence", ref_per_token_logps=b["ref"], **TRL_EPS)

    def seq_weighted(lp, old, ref, adv, mask):
        n = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
        s = jnp.exp(jnp.sum(jnp.where(mask > 0, lp - old, 0.0), -1, keepdims=True) / n)
        loss_BT = gspo(lp, old, adv, mask, **EPS)[0] + 0.04 * k3(lp, ref, mask) * s
        return aggregate_loss(loss_BT, mask, mode="seq_mean_token_mean",
                              denominator=loss_denominator(mask, mode="seq_mean_token_mean"))

    with jax.enable_x64(True):
        args = [f64(b[k]) for k in ("logp", "old", "ref", "adv", "mask")]
        v, g = jit(jax.value_and_grad(seq_weighted))(*args)
    assert_equals_trl((float(v), np.asarray(g), None), want, "sequence-ratio KL")
    token_weighted = ours64(b, "gspo", EPS, "seq_mean_token_mean", kl=(0.04, True))
    assert np.max(np.abs(token_weighted[1] - want["grad"])) > 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# 2. advantages against TRL


# 3 groups of 4: binary rewards, a group of equal rewards (advantage exactly 0), continuous rewards
REWARDS_12 = np.array([1.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3, 2.5, -1.0, 0.7, 0.1])


@pytest.mark.parametrize("G", [2, 4])
def test_rloo_advantages_equal_trl(G):
    trl = _trl()
    plain, norm = jcall(lambda x: (rloo(x, group_size=G), rloo(x, group_size=G, normalize=True)), f32(REWARDS_12))
    for got, normalize in ((plain, False), (norm, True)):
        for dtype in ("float64", "float32"):
            want = trl.trl_rloo_advantages(REWARDS_12, G, normalize_advantages=normalize, dtype=dtype)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"normalize={normalize} {dtype}")
    np.testing.assert_array_equal(plain[4:8], 0.0)
    assert abs(float(np.std(norm, ddof=1)) - 1.0) < 1e-3 and np.max(np.abs(norm - plain)) > 0.05


def test_grpo_advantages_equal_trl_sum_then_normalize():
    """Two reward functions weighted [1, 0.5], summed, then grpo(scale=..., eps=1e-4) = TRL's
    multi_objective_aggregation="sum_then_normalize" with scale_rewards group / batch / none."""
    trl = _trl()
    second = np.random.default_rng(30).uniform(0, 1, 12)
    second[4:8] = 0.6  # the second group stays constant
    per_func = np.stack([REWARDS_12, second], 1)
    weights = [1.0, 0.5]
    scales = ("group", "batch", "none")
    out = jcall(lambda x: [grpo(x, group_size=4, scale=s, eps=1e-4) for s in scales], f32(per_func @ weights))
    for scale, got in zip(scales, out):
        for dtype in ("float64", "float32"):
            want = trl.trl_grpo_advantages(per_func, 4, reward_weights=weights, scale_rewards=scale, dtype=dtype)
            np.testing.assert_allclose(got, want["advantages"], rtol=1e-5, atol=1e-6, err_msg=f"{scale} {dtype}")
        np.testing.assert_array_equal(got[4:8], 0.0)
    assert np.max(np.abs(out[0] - out[1])) > 0.1 and np.max(np.abs(out[1] - out[2])) > 0.1


def test_normalize_then_sum_reward_set_equals_trl():
    """``RewardSet(aggregation="normalize_then_sum")`` then ``grpo(scale="batch", eps=1e-4)`` = TRL's
    multi_objective_aggregation="normalize_then_sum" advantages (TRL computes in float32), with three functions on
    different scales, one of them constant within a group; "sum" + grpo(scale="group") = TRL's default."""
    trl = _trl()
    rng = np.random.default_rng(31)
    raw = {"correct": REWARDS_12 > 0.5, "format": rng.uniform(0, 1, 12), "length": rng.integers(10, 200, 12)}
    raw = {k: np.asarray(v, np.float64) for k, v in raw.items()}
    raw["format"][8:12] = 0.25  # constant within the last group: its z-score is 0 there
    weights = {"correct": 1.0, "format": 0.5, "length": 2.0}
    def reader(name):  # a reward function returning the example's raw value for `name`
        return lambda prompt, completion, **example: example[name]

    fns = {name: reader(name) for name in raw}
    examples = [{k: float(v[i]) for k, v in raw.items()} for i in range(12)]
    per_func = np.stack([raw[k] for k in fns], 1)
    w = [weights[k] for k in fns]
    results = {agg: RewardSet(fns, weights=weights, timeout_s=None, aggregation=agg)(
        ["prompt"] * 12, ["completion"] * 12, examples, group_size=4) for agg in ("normalize_then_sum", "sum")}
    for k in raw:
        np.testing.assert_array_equal(results["sum"].per_function[k], raw[k].astype(np.float32))
    adv_nts, adv_group, adv_sum = jcall(lambda t, s: (grpo(t, group_size=4, scale="batch", eps=1e-4),
                                                      grpo(t, group_size=4, scale="group", eps=1e-4),
                                                      grpo(s, group_size=4, scale="group", eps=1e-4)),
                                        f32(results["normalize_then_sum"].total), f32(results["sum"].total))
    for dtype in ("float32", "float64"):
        want = trl.trl_grpo_advantages(per_func, 4, reward_weights=w, multi_objective_aggregation="normalize_then_sum",
                                       dtype=dtype)
        np.testing.assert_allclose(results["normalize_then_sum"].total, want["rewards"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(adv_nts, want["advantages"], rtol=1e-5, atol=1e-5, err_msg=dtype)
        want_sum = trl.trl_grpo_advantages(per_func, 4, reward_weights=w, dtype=dtype)
        np.testing.assert_allclose(adv_sum, want_sum["advantages"], rtol=1e-5, atol=1e-5, err_msg=dtype)
    # the batch scaling matters: grpo's default per-group scaling of the aggregate would not be TRL's
    assert np.max(np.abs(adv_group - adv_nts)) > 0.05
    assert np.max(np.abs(adv_sum - adv_nts)) > 0.05


# ----------------------------------------------------------------------------------------------------------------------
# 3. by hand


LN2 = math.log(2.0)


def test_cispo_by_hand():
    # old = -1 on both tokens, A = 3; token 1: logp = -1 + ln 2 (ratio 2), token 2: logp = -1 - ln 2 (ratio 0.5)
    #   clip_max 1.5, clip_min 0.8: weights 1.5 and 0.8 (detached)
    #   loss = -w A logp: -4.5 (-1 + ln 2) = 4.5 (1 - ln 2) = 1.380838,  -2.4 (-1 - ln 2) = 2.4 (1 + ln 2) = 4.063553
    #   gradient -w A: [-4.5, -2.4]; without clip_min: token 2 keeps its weight 0.5, gradient -1.5
    lp, old, adv, m = f32([[-1 + LN2, -1 - LN2]]), f32([[-1.0, -1.0]]), f32([3.0]), jnp.ones((1, 2))

    def run(x):
        both = lambda y: cispo(y, old, adv, m, clip_max=1.5, clip_min=0.8)
        high = lambda y: cispo(y, old, adv, m, clip_max=1.5)
        return (both(x), jax.grad(lambda y: jnp.sum(both(y)[0]))(x), high(x)[1],
                jax.grad(lambda y: jnp.sum(high(y)[0]))(x))

    (loss, metrics), g, metrics_high, g_high = jcall(run, lp)
    np.testing.assert_allclose(loss, [[4.5 * (1 - LN2), 2.4 * (1 + LN2)]], rtol=1e-6)
    np.testing.assert_allclose(loss, [[1.380838, 4.063553]], rtol=1e-6)
    np.testing.assert_allclose(g, [[-4.5, -2.4]], rtol=1e-6)
    np.testing.assert_allclose(g_high, [[-4.5, -1.5]], rtol=1e-6)
    mm, mh = metric_means(metrics), metric_means(metrics_high)
    np.testing.assert_allclose([mm["clip_frac"], mm["clip_frac_high"], mm["clip_frac_low"]], [1.0, 0.5, 0.5])
    np.testing.assert_allclose([mh["clip_frac"], mh["clip_frac_high"], mh["clip_frac_low"]], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(mm["ratio"], 1.25, rtol=1e-6)


def test_sapo_by_hand():
    # l = -(4 / tau) sigmoid(tau (rho - 1)) A, gradient -A 4 sigma (1 - sigma) rho (per token, w.r.t. logp)
    #   rho = 1, A = +2, tau_pos = 1: sigma = 1/2, l = -4, gate 4 / 4 = 1, gradient -2 (REINFORCE's -A)
    #   rho = 2, A = +1, tau_pos = 1: l = -4 sigma(1) = -2.924234, gradient -8 sigma(1) (1 - sigma(1)) = -1.572895
    #   rho = 2, A = -1, tau_neg = 1.05: l = (4 / 1.05) sigma(1.05) = 2.822000,
    #                                    gradient 8 sigma(1.05) (1 - sigma(1.05)) = 1.536220
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    lp, old, adv = f32([[0.0, LN2, LN2]]), jnp.zeros((1, 3)), f32([[2.0, 1.0, -1.0]])
    m = jnp.ones((1, 3))
    f = lambda y: sapo(y, old, adv, m, tau_pos=1.0, tau_neg=1.05)
    (loss, metrics), g = jcall(lambda x: (f(x), jax.grad(lambda y: jnp.sum(f(y)[0]))(x)), lp)
    np.testing.assert_allclose(loss, [[-4.0, -4 * sig(1.0), 4 / 1.05 * sig(1.05)]], rtol=1e-6)
    np.testing.assert_allclose(loss, [[-4.0, -2.924234, 2.822000]], rtol=1e-6)
    np.testing.assert_allclose(g, [[-2.0, -8 * sig(1) * (1 - sig(1)), 8 * sig(1.05) * (1 - sig(1.05))]], rtol=1e-5)
    np.testing.assert_allclose(g, [[-2.0, -1.572895, 1.536220]], rtol=1e-5)
    gates = [1.0, 4 * sig(1) * (1 - sig(1)), 4 * sig(1.05) * (1 - sig(1.05))]
    np.testing.assert_allclose(metric_means(metrics)["gate"], np.mean(gates), rtol=1e-6)


def test_vespo_phi_by_hand():
    # two sequences of 2 tokens with log-ratios [0.1, 0.2]: log w = 0.3, w = e^0.3 = 1.349859
    #   A = +1 (k 2, lambda 3): phi = e^3 w^2 e^(-3 w) = exp(3 + 0.6 - 3 e^0.3) = 0.637898; gradient -phi per token
    #   A = -1 (k 3, lambda 2): phi = exp(2 + 0.9 - 2 e^0.3) = 1.221748; gradient +phi
    #   an IS weight 0.5 on the first token: log w = 0.3 + ln 0.5 = -0.393147, w = 0.674929,
    #     A = +1: phi = exp(3 - 0.786294 - 3 x 0.674929) = 1.207941
    #   on-policy (w = 1): phi(1) = e^lambda e^(-lambda) = 1
    w = math.exp(0.3)
    phi_pos, phi_neg = math.exp(3 + 0.6 - 3 * w), math.exp(2 + 0.9 - 2 * w)
    lp = f32([[-1.0, -2.0], [-1.0, -2.0]])
    old = lp - f32([[0.1, 0.2], [0.1, 0.2]])
    adv, m = f32([1.0, -1.0]), jnp.ones((2, 2))
    isw = f32([[0.5, 1.0], [1.0, 1.0]])

    def run(x):
        f = lambda y, **kw: vespo(y, old, adv, m, **kw)
        return (f(x), jax.grad(lambda y: jnp.sum(f(y)[0]))(x), f(x, is_weight_BT=isw)[0],
                vespo(x, x, adv, m)[0])

    (loss, metrics), g, loss_is, loss_on = jcall(run, lp)
    np.testing.assert_allclose([phi_pos, phi_neg], [0.637898, 1.221748], rtol=1e-6)
    np.testing.assert_allclose(g, [[-phi_pos, -phi_pos], [phi_neg, phi_neg]], rtol=1e-5)
    np.testing.assert_allclose(loss, [[phi_pos, 2 * phi_pos], [-phi_neg, -2 * phi_neg]], rtol=1e-5)
    np.testing.assert_allclose(metric_means(metrics)["phi"], (phi_pos + phi_neg) / 2, rtol=1e-5)
    log_w = 0.3 + math.log(0.5)
    phi_is = math.exp(3 + 2 * log_w - 3 * math.exp(log_w))
    np.testing.assert_allclose(phi_is, 1.207941, rtol=1e-6)
    np.testing.assert_allclose(loss_is[0], [phi_is, 2 * phi_is], rtol=1e-5)
    np.testing.assert_allclose(loss_on, [[1.0, 2.0], [-1.0, -2.0]], rtol=1e-6)  # phi = 1: -A logp


def test_rloo_seq_by_hand():
    # one sequence of 2 tokens, log-ratios [0.1, 0.2]: s = exp(0.1 + 0.2) = 1.349859 (the product of the token
    # ratios, not GSPO's geometric mean exp(0.15))
    #   A = +1, eps 0.2 / 0.28: s > 1.28, clipped: l = -1.28 on both tokens, no gradient
    #   A = +1, eps_high 0.5: l = -s; seq_mean_token_mean value -s, gradient d(-s)/d logp_t = -s on each token
    #   A = -1, eps 0.2 / 0.28: l = -min(-s, -1.28) = s (unclipped), gradient +s on each token
    s = math.exp(0.3)
    lp, old, m = f32([[0.1, 0.2]]), jnp.zeros((1, 2)), jnp.ones((1, 2))

    def run(x):
        out = []
        for adv, eh in ((1.0, 0.28), (1.0, 0.5), (-1.0, 0.28)):
            f = lambda y: rloo_seq(y, old, f32([adv]), m, eps_low=0.2, eps_high=eh)
            obj = lambda y: aggregate_loss(f(y)[0], m, mode="seq_mean_token_mean", denominator=1.0)
            out.append((f(x), jax.value_and_grad(obj)(x)))
        return out

    (clipped, (v0, g0)), (_, (v1, g1)), (_, (v2, g2)) = jcall(run, lp)
    np.testing.assert_allclose(clipped[0], [[-1.28, -1.28]], rtol=1e-6)
    np.testing.assert_allclose(v0, -1.28, rtol=1e-6)
    np.testing.assert_array_equal(g0, 0.0)
    mm = metric_means(clipped[1])
    np.testing.assert_allclose([mm["clip_frac_high"], mm["seq_ratio"]], [1.0, s], rtol=1e-6)
    np.testing.assert_allclose([v1, v2], [-s, s], rtol=1e-6)
    np.testing.assert_allclose(g1, [[-s, -s]], rtol=1e-6)
    np.testing.assert_allclose(g2, [[s, s]], rtol=1e-6)


def test_ppo_delta_clamp_by_hand():
    # ratios [2, 1.4, 2], advantages [-1, -1, +1], eps 0.2 / 0.28, delta 1.5:
    #   2.0, A=-1: max(min(2, 1.5), clip(2) = 1.28) = 1.5: bounded at delta |A|, no gradient (without delta: 2, grad 2)
    #   1.4, A=-1: max(1.4, 1.28) = 1.4 (below delta, unclipped: gradient rho = 1.4)
    #   2.0, A=+1: max(-1.5, -1.28) = -1.28 (clipped high as without delta, no gradient)
    lp, old = jnp.log(f32([[2.0, 1.4, 2.0]])), jnp.zeros((1, 3))
    adv, m = f32([[-1.0, -1.0, 1.0]]), jnp.ones((1, 3))

    def run(x):
        out = []
        for delta in (1.5, None):
            f = lambda y: ppo_clip(y, old, adv, m, eps_low=0.2, eps_high=0.28, delta=delta)
            out.append((f(x), jax.grad(lambda y: jnp.sum(f(y)[0]))(x)))
        return out

    ((loss, metrics), g), ((loss_nd, _), g_nd) = jcall(run, lp)
    np.testing.assert_allclose(loss, [[1.5, 1.4, -1.28]], rtol=1e-6)
    np.testing.assert_allclose(g, [[0.0, 1.4, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss_nd, [[2.0, 1.4, -1.28]], rtol=1e-6)
    np.testing.assert_allclose(g_nd, [[2.0, 1.4, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metric_means(metrics)["clip_frac_delta"], 2 / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="delta"):
        ppo_clip(lp, old, adv, m, delta=1.0)


def test_reinforce_returns_by_hand():
    # rewards [1, 0, 2, 1] and two masked rows (holding inf and 5): mean 1, deviations [0, -1, 1, 0], sum of squares 2
    #   normalize=False: A = r (masked rows 0)
    #   ddof 1: std sqrt(2 / 3) = 0.816497, A = deviations / (0.816497 + 1e-4)
    #   ddof 0, eps 0: std sqrt(1 / 2) = 0.707107, A = deviations / 0.707107
    r, keep = f32([1.0, 0.0, 2.0, 1.0, np.inf, 5.0]), f32([1, 1, 1, 1, 0, 0])
    plain, norm, norm0 = jcall(lambda x: (
        reinforce_returns(x, group_size=2, mask_B=keep),
        reinforce_returns(x, group_size=2, mask_B=keep, normalize=True),
        reinforce_returns(x, group_size=2, mask_B=keep, normalize=True, ddof=0, eps=0.0)), r)
    np.testing.assert_array_equal(plain, [1.0, 0.0, 2.0, 1.0, 0.0, 0.0])
    dev = np.array([0.0, -1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(norm, dev / (math.sqrt(2 / 3) + 1e-4), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(norm0, dev / math.sqrt(0.5), rtol=1e-6, atol=1e-7)


def test_rollout_correction_metrics_by_hand():
    # row 0: old [-1, -2, pad], sampler [-1.1, -1.8, pad] -> d = old - sampler = [0.1, -0.2]
    # row 1: old [-0.6, pad, pad], sampler [-1.0, pad, pad] -> d = [0.4]        (3 response tokens)
    #   mismatch_k1 = mean(sampler - old) = (-0.1 + 0.2 - 0.4) / 3 = -0.1
    #   mismatch_k3 = mean(expm1(d) - d) = (0.0051709 + 0.0187308 + 0.0918247) / 3 = 0.0385755
    #   logp_diff_mean = (0.1 + 0.2 + 0.4) / 3 = 0.233333, logp_diff_max = 0.4
    #   token weights e^d = [1.105171, 0.818731, 1.491825]; bounds [0.9, 1.2]:
    #     truncate [1.105171, 0.9, 1.2], mask [1.105171, 0, 0]; is_clipped_frac 2/3, is_weight_mean 1.138575
    #   sequence weights e^(sum d) = [e^-0.1, e^0.4] = [0.904837, 1.491825]:
    #     truncate [0.95, 1.2] -> both clipped (frac 1); mask with clip_min None, clip_max 1.2 -> [0.904837, 0]
    #     (frac 1/2); is_weight_mean (0.904837 + 1.491825) / 2 = 1.198331
    old = f32([[-1.0, -2.0, 5.0], [-0.6, 9.0, -jnp.inf]])
    samp = f32([[-1.1, -1.8, jnp.nan], [-1.0, 3.0, 7.0]])
    m = f32([[1, 1, 0], [1, 0, 0]])
    bounds = {"none": (None, None), "token_truncate": (0.9, 1.2), "token_mask": (0.9, 1.2),
              "sequence_truncate": (0.95, 1.2), "sequence_mask": (None, 1.2)}
    out = jcall(lambda o, s: {mode: rollout_correction(o, s, m, mode=mode, clip_min=lo, clip_max=hi)
                              for mode, (lo, hi) in bounds.items()}, old, samp)
    e = math.exp
    k3s = [math.expm1(d) - d for d in (0.1, -0.2, 0.4)]
    for mode, (w, metrics) in out.items():
        np.testing.assert_allclose([metrics[k] for k in ("mismatch_k1", "mismatch_k3", "logp_diff_mean",
                                                        "logp_diff_max")],
                                   [-0.1, sum(k3s) / 3, 0.7 / 3, 0.4], rtol=1e-5, err_msg=mode)
        np.testing.assert_array_equal(np.asarray(w)[np.asarray(m) == 0], 1.0)
    np.testing.assert_array_equal(out["none"][0], 1.0)
    want = {"token_truncate": ([[e(0.1), 0.9], [1.2]], 2 / 3, (e(0.1) + e(-0.2) + e(0.4)) / 3),
            "token_mask": ([[e(0.1), 0.0], [0.0]], 2 / 3, (e(0.1) + e(-0.2) + e(0.4)) / 3),
            "sequence_truncate": ([[0.95, 0.95], [1.2]], 1.0, (e(-0.1) + e(0.4)) / 2),
            "sequence_mask": ([[e(-0.1), e(-0.1)], [0.0]], 0.5, (e(-0.1) + e(0.4)) / 2)}
    for mode, ((row0, row1), frac, mean) in want.items():
        w, metrics = out[mode]
        np.testing.assert_allclose(w[0, :2], row0, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(w[1, :1], row1, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(metrics["is_clipped_frac"], frac, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(metrics["is_weight_mean"], mean, rtol=1e-6, err_msg=mode)
    np.testing.assert_allclose([out["token_mask"][1]["is_weight_min"], out["token_mask"][1]["is_weight_max"]],
                               [e(-0.2), e(0.4)], rtol=1e-6)
    np.testing.assert_allclose([out["sequence_mask"][1]["is_weight_min"], out["sequence_mask"][1]["is_weight_max"]],
                               [e(-0.1), e(0.4)], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# 4. the importance-weighted KL: exact expectations over a categorical distribution


def test_importance_weighted_kl_expectations_over_a_categorical():
    """kl_loss(..., old_logp_BT=old) = k3 * rho with rho = pi / old (differentiable). Exact sums over the 6 outcomes:
    * samples from pi itself (old = sg(pi)): E_pi[k3 rho] = KL(pi || ref) and its gradient is grad KL(pi || ref),
      whereas plain k3 in the loss gives grad KL(ref || pi) (the forward KL);
    * samples from another policy q (old = q): E_q[k3 rho] = E_pi[k3] = KL(pi || ref) and its gradient is
      grad KL(pi || ref) too; plain k3 under q estimates something else."""
    rng = np.random.default_rng(7)
    theta, log_ref, log_q = f32(rng.normal(size=6)), jax.nn.log_softmax(f32(rng.normal(size=6))), \
        jax.nn.log_softmax(f32(rng.normal(size=6)))
    ones = jnp.ones((1, 6))

    def expected(th, sampler, weighted):
        log_pi = jax.nn.log_softmax(th)
        log_s = jax.lax.stop_gradient(log_pi) if sampler == "pi" else log_q
        old = log_s[None] if weighted else None
        per_sample = kl_loss(log_pi[None], log_ref[None], ones, beta=1.0, old_logp_BT=old)[0]
        return jnp.sum(jnp.exp(log_s) * per_sample)

    reverse = lambda th: jnp.sum(jax.nn.softmax(th) * (jax.nn.log_softmax(th) - log_ref))
    forward = lambda th: jnp.sum(jnp.exp(log_ref) * (log_ref - jax.nn.log_softmax(th)))

    def run(th):
        cases = {(s, w): jax.value_and_grad(expected)(th, s, w) for s in ("pi", "q") for w in (True, False)}
        return cases, jax.value_and_grad(reverse)(th), jax.grad(forward)(th)

    cases, (kl, g_rev), g_fwd = jcall(run, theta)
    assert float(jnp.max(jnp.abs(g_rev - g_fwd))) > 1e-2  # the two gradients really differ here
    for sampler in ("pi", "q"):
        v, g = cases[sampler, True]
        np.testing.assert_allclose(v, kl, rtol=1e-5, err_msg=sampler)
        np.testing.assert_allclose(g, g_rev, rtol=1e-4, atol=1e-6, err_msg=sampler)
    v, g = cases["pi", False]  # plain k3, on-policy: the right value, the forward-KL gradient
    np.testing.assert_allclose(v, kl, rtol=1e-5)
    np.testing.assert_allclose(g, g_fwd, rtol=1e-4, atol=1e-6)
    v, g = cases["q", False]  # plain k3 under q: neither the value nor the gradient of KL(pi || ref)
    assert abs(float(v) - float(kl)) > 1e-2 * float(kl)
    assert float(jnp.max(jnp.abs(g - g_rev))) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# 5. micro-batch and device splits, padding garbage, bfloat16


INV_CASES = {
    "cispo": ("cispo", dict(clip_max=1.1, clip_min=0.95)),
    "sapo": ("sapo", dict(tau_pos=1.0, tau_neg=1.05)),
    "vespo": ("vespo", {}),
    "luspo": ("luspo", dict(eps_low=0.01, eps_high=0.012)),
    "rloo_seq": ("rloo_seq", dict(eps_low=0.2, eps_high=0.28)),
    "ppo_delta": ("ppo", dict(eps_low=0.05, eps_high=0.05, delta=1.1)),
    "gspo": ("gspo", dict(eps_low=0.01, eps_high=0.012)),
}
INV_KEYS = [f"{case}/{mode}" for case in INV_CASES for mode in MODES]


def inv_batch(seed):
    """rl_batch (8 rows, one empty, N(0, 50) garbage beyond the mask) + rollout-correction weights: some tokens
    masked out (0), the others in [0.5, 1.5], finite garbage (up to 100) on padding."""
    b = rl_batch(seed)
    rng = np.random.default_rng(seed + 100)
    m = np.asarray(b["mask"])
    isw = rng.uniform(0.5, 1.5, m.shape) * (rng.random(m.shape) > 0.15)
    isw[m == 0] = rng.uniform(0, 100, int((m == 0).sum()))
    b["isw"] = f32(isw)
    b["samp"] = f32(np.asarray(b["old"]) + rng.normal(0, 0.2, m.shape))
    return b


def _dens(mask):
    return jnp.stack([loss_denominator(mask, mode=mode, max_length=MAX_LEN) for mode in MODES])


def _inv_all(logp, old, ref, adv_B, adv_BT, isw, mask, dens):
    """{case/mode: (contribution, gradient)} of one micro-batch: policy loss with rollout-correction weights + the
    importance-weighted KL, aggregated with the global denominators ``dens``."""
    out = {}
    for case, (name, hyper) in INV_CASES.items():
        adv = adv_B if name in SEQUENCE_FORM else adv_BT
        for i, mode in enumerate(MODES):
            def f(lp, name=name, hyper=hyper, adv=adv, i=i, mode=mode):
                loss_BT = get_policy_loss(name)(lp, old, adv, mask, is_weight_BT=isw, **hyper)[0]
                loss_BT = loss_BT + kl_loss(lp, ref, mask, beta=0.04, old_logp_BT=old)
                return aggregate_loss(loss_BT, mask, mode=mode, denominator=dens[i])
            out[f"{case}/{mode}"] = jax.value_and_grad(f)(logp)
    return out


_inv_all_jit = jit(_inv_all)
INV_ARGS = ("logp", "old", "ref", "adv_B", "adv_BT", "isw", "mask")


def inv_split(b, bounds):
    dens = sum(_dens(b["mask"][lo:hi]) for lo, hi in bounds)
    parts = [_inv_all_jit(*(b[k][lo:hi] for k in INV_ARGS), dens) for lo, hi in bounds]
    return {k: (sum(p[k][0] for p in parts), jnp.concatenate([p[k][1] for p in parts])) for k in INV_KEYS}


def test_variants_invariant_to_micro_batch_split():
    """Every new loss (with rollout-correction weights and the importance-weighted KL), every aggregation: 2 equal
    and 3 uneven micro-batches give the full-batch loss and gradient."""
    b = inv_batch(40)
    full = inv_split(b, [(0, 8)])
    m = np.asarray(b["mask"])
    for key in INV_KEYS:
        v, g = full[key]
        assert np.isfinite(float(v)) and float(jnp.max(jnp.abs(g))) > 0, key
        np.testing.assert_array_equal(np.asarray(g)[m == 0], 0.0)
    for bounds in ([(0, 4), (4, 8)], [(0, 2), (2, 6), (6, 8)]):
        split = inv_split(b, bounds)
        for key in INV_KEYS:
            np.testing.assert_allclose(split[key][0], full[key][0], rtol=1e-5, atol=1e-7, err_msg=f"{key} {bounds}")
            np.testing.assert_allclose(split[key][1], full[key][1], rtol=1e-5, atol=1e-8, err_msg=f"{key} {bounds}")


def test_variants_on_eight_devices_with_psum_equal_the_full_batch():
    """Data parallelism over 8 emulated devices, one row each (so devices hold 0 to 6 response tokens): each device
    psums its denominators, computes its contribution and gradient; the psum of the contributions and the gathered
    gradients equal the full batch, for every new loss and aggregation."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    b = inv_batch(41)

    def per_device(*args):
        dens = jax.lax.psum(_dens(args[-1]), "data")
        return {k: (jax.lax.psum(v, "data"), g) for k, (v, g) in _inv_all(*args, dens).items()}

    sharded = jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"),) * len(INV_ARGS),
                                out_specs={k: (P(), P("data")) for k in INV_KEYS}))
    got = sharded(*(b[k] for k in INV_ARGS))
    full = inv_split(b, [(0, 8)])
    for key in INV_KEYS:
        np.testing.assert_allclose(got[key][0], full[key][0], rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(got[key][1], full[key][1], rtol=1e-5, atol=1e-8, err_msg=key)


def test_padding_garbage_changes_nothing():
    """Three padding columns holding 1e30 (log-probs, advantages, IS weights), -inf (old log-probs), NaN (reference
    and sampler log-probs) change neither the losses nor the gradients of the real tokens, give exactly zero
    gradients themselves, and leave the rollout-correction weights (1 on padding) and metrics alone."""
    b = inv_batch(42)
    pad = lambda x, v: jnp.concatenate([x, jnp.full((x.shape[0], 3), v, x.dtype)], axis=1)
    corr = {"token_truncate": (0.8, 1.2), "token_mask": (0.8, 1.2), "sequence_truncate": (0.7, 1.3),
            "sequence_mask": (None, 1.3)}

    @jit
    def run(logp, old, ref, adv_BT, isw, mask, samp):
        return (_inv_all(logp, old, ref, b["adv_B"], adv_BT, isw, mask, _dens(mask)),
                {mode: rollout_correction(old, samp, mask, mode=mode, clip_min=lo, clip_max=hi)
                 for mode, (lo, hi) in corr.items()})

    keys = ("logp", "old", "ref", "adv_BT", "isw", "mask", "samp")
    garbage = {"logp": 1e30, "old": -jnp.inf, "ref": jnp.nan, "adv_BT": 1e30, "isw": 1e30, "mask": 0.0,
               "samp": jnp.nan}
    plain_l, plain_c = run(*(b[k] for k in keys))
    padded_l, padded_c = run(*(pad(b[k], garbage[k]) for k in keys))
    for key in INV_KEYS:
        (v0, g0), (v1, g1) = plain_l[key], padded_l[key]
        np.testing.assert_allclose(v1, v0, rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(g1[:, :-3], g0, rtol=1e-6, atol=1e-9, err_msg=key)
        np.testing.assert_array_equal(g1[:, -3:], 0.0)
    for mode in corr:
        (w0, m0), (w1, m1) = plain_c[mode], padded_c[mode]
        np.testing.assert_allclose(w1[:, :-3], w0, rtol=1e-6, err_msg=mode)
        np.testing.assert_array_equal(w1[:, -3:], 1.0)
        for k in m0:
            np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, err_msg=f"{mode} {k}")
        assert 0.0 < float(m0["is_clipped_frac"]) < 1.0, mode


def test_bfloat16_inputs_compute_in_float32():
    """bfloat16 inputs: every new loss, its metrics, the importance-weighted KL and the rollout correction are
    float32, equal to the results on the same values upcast to float32."""
    b = inv_batch(43)
    bf = {k: v.astype(jnp.bfloat16) for k, v in b.items()}
    up = {k: v.astype(jnp.float32) for k, v in bf.items()}

    def run(d):
        out = {}
        for case, (name, hyper) in INV_CASES.items():
            adv = d["adv_B"] if name in SEQUENCE_FORM else d["adv_BT"]
            out[case] = get_policy_loss(name)(d["logp"], d["old"], adv, d["mask"], is_weight_BT=d["isw"], **hyper)
        out["kl"] = kl_loss(d["logp"], d["ref"], d["mask"], beta=0.04, old_logp_BT=d["old"])
        for mode in ("token_truncate", "sequence_mask"):
            out[mode] = rollout_correction(d["old"], d["samp"], d["mask"], mode=mode, clip_min=0.8, clip_max=1.25)
        return out

    got, want = jcall(lambda x, y: (run(x), run(y)), bf, up)
    leaves = jax.tree.leaves(got)
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    for x, y in zip(leaves, jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# robustness: non-finite values on masked tokens never reach a gradient


def _nan_probe(pad_key, pad_value):
    """Per loss, the gradient of the token_mean objective when one padding position of `pad_key` holds
    `pad_value` (the other inputs are clean)."""
    lp, old, m = f32([[-1.0, -2.0, -1.0]]), f32([[-1.1, -1.5, -1.0]]), f32([[1, 1, 0]])
    adv_BT, isw = f32([[1.0, -0.5, 0.0]]), f32([[0.9, 1.2, 1.0]])
    if pad_key == "isw":
        isw = isw.at[0, 2].set(pad_value)
    else:
        adv_BT = adv_BT.at[0, 2].set(pad_value)

    def run(x):
        out = {}
        for name in ("ppo", "gspo", "gspo_seq", "luspo", "rloo_seq", "reinforce", "cispo", "sapo", "vespo"):
            adv = f32([1.0]) if name in SEQUENCE_FORM else adv_BT
            f = lambda y: aggregate_loss(get_policy_loss(name)(y, old, adv, m, is_weight_BT=isw)[0], m,
                                         mode="token_mean", denominator=2.0)
            out[name] = jax.grad(f)(x)
        return out

    return jcall(run, lp)


def test_nonfinite_is_weight_on_padding_leaves_gradients_finite():
    bad = {name: np.asarray(g) for name, g in _nan_probe("isw", np.inf).items() if not np.all(np.isfinite(g))}
    assert not bad, bad


def test_nonfinite_advantage_on_padding_leaves_gradients_finite():
    bad = {name: np.asarray(g) for name, g in _nan_probe("adv", np.inf).items() if not np.all(np.isfinite(g))}
    assert not bad, bad
