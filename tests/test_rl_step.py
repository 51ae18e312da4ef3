"""The RL update step: ratio 1 and no clipping at the first update (the step's gradient is REINFORCE's), loss and
gradient invariant to the micro-batch split for every aggregation mode, sharded == single device (GRPO and PPO with
a value head or a critic), the scoring pass and the advantages of a whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.losses import aggregate_loss, grpo, loss_denominator
from jaxpost.batch import split_microbatches
from jaxpost.config import AdvantageConfig, RLLossConfig
from jaxpost.train.rl import PolicyGradient, PolicyModel, batch_keys, compute_advantages, make_rl_scorer
from jaxpost.train.step import make_step, step_fn
from jaxpost.train.state import TrainState, abstract_train_state, state_shardings
from tests.helpers import cached_lm, max_abs_diff, mesh_of, single_device_mesh, tiny_config

V = 128
G = 4


def rollout_rows(rng, R: int, T: int, *, prompt_len: int = 4) -> dict:
    """R rows of prompt + completion (one sample per row, right-padded), loss_mask on the completion targets."""
    inputs = rng.integers(3, V, (R, T)).astype(np.int32)
    for g in range(0, R, G):  # a group shares its prompt
        inputs[g:g + G, :prompt_len] = inputs[g, :prompt_len]
    lengths = rng.integers(prompt_len + 2, T + 1, R)
    lengths[1] = prompt_len + 1  # a completion of one token
    seg = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], np.zeros((R, 1), np.int32)], axis=1)
    loss_mask = (np.arange(T)[None, :] >= prompt_len - 1) & (np.arange(T)[None, :] < lengths[:, None] - 1)
    return dict(inputs=inputs * seg, targets=targets * seg, loss_mask=loss_mask.astype(np.float32),
                segment_ids=seg, positions=(np.arange(T)[None, :] * seg).astype(np.int32))


def make_state(model, params, tx, mesh=None, seed=0):
    key = jax.random.PRNGKey(seed)
    full = model.from_policy(params, key)

    def make(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=key)

    if mesh is None:
        return make(full), None
    abstract = abstract_train_state(model, tx)
    sh = state_shardings(abstract, model.param_shardings(mesh), tx, mesh)
    return jax.jit(make, out_shardings=sh)(full), sh


def full_batch(model, state_params, rows, loss_cfg: RLLossConfig, *, ref_params=None, seed=0,
               estimator="grpo"):
    """Old log-probs from the scoring pass of `state_params`, advantages from random 0/1 rewards."""
    R = rows["inputs"].shape[0]
    mesh = single_device_mesh()
    scorer = make_rl_scorer(model, mesh, model.param_shardings(mesh), rows=R, temperature=1.0,
                            with_ref=ref_params is not None)
    scored = jax.device_get(scorer(state_params, ref_params, rows))
    rewards = np.random.default_rng(seed).integers(0, 2, R).astype(np.float32)
    adv, ret, _ = compute_advantages(rewards, rows["loss_mask"], np.ones(R, np.float32), scored["logp"],
                                     scored.get("ref_logp", scored["logp"]),
                                     scored.get("values", np.zeros_like(rows["loss_mask"])),
                                     cfg=AdvantageConfig(estimator=estimator), group_size=G)
    batch = {**rows, "old_logp": scored["logp"], "advantages": np.asarray(adv)}
    if loss_cfg.kl_in_loss:
        batch["ref_logp"] = scored["ref_logp"]
    if model.value != "none":
        batch["old_values"] = scored["values"]
        batch["returns"] = np.asarray(ret) if ret is not None else np.asarray(adv) + scored["values"]
    return {k: batch[k] for k in batch_keys(model, loss_cfg)}, scored


def perturbed(params, scale=0.05, seed=3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_first_update_has_ratio_one_no_clipping_and_the_reinforce_gradient():
    lm, params = cached_lm(tiny_config())
    model = PolicyModel(lm)
    loss_cfg = RLLossConfig(eps_low=0.2, eps_high=0.28)
    tx = optax.sgd(1.0)
    state, _ = make_state(model, params, tx)
    rows = rollout_rows(np.random.default_rng(0), 8, 12)
    batch, _ = full_batch(model, state.params, rows, loss_cfg)
    step = jax.jit(step_fn(model, tx, optax.constant_schedule(1.0), PolicyGradient(model, loss_cfg)))
    new, m = step(state, split_microbatches(batch, 1))
    assert abs(float(m["ratio"]) - 1.0) < 1e-6
    assert float(m["clip_frac"]) == 0.0 and abs(float(m["approx_kl"])) < 1e-9

    # With old == new the PPO gradient is REINFORCE's: -sum_t A_t grad logp_t / (response tokens).
    def reinforce(p):
        h = lm.hidden(p["policy"], rows["inputs"], rows["positions"], rows["segment_ids"])
        logp = lm.token_logprobs(p["policy"], h, rows["targets"]).logp
        denom = loss_denominator(rows["loss_mask"], mode="token_mean")
        return aggregate_loss(-batch["advantages"] * logp, rows["loss_mask"], mode="token_mean", denominator=denom)

    grads = jax.grad(reinforce)(state.params)
    expected = jax.tree.map(lambda p, g: p - g, state.params, grads)
    assert max_abs_diff(new.params, expected) < 1e-6
    # its value is -A * ratio = -A per token
    m_ = rows["loss_mask"]
    np.testing.assert_allclose(float(m["loss"]), -np.sum(batch["advantages"] * m_) / np.sum(m_), rtol=1e-5,
                               atol=1e-7)


# (every aggregation mode is also checked against 1/2/4/uneven micro-batches at the loss level, test_rl_losses.py)
@pytest.mark.parametrize("policy_loss, aggregation", [("ppo", "token_mean"), ("ppo", "seq_mean_token_sum_norm"),
                                                       ("gspo_seq", "seq_mean_token_mean")])
def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(policy_loss, aggregation):
    lm, params = cached_lm(tiny_config())
    model = PolicyModel(lm, value="head")
    kw = {"eps_low": 0.2, "eps_high": 0.28} if policy_loss == "ppo" else {}
    loss_cfg = RLLossConfig(policy_loss=policy_loss, aggregation=aggregation, max_length=10, kl_coef=0.05,
                            entropy_coef=0.01, vf_coef=0.5, **kw)
    tx = optax.sgd(1.0)
    state, _ = make_state(model, params, tx)
    rows = rollout_rows(np.random.default_rng(1), 8, 12)
    rows["loss_mask"][5] = 0.0  # a row without response tokens (a padding row) changes nothing
    # old log-probs from other params: ratios differ from 1 and some tokens clip
    ref = perturbed(params, 0.05, seed=4)
    batch, _ = full_batch(model, model.from_policy(perturbed(params, 0.02), jax.random.PRNGKey(1)), rows,
                          loss_cfg, ref_params=ref, estimator="grpo")
    step = jax.jit(step_fn(model, tx, optax.constant_schedule(1.0), PolicyGradient(model, loss_cfg)))
    results = [step(state, split_microbatches(batch, a)) for a in (1, 4)]
    (p1, m1) = results[0]
    for p, m in results[1:]:
        assert max_abs_diff(p.params, p1.params) < 2e-6
        for k in ("loss", "pg_loss", "vf_loss", "ratio", "entropy", "kl_ref"):
            np.testing.assert_allclose(float(m[k]), float(m1[k]), rtol=1e-5, atol=1e-7)
    assert float(m1["kl_ref"]) > 0


@pytest.mark.parametrize("value", ["none", "critic"])  # (the value head is in the micro-batch test)
def test_sharded_step_equals_single_device(value):
    lm, params = cached_lm(tiny_config())
    model = PolicyModel(lm, value=value)
    loss_cfg = RLLossConfig(eps_low=0.2, eps_high=0.28, kl_coef=0.02, entropy_coef=0.01)
    tx = optax.sgd(0.5, momentum=0.9)  # (Adam's g / sqrt(v) would amplify float noise on near-zero gradients)
    rows = rollout_rows(np.random.default_rng(2), 16, 12)
    estimator = "gae" if value != "none" else "grpo"
    src = model.from_policy(perturbed(params, 0.02), jax.random.PRNGKey(1))
    batch, _ = full_batch(model, src, rows, loss_cfg, ref_params=perturbed(params, 0.05, seed=4),
                          estimator=estimator)
    out = {}
    for name, mesh in (("one", single_device_mesh()), ("2x2x2", mesh_of(2, 2, 2))):
        state, sh = make_state(model, params, tx, mesh)
        step = make_step(model, tx, optax.constant_schedule(0.5), PolicyGradient(model, loss_cfg),
                         mesh=mesh, state_shardings=sh, units=16, grad_accum=2)
        mb = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in split_microbatches(batch, 2).items()}
        state, m = step(state, mb)
        state, m = step(state, mb)  # a second step: the optimizer state is sharded and reused
        out[name] = (jax.device_get(state.params), jax.device_get(m))
    assert max_abs_diff(out["one"][0], out["2x2x2"][0]) < 1e-5
    for k, v in out["one"][1].items():
        np.testing.assert_allclose(float(out["2x2x2"][1][k]), float(v), rtol=2e-4, atol=1e-6, err_msg=k)


def test_value_modes_hold_the_expected_params_and_start_at_zero():
    lm, params = cached_lm(tiny_config())
    head, critic = PolicyModel(lm, value="head"), PolicyModel(lm, value="critic")
    ph = head.from_policy(params, jax.random.PRNGKey(0))
    pc = critic.from_policy(params, jax.random.PRNGKey(0))
    assert set(ph["value"]) == {"head"} and set(pc["value"]) == {"lm", "head"}
    assert max_abs_diff(pc["value"]["lm"], params) == 0.0
    # a real copy: no leaf of the critic shares the policy's buffer (the state is donated)
    assert all(a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
               for a, b in zip(jax.tree.leaves(pc["value"]["lm"]), jax.tree.leaves(params)))
    rows = rollout_rows(np.random.default_rng(0), 4, 10)
    for model, p in ((head, ph), (critic, pc)):
        h = lm.hidden(p["policy"], rows["inputs"], rows["positions"], rows["segment_ids"])
        np.testing.assert_array_equal(np.asarray(model.values(p, rows, h)), 0.0)
    with pytest.raises(ValueError, match="value must be one of"):
        PolicyModel(lm, value="shared")


def test_critic_gradient_does_not_reach_the_policy_and_the_head_one_does():
    lm, params = cached_lm(tiny_config())
    rows = rollout_rows(np.random.default_rng(3), 8, 12)
    for value in ("head", "critic"):
        model = PolicyModel(lm, value=value)
        # policy loss off (zero advantages): only the value loss trains
        loss_cfg = RLLossConfig(vf_coef=1.0)
        tx = optax.sgd(1.0)
        state, _ = make_state(model, params, tx)
        # a non-zero head (at w = 0 no gradient reaches the hidden states through it)
        head = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(5), (lm.cfg.d_model,)), "b": jnp.zeros((1,))}
        state = state.replace(params={**state.params, "value": {**state.params["value"], "head": head}})
        batch, _ = full_batch(model, state.params, rows, loss_cfg)
        batch["advantages"] = np.zeros_like(batch["advantages"])
        batch["returns"] = np.ones_like(batch["returns"])
        new, m = jax.jit(step_fn(model, tx, optax.constant_schedule(1.0), PolicyGradient(model, loss_cfg)))(
            state, split_microbatches(batch, 1))
        v = np.asarray(model.values(state.params, rows, lm.hidden(params, rows["inputs"], rows["positions"],
                                                                   rows["segment_ids"])))
        mask = rows["loss_mask"]
        np.testing.assert_allclose(float(m["vf_loss"]), np.sum(0.5 * (v - 1) ** 2 * mask) / np.sum(mask), rtol=1e-5)
        moved = max_abs_diff(new.params["policy"], state.params["policy"])
        assert (moved == 0.0) == (value == "critic"), (value, moved)
        assert max_abs_diff(new.params["value"]["head"], state.params["value"]["head"]) > 0


def test_scoring_pass_matches_the_sampler_convention_and_the_reference():
    lm, params = cached_lm(tiny_config())
    model = PolicyModel(lm)
    mesh = single_device_mesh()
    rows = rollout_rows(np.random.default_rng(4), 8, 12)
    for T in (1.0, 0.7):
        scorer = make_rl_scorer(model, mesh, model.param_shardings(mesh), rows=8, temperature=T, with_ref=True)
        out = jax.device_get(scorer({"policy": params}, params, rows))
        logits = np.asarray(lm.logits(params, rows["inputs"], rows["positions"], rows["segment_ids"]), np.float64)
        logp_all = logits / T - np.log(np.sum(np.exp(logits / T - (logits / T).max(-1, keepdims=True)), -1,
                                              keepdims=True)) - (logits / T).max(-1, keepdims=True)
        expected = np.take_along_axis(logp_all, rows["targets"][..., None], -1)[..., 0]
        np.testing.assert_allclose(out["logp"], expected, atol=2e-5)
        np.testing.assert_allclose(out["ref_logp"], out["logp"], atol=1e-6)
        p = np.exp(logp_all)
        np.testing.assert_allclose(out["entropy"], -np.sum(p * logp_all, -1), atol=2e-5)


def test_advantages_of_a_batch_follow_the_estimators_and_put_the_kl_in_the_reward():
    R, T = 8, 6
    rng = np.random.default_rng(5)
    mask = np.ones((R, T), np.float32)
    mask[:, 4:] = 0
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
    row_mask = np.ones(R, np.float32)
    logp = rng.normal(-2, 0.3, (R, T)).astype(np.float32)
    ref = rng.normal(-2, 0.3, (R, T)).astype(np.float32)
    adv, ret, used = compute_advantages(rewards, mask, row_mask, logp, ref, cfg=AdvantageConfig(), group_size=G)
    assert ret is None
    # group 1 = [1, 0, 0, 1]: mean 0.5, std (ddof 1) = sqrt(1/3); group 2 all equal -> 0
    a = 0.5 / (np.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv)[:, 4:], 0.0)
    # negative_scale multiplies only the negative advantages: 0.25 -> [a, -a/4, -a/4, a]; 0 keeps the positive part
    for scale in (0.25, 0.0):
        adv_s, _, _ = compute_advantages(rewards, mask, row_mask, logp, ref, cfg=AdvantageConfig(negative_scale=scale),
                                         group_size=G)
        np.testing.assert_allclose(np.asarray(adv_s)[:, 0], [a, -scale * a, -scale * a, a, 0, 0, 0, 0], rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(adv_s)[:, 4:], 0.0)
    with pytest.raises(ValueError, match="negative_scale"):
        AdvantageConfig(negative_scale=-1.0)
    # KL in the reward (k1): r - beta * sum_t (logp - ref) over the response, before the group statistics
    beta = 0.1
    adv_kl, _, used = compute_advantages(rewards, mask, row_mask, logp, ref, cfg=AdvantageConfig(), group_size=G,
                                         kl_coef=beta, kl_estimator="k1")
    shaped = rewards - beta * np.sum((logp - ref) * mask, -1)
    np.testing.assert_allclose(np.asarray(used), shaped, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(adv_kl)[:, 0], np.asarray(grpo(jnp.asarray(shaped), group_size=G)),
                               rtol=1e-4, atol=1e-6)
    # padding rows take no part: masking group 2 leaves group 1's advantages unchanged
    adv_m, _, _ = compute_advantages(rewards, mask, np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32), logp, ref,
                                     cfg=AdvantageConfig(), group_size=G)
    np.testing.assert_allclose(np.asarray(adv_m)[:4], np.asarray(adv)[:4], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(adv_m)[4:], 0.0)
    # gae with gamma = lam = 1 and zero values: the return of every response token is the outcome reward
    adv_g, ret_g, _ = compute_advantages(rewards, mask, row_mask, logp, ref, np.zeros((R, T), np.float32),
                                         cfg=AdvantageConfig(estimator="gae", gamma=1.0, lam=1.0, whiten=False),
                                         group_size=G)
    np.testing.assert_allclose(np.asarray(ret_g), rewards[:, None] * mask, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv_g), rewards[:, None] * mask, rtol=1e-6)
