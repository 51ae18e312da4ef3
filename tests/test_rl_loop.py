"""The RL host loop: reward functions (failures and timeouts scored 0 and counted), the prompt pipeline (resumable,
errors named), the iteration (sampler and trainer agree: ratio 1 and no clipping at the first update; dynamic
sampling), a tiny end-to-end run that raises the reward, and the recipe resumed after a preemption."""

import json
import os
import time

import jax
import numpy as np
import optax
import pytest

from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.data import DataError, make_task
from jaxpost.data.prompts import build_prompt_iterator
from jaxpost.recipes import rl, sft
from jaxpost.config import EvalConfig
from jaxpost.rollout import Rollout
from jaxpost.rollout.sampler import score_logprobs
from jaxpost.rollout.rewards import RewardSet, task_reward
from jaxpost.tokenizers import train_tokenizer
from jaxpost.train.loop import read_metrics
from jaxpost.config import AdvantageConfig, RLLossConfig, RolloutConfig
from jaxpost.train.rl import PolicyModel
from jaxpost.train.rl_loop import RLTrainer, concat_rollouts
from jaxpost.train.state import TrainState, abstract_train_state, state_shardings
from tests.helpers import cached_lm, max_abs_diff, mesh_of, tiny_config


# ------------------------------------------------------------------------------------------------ reward functions


def test_reward_set_weights_and_scores_failures_and_timeouts_as_zero():
    def good(prompt, completion, *, answer, **_):
        return float(completion == answer)

    def length(prompt, completion, **_):
        return len(completion)

    def broken(prompt, completion, **_):
        if completion == "boom":
            raise RuntimeError("bad input")
        return float("nan") if completion == "nan" else 1.0

    def hangs(prompt, completion, **_):
        if completion == "slow":
            time.sleep(30)
        return 2.0

    rs = RewardSet({"good": good, "length": length, "broken": broken, "hangs": hangs},
                   weights={"length": 0.5, "hangs": 0.25}, timeout_s=0.5)
    completions = ["7", "boom", "nan", "slow"]
    t0 = time.perf_counter()
    res = rs(["p"] * 4, completions, [{"answer": "7"}] * 4)
    assert time.perf_counter() - t0 < 5.0  # the hung call is abandoned at the timeout
    np.testing.assert_array_equal(res.per_function["good"], [1, 0, 0, 0])
    np.testing.assert_array_equal(res.per_function["broken"], [1, 0, 0, 1])
    np.testing.assert_array_equal(res.per_function["hangs"], [2, 2, 2, 0])
    assert res.failed == {"good": 0, "length": 0, "broken": 2, "hangs": 0}
    assert res.timed_out == {"good": 0, "length": 0, "broken": 0, "hangs": 1}
    expected = np.array([1, 0, 0, 0]) + 0.5 * np.array([1, 4, 3, 4]) + np.array([1, 0, 0, 1]) + 0.25 * np.array(
        [2, 2, 2, 0])
    np.testing.assert_allclose(res.total, expected)
    # inline (no threads): the same values
    inline = RewardSet({"good": good, "broken": broken}, timeout_s=None)(["p"] * 3, completions[:3],
                                                                         [{"answer": "7"}] * 3)
    np.testing.assert_array_equal(inline.total, [2, 0, 0])
    with pytest.raises(ValueError, match="unknown reward functions"):
        RewardSet({"good": good}, weights={"bad": 1.0})


def test_task_reward_receives_the_prompt_record_fields():
    task = make_task("arithmetic", max_digits=2)
    fn = task_reward(task)
    ex = task.example("train", 3)
    assert fn(ex["prompt"], ex["answer"], answer=ex["answer"]) == 1.0
    assert fn(ex["prompt"], "garbage", answer=ex["answer"]) == 0.0


# ------------------------------------------------------------------------------------------------ prompt pipeline


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_task("arithmetic", max_digits=2).corpus(400), vocab_size=64)


def test_prompt_iterator_resumes_exactly_and_names_bad_records(tokenizer):
    task = make_task("arithmetic", max_digits=2)
    source = task.source("train", length=100)
    it = build_prompt_iterator(source, tokenizer, batch_size=8, max_prompt_len=24, seed=3)
    next(it), next(it)
    state = it.get_state()
    expected = [[p.index for p in next(it)] for _ in range(15)]  # crosses an epoch boundary
    again = build_prompt_iterator(source, tokenizer, batch_size=8, max_prompt_len=24, seed=3)
    again.set_state(state)
    assert [[p.index for p in next(again)] for _ in range(15)] == expected
    assert again.stats["prompts_seen"] == 8 * 17
    p = next(again)[0]
    assert p.text == task.example("train", p.index)["prompt"]
    assert p.example["answer"] == task.example("train", p.index)["answer"]
    assert "completion" not in p.example and p.example["reference"] == p.example["answer"]
    assert p.ids[-1] == tokenizer.encode_chat([{"role": "user", "content": p.text}], add_generation_prompt=True)[0][-1]
    with pytest.raises(ValueError, match="settings differ"):
        build_prompt_iterator(source, tokenizer, batch_size=4, max_prompt_len=24, seed=3).set_state(state)

    bad = [{"prompt": "What is 1 + 1?"}, {"question": "no prompt"}]
    with pytest.raises(DataError, match="prompt 1: .*neither"):
        list(zip(range(2), build_prompt_iterator(bad, tokenizer, batch_size=1, max_prompt_len=24, shuffle=False)))
    with pytest.raises(DataError, match="prompt 0: .* tokens > max_prompt_len=4"):
        next(build_prompt_iterator(bad, tokenizer, batch_size=1, max_prompt_len=4, shuffle=False))


# ------------------------------------------------------------------------------------------------ the iteration


def _trainer(lm, params, tokenizer, rollout: RolloutConfig, rewards, *, mesh, loss=None, lr=3e-3, value="none",
             advantage=None, reference=True, teacher=None):
    model = PolicyModel(lm, value=value)
    tx = optax.adam(lr)
    abstract = abstract_train_state(model, tx)
    sh = state_shardings(abstract, model.param_shardings(mesh), tx, mesh)

    def make(p, key):
        full = model.from_policy(p, key)
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=full, opt_state=tx.init(full), rng=key)

    state = jax.jit(make, out_shardings=sh)(params, jax.random.PRNGKey(0))
    loss = loss or RLLossConfig(eps_high=0.28)
    trainer = RLTrainer(model=model, tx=tx, schedule=optax.constant_schedule(lr), mesh=mesh, state_shardings=sh,
                        tokenizer=tokenizer, rewards=rewards, rollout=rollout, loss=loss,
                        advantage=advantage or AdvantageConfig(), ref_params=params if reference else None,
                        accuracy_key=None, teacher=teacher)
    return trainer, state


def _digits(prompt, completion, **_):
    """A dense reward on a trivial task: the fraction of digits in the completion."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def test_tiny_grpo_run_raises_the_reward_and_the_first_update_has_ratio_one(tokenizer):
    lm, params = cached_lm(tiny_config())
    task = make_task("arithmetic", max_digits=2)
    prompts = build_prompt_iterator(task.source("train"), tokenizer, batch_size=8, max_prompt_len=16, seed=0)
    ro = RolloutConfig(prompts_per_step=8, group_size=8, max_new_tokens=6, max_prompt_len=16, ppo_epochs=2,
                       minibatches=2)
    trainer, state = _trainer(lm, params, tokenizer, ro, RewardSet({"digits": _digits}, timeout_s=None),
                              mesh=mesh_of(4, 2, 1), lr=1e-2)
    history = []
    for _ in range(12):
        state, m = trainer.iteration(state, prompts)
        history.append(m)
    first = history[0]
    # the sampler's log-probs are the trainer's (same forward, same core) and the first update sees ratio 1
    assert first["sampler_logp_diff"] < 1e-4
    assert abs(first["first_update_ratio"] - 1.0) < 1e-5 and first["first_update_clip_frac"] == 0.0
    assert int(jax.device_get(state.step)) == 12 * 4
    assert abs(history[0]["kl_ref_k3"]) < 1e-6 < history[-1]["kl_ref_k3"]
    start = first["reward_mean"]
    end = np.mean([m["reward_mean"] for m in history[-3:]])
    assert end > start + 0.25, [round(m["reward_mean"], 3) for m in history]
    for key in ("reward_std", "entropy", "clip_frac", "approx_kl", "response_length", "zero_adv_group_frac",
                "rollout_time_s", "update_time_s", "score_time_s", "reward_time_s"):
        assert np.isfinite(first[key]), key


def test_a_teacher_adds_on_policy_distillation_advantages_per_token(tokenizer):
    # A deeper, wider teacher grades every sampled token: the update batch's advantages are the task estimator's plus
    # teacher_coef * (log p_teacher - log q_student) per token (teacher_gamma 0; other gammas: the reward-to-go of
    # tests/test_distill.py), with the teacher's log-probs those of its own training forward; a teacher equal to the
    # policy adds nothing.
    lm, params = cached_lm(tiny_config())
    t_lm, t_params = cached_lm(tiny_config(d_model=96, n_layers=3, mlp_dim=192))
    mesh = mesh_of(4, 2, 1)
    t_params = jax.device_put(t_params, t_lm.param_shardings(mesh))
    task = make_task("arithmetic", max_digits=2)
    batch = next(build_prompt_iterator(task.source("train"), tokenizer, batch_size=4, max_prompt_len=16, seed=3))
    rewards = RewardSet({"digits": _digits}, timeout_s=None)
    ro = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6, max_prompt_len=16, temperature=0.7)
    coef = 0.5
    out = {}
    for name, teacher, adv_cfg in (("task", None, AdvantageConfig()),
                                   ("teacher", (t_lm, t_params), AdvantageConfig(teacher_coef=coef))):
        trainer, state = _trainer(lm, params, tokenizer, ro, rewards, mesh=mesh, advantage=adv_cfg, teacher=teacher)
        samples = trainer.sample(state, iter([batch]))
        scored = trainer.score(state.params, samples)
        update = trainer.advantages(samples, scored)
        state, step_metrics = trainer.update(state, update, samples.iteration)
        out[name] = (scored, update, trainer.metrics(samples, scored, update, step_metrics, timings={}))
        if teacher is not None:  # a teacher that agrees with the policy on every token adds nothing
            same = dict(scored, teacher_logp=scored["logp"])
            self_b = trainer.advantages(samples, same)
            m_self = trainer.metrics(samples, same, self_b, step_metrics, timings={})
    (_, task_b, _), (scored, teach_b, m) = out["task"], out["teacher"]
    mask = teach_b["loss_mask"] > 0
    want_t = np.asarray(score_logprobs(t_lm, jax.device_get(t_params), scored, temperature=0.7))
    np.testing.assert_allclose(scored["teacher_logp"][mask], want_t[mask], atol=2e-5)
    r = np.where(mask, scored["teacher_logp"] - scored["logp"], 0.0)
    np.testing.assert_allclose(teach_b["advantages"] - task_b["advantages"], coef * r, atol=1e-5)
    assert abs(m["teacher_kl_k1"] - float(np.mean(-(scored["teacher_logp"] - scored["logp"])[mask]))) < 1e-5
    assert abs(m["teacher_kl_k1"]) > 1e-3  # a random teacher disagrees with the policy (k1 may be < 0)
    assert abs(m_self["teacher_kl_k1"]) < 1e-5
    np.testing.assert_allclose(self_b["advantages"], task_b["advantages"], atol=1e-5)
    with pytest.raises(ValueError, match="teacher_coef"):
        _trainer(lm, params, tokenizer, ro, rewards, mesh=mesh, advantage=AdvantageConfig(teacher_coef=1.0))
    with pytest.raises(ValueError, match="teacher_coef"):
        _trainer(lm, params, tokenizer, ro, rewards, mesh=mesh, teacher=(t_lm, t_params))


@pytest.mark.parametrize("reference", [True, False])
def test_sampler_log_probs_as_the_old_log_probs_give_the_same_update(tokenizer, reference):
    # old_logp="sampler" skips the policy's forward in the scoring pass (and the whole pass without a reference):
    # the update from the same state and prompts matches the one with the trainer's recomputed log-probs
    lm, params = cached_lm(tiny_config())
    task = make_task("arithmetic", max_digits=2)
    batch = next(build_prompt_iterator(task.source("train"), tokenizer, batch_size=4, max_prompt_len=16, seed=2))
    rewards = RewardSet({"digits": _digits}, timeout_s=None)
    out = {}
    for source in ("trainer", "sampler"):
        ro = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6, max_prompt_len=16, old_logp=source,
                           minibatches=2)
        trainer, state = _trainer(lm, params, tokenizer, ro, rewards, mesh=mesh_of(4, 2, 1), reference=reference)
        assert (trainer.scorer is None) == (source == "sampler" and not reference)
        # the iteration's phases one by one, to look at the update batch
        samples = trainer.sample(state, iter([batch]))
        scored = trainer.score(state.params, samples)
        update = trainer.advantages(samples, scored)
        state, step_metrics = trainer.update(state, update, samples.iteration)
        m = trainer.metrics(samples, scored, update, step_metrics, timings={})
        out[source] = (jax.device_get(state.params), m, update)
    (p_t, m_t, b_t), (p_s, m_s, b_s) = out["trainer"], out["sampler"]
    assert m_t["sampler_logp_diff"] < 1e-4 and "sampler_logp_diff" not in m_s
    m = b_t["loss_mask"] > 0  # (the trainer's log-probs also cover the prompt tokens, the sampler's are 0 there)
    np.testing.assert_allclose(b_s["old_logp"][m], b_t["old_logp"][m], atol=1e-4)
    np.testing.assert_array_equal(b_s["advantages"], b_t["advantages"])
    assert abs(m_s["first_update_ratio"] - 1.0) < 1e-4 and m_s["first_update_clip_frac"] == 0.0
    assert m_s["reward_mean"] == m_t["reward_mean"] and abs(m_s["loss"] - m_t["loss"]) < 1e-5
    assert max_abs_diff(p_s, p_t) < 1e-5
    if reference:
        assert abs(m_s["kl_ref_k3"] - m_t["kl_ref_k3"]) < 1e-6
    with pytest.raises(ValueError, match="old_logp"):
        RolloutConfig(old_logp="cache")


def test_a_bfloat16_sampler_is_corrected_by_truncated_importance_weights(tokenizer):
    # the sampler computes in bfloat16, the trainer in float32: their log-probs of the same tokens differ, the
    # mismatch metrics show it, and the update batch carries the truncated weights exp(old - sampler) that every
    # policy loss multiplies in; the float32 sampler's weights are 1 up to rounding
    lm, params = cached_lm(tiny_config())
    task = make_task("arithmetic", max_digits=2)
    batch = next(build_prompt_iterator(task.source("train"), tokenizer, batch_size=4, max_prompt_len=16, seed=5))
    rewards = RewardSet({"digits": _digits}, timeout_s=None)
    loss = RLLossConfig(eps_high=0.28, rollout_correction="token_truncate", correction_clip_max=1.002,
                        correction_clip_min=0.998)
    out = {}
    for dtype in (None, "bfloat16"):
        ro = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6, max_prompt_len=16, sampler_dtype=dtype)
        trainer, state = _trainer(lm, params, tokenizer, ro, rewards, mesh=mesh_of(4, 2, 1), loss=loss,
                                  reference=False)
        samples = trainer.sample(state, iter([batch]))
        scored = trainer.score(state.params, samples)
        update = trainer.advantages(samples, scored)
        state, step_metrics = trainer.update(state, update, samples.iteration)
        out[dtype] = (trainer.metrics(samples, scored, update, step_metrics, timings={}), update, scored)
    (m32, b32, _), (m16, b16, s16) = out[None], out["bfloat16"]
    mask = b16["loss_mask"] > 0
    want = np.clip(np.exp(s16["logp"] - s16["sample_logp"]), 0.998, 1.002)
    np.testing.assert_allclose(b16["is_weight"][mask], want[mask], rtol=1e-6)
    assert np.all(b16["is_weight"][~mask] == 1.0)
    assert m16["correction/logp_diff_max"] > 10 * max(m32["correction/logp_diff_max"], 1e-6)
    assert m16["correction/is_clipped_frac"] > 0.0 == m32["correction/is_clipped_frac"]
    np.testing.assert_allclose(b32["is_weight"][b32["loss_mask"] > 0], 1.0, atol=1e-4)
    for key in ("mismatch_k1", "mismatch_k3", "is_weight_mean", "is_weight_min", "is_weight_max"):
        assert np.isfinite(m16[f"correction/{key}"]), key
    with pytest.raises(ValueError, match="old_logp='trainer'"):
        _trainer(lm, params, tokenizer, RolloutConfig(prompts_per_step=4, group_size=4, old_logp="sampler"), rewards,
                 mesh=mesh_of(4, 2, 1), loss=loss, reference=False)
    with pytest.raises(ValueError, match="rollout correction mode"):
        RLLossConfig(rollout_correction="token_clip")
    with pytest.raises(ValueError, match="sampler_dtype"):
        RolloutConfig(sampler_dtype="int8")


def test_concat_rollouts_keeps_the_chosen_groups_and_pads_with_empty_ones():
    def part(offset, n_prompts, G=2, N=3):
        R = n_prompts * G
        return Rollout(tokens=np.arange(R * N, dtype=np.int32).reshape(R, N) + offset,
                       mask=np.ones((R, N), bool), logprobs=-np.ones((R, N), np.float32),
                       lengths=np.full((R,), N, np.int32), finish=np.zeros((R,), np.int32),
                       prompt_index=np.repeat(np.arange(n_prompts, dtype=np.int32), G),
                       prompts=[np.array([offset + p], np.int32) for p in range(n_prompts)], steps=N)

    a, b = part(0, 2), part(100, 2)
    out, row_mask = concat_rollouts([a, b], [(0, 1), (1, 0)], 2, pad_id=0, total_groups=3)
    np.testing.assert_array_equal(out.tokens[:2], a.tokens[2:4])
    np.testing.assert_array_equal(out.tokens[2:4], b.tokens[0:2])
    np.testing.assert_array_equal(row_mask, [1, 1, 1, 1, 0, 0])
    assert [int(p[0]) for p in out.prompts] == [1, 100, 1]
    np.testing.assert_array_equal(out.lengths[4:], 0)
    assert not out.mask[4:].any()


def test_dynamic_sampling_keeps_only_groups_with_unequal_rewards(tokenizer):
    lm, params = cached_lm(tiny_config())
    task = make_task("arithmetic", max_digits=2)
    prompts = build_prompt_iterator(task.source("train"), tokenizer, batch_size=4, max_prompt_len=16, seed=1)

    def coin(prompt, completion, **_):  # depends on the sample: most groups are mixed
        return float(len(completion) % 2)

    ro = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=6, max_prompt_len=16, dynamic_sampling=True,
                       max_sampling_rounds=3)
    trainer, state = _trainer(lm, params, tokenizer, ro, RewardSet({"coin": coin}, timeout_s=None),
                              mesh=mesh_of(4, 2, 1))
    state, m = trainer.iteration(state, prompts)
    assert m["batch_groups"] == 4.0 and m["zero_adv_group_frac"] < 1.0
    assert m["sampling_rounds"] in (1.0, 2.0, 3.0)

    def constant(prompt, completion, **_):  # every group has equal rewards: nothing to learn from
        return 1.0

    trainer, state = _trainer(lm, params, tokenizer, ro, RewardSet({"constant": constant}, timeout_s=None),
                              mesh=mesh_of(4, 2, 1))
    before = jax.device_get(state.params)
    state, m = trainer.iteration(state, prompts)
    assert m["batch_groups"] == 0.0 and m["sampling_rounds"] == 3.0 and m["zero_adv_group_frac"] == 1.0
    assert m["tokens"] == 0.0 and max_abs_diff(jax.device_get(state.params), before) == 0.0


# ------------------------------------------------------------------------------------------------ the recipe

EVAL = EvalConfig(n_examples=8, batch_size=8)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft"))
    cfg = sft.SFTConfig(steps=6, model=tiny_config(), data=DataConfig(seq_len=32, batch_size=8),
                        optim=OptimConfig(lr=3e-3, warmup_steps=2), mesh=MeshConfig(data=8, fsdp=1, tensor=1),
                        train=TrainConfig(checkpoint_every=0, log_every=3), eval=EVAL)
    sft.run(cfg, path)
    return path


def test_ppo_recipe_resumed_after_preemption_continues_exactly(sft_dir, tmp_path):
    value = "head"  # PPO with a value head: the state holds the head, GAE needs the values
    ro = RolloutConfig(prompts_per_step=4, group_size=4, max_new_tokens=5, max_prompt_len=16, minibatches=2)
    adv = AdvantageConfig(estimator="gae" if value == "head" else "grpo")
    cfg = rl.RLConfig(steps=3, init_from=sft_dir, value=value, rollout=ro, advantage=adv,
                      loss=RLLossConfig(eps_high=0.28, kl_coef=0.01), optim=OptimConfig(lr=1e-3, warmup_steps=1),
                      mesh=MeshConfig(data=4, fsdp=2, tensor=1),
                      train=TrainConfig(checkpoint_every=1, log_every=1, async_checkpoints=False), eval=EVAL)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    full = rl.run(cfg, straight)
    assert rl.run(cfg, resumed, stop_at=1) is None
    res = rl.run(cfg, resumed)
    assert res["resumed_from_step"] == 1
    a = [r for r in read_metrics(os.path.join(straight, "metrics.jsonl")) if "loss" in r]
    b = [r for r in read_metrics(os.path.join(resumed, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "reward_mean", "response_length", "kl_ref_k3", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    assert res["accuracy_after"] == full["accuracy_after"]
    for name in ("config.json", "metrics.jsonl", "rl.png", "results.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(resumed, name)), name
    saved = json.load(open(os.path.join(resumed, "results.json")))
    assert set(saved) >= {"accuracy_before", "accuracy_after", "wall_time_s", "rl_time_s"}


def test_rl_oracle_runs_gold_answer_updates_from_an_sft_workdir(sft_dir, tmp_path):
    from tools import rl_oracle

    rl_dir = tmp_path / "rl"
    rl_dir.mkdir()
    (rl_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "step_time_s": t}) + "\n"
                                                  for i, t in enumerate([20.0, 4.0, 6.0])))
    assert rl_oracle.measured_iteration_time(str(rl_dir)) == 5.0  # the compiling first iteration left out
    out = tmp_path / "oracle.json"
    rl_oracle.main(["--init-from", sft_dir, "--rl-workdir", str(rl_dir), "--budget-s", "10", "--prompts", "8",
                    "--lrs", "1e-3", "--eval", "8", "--eval-every", "1", "--output", str(out)])
    res = json.loads(out.read_text())
    assert res["updates"] == 2 and res["prompts_per_update"] == 8 and res["rl_iteration_s"] == 5.0
    curve = res["lrs"]["0.001"]["curve"]
    assert [u for u, _ in curve] == [0, 1, 2] and all(0.0 <= a <= 1.0 for _, a in curve)
    assert curve[0][1] == res["accuracy_start"] and res["best_gain"] == res["lrs"]["0.001"]["best"] - curve[0][1]


def test_rl_config_errors_are_named():
    with pytest.raises(ValueError, match="gae estimator needs a value model"):
        rl.RLConfig(advantage=AdvantageConfig(estimator="gae"))
    with pytest.raises(ValueError, match="needs reference=True"):
        rl.RLConfig(reference=False, loss=RLLossConfig(kl_coef=0.1))
    with pytest.raises(TypeError, match="temperature"):  # one sampling temperature: the rollout's, used by the loss
        rl.RLConfig(loss=RLLossConfig(temperature=0.7))
    with pytest.raises(ValueError, match="do not split"):
        RolloutConfig(prompts_per_step=3, group_size=3, minibatches=2)
    with pytest.raises(ValueError, match="luspo.*seq_mean_token_sum"):  # LUSPO is defined with its aggregation
        RLLossConfig(policy_loss="luspo")
    with pytest.raises(ValueError, match="kl_importance_weighted"):
        RLLossConfig(kl_coef=0.1, kl_in="reward", kl_importance_weighted=True)
    with pytest.raises(ValueError, match="ddof"):
        AdvantageConfig(grpo_ddof=2)
    # every loss hyperparameter reaches its function under the registry's name
    cfg = RLLossConfig(policy_loss="cispo", cispo_clip_max=4.0, cispo_clip_min=0.5)
    assert cfg.policy_kwargs() == {"clip_max": 4.0, "clip_min": 0.5}
    assert RLLossConfig(policy_loss="sapo", sapo_tau_neg=2.0).policy_kwargs() == {"tau_pos": 1.0, "tau_neg": 2.0}
    assert RLLossConfig(delta=1.5).policy_kwargs()["delta"] == 1.5
    assert AdvantageConfig(estimator="rloo", normalize=True).kwargs() == {"normalize": True, "eps": 1e-4, "ddof": 1}


def test_learned_reward_scores_rows_at_the_last_completion_token():
    from jaxpost.models.heads import ScalarHeadLM
    from jaxpost.rollout.rewards import LearnedReward
    from jaxpost.models.heads import sequence_rewards
    from tests.test_rl_step import rollout_rows

    model = ScalarHeadLM(tiny_config(), head_init_std=0.5)
    mesh = mesh_of(4, 2, 1)
    params = model.init(jax.random.PRNGKey(0), mesh)
    rows = rollout_rows(np.random.default_rng(6), 12, 12)
    got = LearnedReward(model, params, mesh, rows=8)(rows)  # 12 rows in two calls, the second one padded
    expected = np.asarray(sequence_rewards(model, params, rows))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.std(got) > 0


LR = 1e-3


def test_grpo_from_a_mixed_start_learns_the_prompt_dependent_answer(tokenizer):
    # A mixed start in seconds: SFT on 8 fixed prompts whose gold completions are half the right answer, half a fixed
    # wrong one ("0"), so the start samples each about half the time. The reward is the checker against each prompt's
    # own answer: only a batch whose samples, rewards and advantages stay with their prompt can raise it (a mis-grouped
    # or mis-ordered batch credits another prompt's answer).
    from jaxpost.batch import split_microbatches
    from jaxpost.data import build_sft_iterator
    from jaxpost.train.sft import SFT
    from jaxpost.train.step import make_step
    from jaxpost.train.state import create_train_state

    task = make_task("arithmetic", max_digits=1, ops=("+",))
    examples = [task.example("train", i) for i in range(8)]
    assert len({ex["answer"] for ex in examples}) > 3 and all(ex["answer"] != "0" for ex in examples)
    records = [{"prompt": ex["prompt"], "completion": c} for ex in examples for c in (ex["answer"], "0")]
    lm, _ = cached_lm(tiny_config())
    mesh = mesh_of(4, 2, 1)
    tx = optax.adam(3e-3)
    state, sh = create_train_state(lm, tx, mesh, seed=0)
    step = make_step(lm, tx, optax.constant_schedule(3e-3), SFT(lm), mesh=mesh, state_shardings=sh, units=16)
    batches = build_sft_iterator(records, tokenizer, seq_len=32, batch_size=16, seed=0)
    for _ in range(60):
        b = split_microbatches(next(batches), 1, keys=step.batch_shardings)
        state, _ = step(state, {k: jax.device_put(v, step.batch_shardings[k]) for k, v in b.items()})
    start = jax.device_get(state.params)

    prompts = build_prompt_iterator([{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in examples], tokenizer,
                                    batch_size=8, max_prompt_len=16, seed=0)
    ro = RolloutConfig(prompts_per_step=8, group_size=8, max_new_tokens=4, max_prompt_len=16, ppo_epochs=2,
                       minibatches=2)
    trainer, rl_state = _trainer(lm, start, tokenizer, ro, RewardSet({"correct": task_reward(task)}, timeout_s=None),
                                 mesh=mesh, lr=LR)
    history = []
    for _ in range(10):
        rl_state, m = trainer.iteration(rl_state, prompts)
        history.append(m["reward_mean"])
    assert 0.2 < history[0] < 0.8, history  # the start is mixed
    assert np.mean(history[-3:]) > np.mean(history[:2]) + 0.25, history  # 0.24 -> 0.62 on an x86 CPU
