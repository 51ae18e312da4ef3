"""The RL iteration, host side, as five named phases: sample, score, advantages, update, metrics.

`RLTrainer.iteration(state, prompts)` runs them in order on prompt batches drawn from the prompt source `prompts`
(an iterator of `Prompt` lists, e.g. `jaxpost.data.build_prompt_iterator`):

1. sample (`RLTrainer.sample`): the KV-cache sampler draws `group_size` completions of each prompt from the current
   policy params (read in place, no copy); the rewards are the verifier functions (`RewardSet`, on decoded text)
   plus optionally a learned reward model, weighted, and DAPO's soft overlong penalty. Dynamic sampling (DAPO) keeps
   only groups whose rewards differ and draws more prompt batches from the source until the batch is full or
   `max_sampling_rounds` is reached (the rest is padding rows, masked out everywhere);
2. score (`RLTrainer.score`): one forward-only pass gives the old policy's log-probs and entropy, the reference's
   log-probs, the value model's values and a teacher's log-probs (with `old_logp="sampler"` the old log-probs are
   the sampler's own, and the pass runs only for a reference, a value model or a teacher, or not at all);
3. advantages (`RLTrainer.advantages`) over the whole batch (`jaxpost.train.rl.compute_advantages`), plus, with a
   teacher, on-policy distillation's dense per-token advantage (`AdvantageConfig.teacher_coef`): the update batch;
4. update (`RLTrainer.update`): `ppo_epochs` passes over the rows, shuffled and split into `minibatches` optimizer
   steps of the one step builder (`jaxpost.train.step.make_step` with the `PolicyGradient` objective);
5. metrics (`RLTrainer.metrics`): host floats of the iteration (reported on the first sampling round: an unbiased
   view of the policy, whatever dynamic sampling kept); with the trainer's old log-probs, `correction/*` measures
   the sampler / trainer mismatch (`jaxpost.losses.rollout_correction`), which `RLLossConfig.rollout_correction`
   corrects with importance weights (the `is_weight` array of the update batch).

Each phase returns what the next reads, so a test or a tool can run them one by one and look at any of them.
Randomness (sampling seeds and mini-batch orders) derives from the train state's RNG key and the iteration number,
so a run resumed from a checkpoint (state + prompt-iterator state) continues exactly as if uninterrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from jaxpost.batch import ROW_KEYS, split_microbatches
from jaxpost.config import AdvantageConfig, RLLossConfig, RolloutConfig, check_rl
from jaxpost.losses import dynamic_sampling_keep, on_policy_distill_advantages, overlong_penalty, rollout_correction
from jaxpost.models.lm import LM
from jaxpost.rollout import Rollout, Sampler, SamplingConfig, rollout_batch
from jaxpost.tokenizers import decode_completion
from jaxpost.train.rl import (PolicyGradient, PolicyModel, batch_keys, compute_advantages, make_rl_scorer,
                              make_teacher_scorer)
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")


def concat_rollouts(parts: Sequence[Rollout], groups: Sequence[tuple[int, int]], group_size: int, *, pad_id: int,
                    total_groups: int) -> tuple[Rollout, np.ndarray]:
    """A rollout of the groups `(part, group)` chosen from `parts`, padded with empty groups to `total_groups`
    (copies of the first group's prompt with zero-length completions); returns it and the row mask [rows]."""
    N = max(p.tokens.shape[1] for p in parts)
    prompts, rows = [], []
    for pi, g in groups:
        prompts.append(parts[pi].prompts[g])
        rows += [(pi, g * group_size + j) for j in range(group_size)]
    R = total_groups * group_size
    tokens = np.full((R, N), pad_id, np.int32)
    logprobs = np.zeros((R, N), np.float32)
    lengths = np.zeros((R,), np.int32)
    finish = np.zeros((R,), np.int32)
    for r, (pi, src) in enumerate(rows):
        part = parts[pi]
        n = part.tokens.shape[1]
        tokens[r, :n] = part.tokens[src]
        logprobs[r, :n] = part.logprobs[src]
        lengths[r] = part.lengths[src]
        finish[r] = part.finish[src]
    if len(groups) < total_groups:
        filler = prompts[0] if prompts else parts[0].prompts[0]
        prompts += [filler] * (total_groups - len(groups))
    row_mask = np.zeros((R,), np.float32)
    row_mask[:len(rows)] = 1.0
    return Rollout(tokens=tokens, mask=np.arange(N)[None, :] < lengths[:, None], logprobs=logprobs, lengths=lengths,
                   finish=finish, prompt_index=np.repeat(np.arange(total_groups, dtype=np.int32), group_size),
                   prompts=prompts, steps=max(p.steps for p in parts)), row_mask


@dataclasses.dataclass
class Round:
    """One sampler call of the sample phase: its rollout, prompts, total rewards [rows], reward details, and which
    of its groups have unequal rewards (a non-zero advantage: what dynamic sampling keeps) [groups]."""

    rollout: Rollout
    prompts: list
    rewards: np.ndarray
    info: dict
    informative: np.ndarray


@dataclasses.dataclass
class Samples:
    """What the sample phase gives: the batch's rollout (dynamic sampling: the kept groups, padded), its row mask and
    total rewards [rows], every sampling round, and the rollout and reward times."""

    iteration: int
    rollout: Rollout
    row_mask: np.ndarray
    rewards: np.ndarray
    rounds: list[Round]
    timings: dict

    @property
    def first(self) -> Round:
        return self.rounds[0]


def sampler_lm(lm: LM, dtype: str | None) -> LM:
    """The model the sampler runs: `lm` itself, or the same architecture computing in `dtype` (its params are the
    policy's, read in place): the sampler / trainer precision mismatch of inference engines."""
    if dtype is None or dtype == lm.cfg.dtype:
        return lm
    return LM(dataclasses.replace(lm.cfg, dtype=dtype), lm.lora)


class RLTrainer:
    """Runs RL iterations for one policy model on one mesh (see the module docstring).

    rewards(prompts, completions, examples, group_size=G) -> RewardResult (a `jaxpost.rollout.rewards.RewardSet`;
    rows come in groups of G = rollout.group_size samples of one prompt);
    learned_reward: optional `LearnedReward` (scores rollout rows), weighted by `learned_reward_weight`;
    accuracy_key: the reward function whose mean is reported as `accuracy` (a 0/1 verifier);
    ref_params: the reference decoder params (sharded like the policy's) for a KL term or the `kl_ref` metric; for a
    LoRA policy, pass none and set `base_reference=True`: the reference is the base model (adapters disabled).
    teacher: optional (teacher LM, its params sharded by `teacher_lm.param_shardings(mesh)`): a decoder of any size
    with the policy's tokenizer, whose log-probs of the sampled tokens give the dense per-token advantage
    `advantage.teacher_coef * on_policy_distill_advantages(old_logp, teacher_logp, gamma=advantage.teacher_gamma)`.
    """

    def __init__(self, *, model: PolicyModel, tx, schedule, mesh, state_shardings, tokenizer, rewards,
                 rollout: RolloutConfig, loss: RLLossConfig, advantage: AdvantageConfig, ref_params=None,
                 learned_reward=None, learned_reward_weight: float = 1.0, accuracy_key: str | None = None,
                 grad_accum: int = 1, logprobs_impl: str = "auto", base_reference: bool = False, teacher=None):
        if base_reference and (getattr(model.lm, "lora", None) is None or ref_params is not None):
            raise ValueError("base_reference=True needs a LoRA policy and no ref_params")
        with_ref = ref_params is not None or base_reference
        check_rl(value=model.value, advantage=advantage, loss=loss, reference=with_ref, teacher=teacher is not None)
        if loss.aggregation == "seq_mean_token_sum_norm" and not loss.max_length:
            loss = dataclasses.replace(loss, max_length=rollout.max_new_tokens)
        self.model, self.mesh, self.tokenizer, self.rewards = model, mesh, tokenizer, rewards
        self.rollout_cfg, self.loss_cfg, self.adv_cfg = rollout, loss, advantage
        self.ref_params, self.learned_reward, self.learned_weight = ref_params, learned_reward, learned_reward_weight
        self.accuracy_key = accuracy_key
        self.grad_accum = grad_accum
        if loss.rollout_correction != "none" and rollout.old_logp != "trainer":
            raise ValueError("RLLossConfig.rollout_correction needs the trainer's old log-probs beside the sampler's: "
                             "set RolloutConfig.old_logp='trainer'")
        self.sampler = Sampler(sampler_lm(model.lm, rollout.sampler_dtype), mesh, pad_id=tokenizer.pad_id,
                               min_prompt_bucket=rollout.max_prompt_len)
        self.sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                       top_k=rollout.top_k, top_p=rollout.top_p, n_samples=rollout.group_size,
                                       stop_ids=tuple(tokenizer.stop_ids))
        objective = PolicyGradient(model, loss, temperature=rollout.temperature, logprobs_impl=logprobs_impl)
        self.step = make_step(model, tx, schedule, objective, mesh=mesh, state_shardings=state_shardings,
                              units=rollout.rows_per_update, grad_accum=grad_accum)
        self.keys = batch_keys(model, loss)
        self.trainer_logp = rollout.old_logp == "trainer"
        self.scorer = None  # nothing to score: sampler log-probs, no reference, no value model
        if self.trainer_logp or with_ref or model.value != "none":
            self.scorer = make_rl_scorer(model, mesh, state_shardings.params, rows=rollout.rows_per_update,
                                         temperature=rollout.temperature, with_ref=with_ref,
                                         policy=self.trainer_logp, logprobs_impl=logprobs_impl)
        self.teacher, self.teacher_scorer = teacher, None
        if teacher is not None:
            self.teacher_scorer = make_teacher_scorer(teacher[0], mesh, teacher[0].param_shardings(mesh),
                                                      rows=rollout.rows_per_update, temperature=rollout.temperature,
                                                      logprobs_impl=logprobs_impl)
        self._teacher_adv = jax.jit(on_policy_distill_advantages, static_argnames=("gamma",))
        self._advantages = jax.jit(compute_advantages,
                                   static_argnames=("cfg", "group_size", "kl_coef", "kl_estimator"))
        self._correction = jax.jit(functools.partial(
            rollout_correction, mode=loss.rollout_correction, clip_min=loss.correction_clip_min,
            clip_max=loss.correction_clip_max))

    # -- one iteration --------------------------------------------------------------------------------------------
    def iteration(self, state, prompts: Iterator[list]):
        """(new state, metrics: host floats) of one RL iteration on prompt batches drawn from `prompts`."""
        samples = self.sample(state, prompts)
        t0 = time.perf_counter()
        scored = self.score(state.params, samples)
        score_time = time.perf_counter() - t0
        batch = self.advantages(samples, scored)
        t0 = time.perf_counter()
        state, step_metrics = self.update(state, batch, samples.iteration)
        timings = {**samples.timings, "score_time_s": score_time, "update_time_s": time.perf_counter() - t0}
        return state, self.metrics(samples, scored, batch, step_metrics, timings)

    # -- 1. sample ------------------------------------------------------------------------------------------------
    def iteration_of(self, state) -> int:
        return int(jax.device_get(state.step)) // self.rollout_cfg.updates_per_iteration

    def _seed(self, state, iteration: int, *salt: int) -> int:
        key = np.asarray(jax.device_get(state.rng)).astype(np.uint32).tolist()
        return int(np.random.SeedSequence([*key, iteration, *salt]).generate_state(1)[0])

    def _reward(self, rollout: Rollout, prompts) -> tuple[np.ndarray, dict]:
        completions = [decode_completion(self.tokenizer, c) for c in rollout.completions()]
        texts = [prompts[i].text for i in rollout.prompt_index]
        examples = [prompts[i].example for i in rollout.prompt_index]
        res = self.rewards(texts, completions, examples, group_size=self.rollout_cfg.group_size)
        total = res.total.copy()
        info = {"per_function": res.per_function, "failed": sum(res.failed.values()),
                "timed_out": sum(res.timed_out.values()), "time": res.time_s, "completions": completions}
        if self.learned_reward is not None:
            learned = self.learned_reward(self._rows(rollout))
            info["per_function"] = dict(res.per_function, reward_model=learned)
            total = total + self.learned_weight * learned
        cfg = self.rollout_cfg
        if cfg.overlong_buffer:
            pen = np.asarray(overlong_penalty(rollout.lengths, max_length=cfg.max_new_tokens,
                                              cache_length=cfg.overlong_buffer,
                                              penalty_factor=cfg.overlong_penalty_factor))
            info["overlong_penalty"] = pen
            total = total + pen
        return total.astype(np.float32), info

    def _rows(self, rollout: Rollout) -> dict:
        return rollout_batch(rollout, seq_len=self.rollout_cfg.seq_len, pad_id=self.tokenizer.pad_id, pack=False,
                             rows=len(rollout.lengths))

    def sample(self, state, prompts: Iterator[list]) -> Samples:
        """Rollouts and rewards of prompt batches drawn from `prompts`: one batch, or with dynamic sampling rounds
        until the batch holds prompts_per_step groups with unequal rewards."""
        cfg, G = self.rollout_cfg, self.rollout_cfg.group_size
        it = self.iteration_of(state)
        timings = {"rollout_time_s": 0.0, "reward_time_s": 0.0}
        rounds, kept = [], []
        for rnd in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            round_prompts = next(prompts)
            t0 = time.perf_counter()
            ro = self.sampler.generate(state.params["policy"], [p.ids for p in round_prompts], self.sampling,
                                       seed=self._seed(state, it, 0, rnd))
            timings["rollout_time_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            total, info = self._reward(ro, round_prompts)
            timings["reward_time_s"] += time.perf_counter() - t0
            ro = dataclasses.replace(ro, prompts=[p.ids for p in round_prompts])
            keep = np.asarray(dynamic_sampling_keep(total, group_size=G))
            rounds.append(Round(ro, round_prompts, total, info, keep))
            if not cfg.dynamic_sampling:
                break
            kept += [(rnd, g) for g in range(len(round_prompts)) if keep[g]]
            if len(kept) >= cfg.prompts_per_step:
                break
        if not cfg.dynamic_sampling:
            return Samples(it, rounds[0].rollout, np.ones((cfg.rows,), np.float32), rounds[0].rewards, rounds,
                           timings)
        kept = kept[:cfg.prompts_per_step]
        rollout, row_mask = concat_rollouts([r.rollout for r in rounds], kept, G, pad_id=self.tokenizer.pad_id,
                                            total_groups=cfg.prompts_per_step)
        rewards = np.zeros((cfg.rows,), np.float32)
        for gi, (ri, g) in enumerate(kept):
            rewards[gi * G:(gi + 1) * G] = rounds[ri].rewards[g * G:(g + 1) * G]
        return Samples(it, rollout, row_mask, rewards, rounds, timings)

    # -- 2. score -------------------------------------------------------------------------------------------------
    def score(self, params, samples: Samples) -> dict:
        """The batch's rows (`rollout_batch`: ROW_KEYS, sample_logp, ...) and the scoring pass's arrays [rows, T]:
        `logp` (the old policy's), `entropy`, `ref_logp`, `values`, `teacher_logp`, as the configuration asks."""
        rows = self._rows(samples.rollout)
        scored = {}
        n = self.rollout_cfg.rows_per_update
        for start in range(0, self.rollout_cfg.rows, n) if self.scorer is not None else ():
            out = self.scorer(params, self.ref_params, {k: rows[k][start:start + n] for k in ROW_KEYS})
            for k, v in jax.device_get(out).items():
                scored.setdefault(k, []).append(np.asarray(v))
        if self.teacher is not None:
            tparams = self.teacher[1]
            scored["teacher_logp"] = [
                np.asarray(jax.device_get(self.teacher_scorer(tparams, {k: rows[k][s:s + n] for k in ROW_KEYS})))
                for s in range(0, self.rollout_cfg.rows, n)]
        scored = {k: np.concatenate(v) for k, v in scored.items()}
        if not self.trainer_logp:
            scored["logp"] = rows["sample_logp"].astype(np.float32)
        return {**rows, **scored}

    # -- 3. advantages --------------------------------------------------------------------------------------------
    def advantages(self, samples: Samples, scored: dict) -> dict:
        """The update batch: ROW_KEYS (loss_mask zero on padding rows), old_logp, advantages, and ref_logp,
        old_values, returns as the loss needs them; host arrays [rows, T]."""
        mask = scored["loss_mask"] * samples.row_mask[:, None]
        lc = self.loss_cfg
        kl_coef = lc.kl_coef if lc.kl_in_reward else 0.0
        adv, returns, _ = self._advantages(
            samples.rewards, mask, samples.row_mask, scored["logp"], scored.get("ref_logp", scored["logp"]),
            scored.get("values", np.zeros_like(mask)), cfg=self.adv_cfg, group_size=self.rollout_cfg.group_size,
            kl_coef=kl_coef, kl_estimator=lc.kl_estimator)
        adv = np.asarray(adv)
        if self.teacher is not None:  # on-policy distillation: the teacher grades every sampled token
            adv = adv + self.adv_cfg.teacher_coef * np.asarray(self._teacher_adv(
                scored["logp"], scored["teacher_logp"], mask, gamma=self.adv_cfg.teacher_gamma))
        batch = {**{k: scored[k] for k in ROW_KEYS}, "loss_mask": mask.astype(np.float32), "old_logp": scored["logp"],
                 "advantages": adv}
        if lc.kl_in_loss:
            batch["ref_logp"] = scored["ref_logp"]
        if self.trainer_logp:  # the sampler / trainer mismatch, measured always, corrected when configured
            weight, info = jax.device_get(self._correction(scored["logp"], scored["sample_logp"], mask))
            batch["correction"] = {k: float(v) for k, v in info.items()}
            if lc.rollout_correction != "none":
                batch["is_weight"] = np.asarray(weight)
        if self.model.value != "none":
            batch["old_values"] = scored["values"]
            batch["returns"] = np.asarray(returns)
        return batch

    # -- 4. update ------------------------------------------------------------------------------------------------
    def update(self, state, batch: dict, iteration: int):
        """(state, per-step metrics) after ppo_epochs x minibatches optimizer steps on shuffled rows of `batch`."""
        cfg, n = self.rollout_cfg, self.rollout_cfg.rows_per_update
        step_metrics = []
        for epoch in range(cfg.ppo_epochs):
            order = np.random.default_rng(self._seed(state, iteration, 1, epoch)).permutation(cfg.rows)
            for mbi in range(cfg.minibatches):
                idx = order[mbi * n:(mbi + 1) * n]
                mb = split_microbatches({k: batch[k][idx] for k in self.keys}, self.grad_accum)
                mb = {k: jax.device_put(v, self.step.batch_shardings[k]) for k, v in mb.items()}
                state, m = self.step(state, mb)
                step_metrics.append(m)
        return state, jax.device_get(step_metrics)

    # -- 5. metrics -----------------------------------------------------------------------------------------------
    def metrics(self, samples: Samples, scored: dict, batch: dict, step_metrics: Sequence[dict],
                timings: dict) -> dict:
        G, first = self.rollout_cfg.group_size, samples.first
        valid = samples.row_mask > 0
        m_tok = batch["loss_mask"] > 0
        adv = batch["advantages"]
        out = {k: float(np.mean([float(sm[k]) for sm in step_metrics])) for k in step_metrics[0]}
        out["skipped"] = float(sum(float(sm["skipped"]) for sm in step_metrics))  # updates skipped (non-finite)
        out["first_update_ratio"] = float(step_metrics[0]["ratio"])
        out.update({f"correction/{k}": v for k, v in batch.get("correction", {}).items()})
        out["first_update_clip_frac"] = float(step_metrics[0].get("clip_frac", 0.0))
        out.update({
            "reward_mean": float(first.rewards.mean()), "reward_std": float(first.rewards.std()),
            "zero_adv_group_frac": float(1.0 - first.informative.mean()),
            "response_length": float(first.rollout.lengths.mean()),
            "truncated_frac": float(np.mean(first.rollout.finish == 2)),
            "batch_reward_mean": float(samples.rewards[valid].mean()) if valid.any() else 0.0,
            "batch_groups": float(valid.sum() / G), "sampling_rounds": float(len(samples.rounds)),
            "reward_failed": float(sum(r.info["failed"] for r in samples.rounds)),
            "reward_timed_out": float(sum(r.info["timed_out"] for r in samples.rounds)),
            "adv_abs_mean": float(np.abs(adv)[m_tok].mean()) if m_tok.any() else 0.0,
            **timings,
        })
        if self.trainer_logp:  # the scoring pass's view of the rollout, and its check of the sampler
            out["entropy_rollout"] = float(scored["entropy"][m_tok].mean()) if m_tok.any() else 0.0
            out["sampler_logp_diff"] = float(np.max(np.abs(scored["logp"] - scored["sample_logp"])[m_tok],
                                                    initial=0.0))
        for name, v in first.info["per_function"].items():
            out[f"reward/{name}"] = float(np.mean(v))
        if self.accuracy_key is not None:
            out["accuracy"] = float(np.mean(first.info["per_function"][self.accuracy_key]))
        if "teacher_logp" in scored and m_tok.any():  # the sampled estimate of the per-token reverse KL
            out["teacher_kl_k1"] = float(np.mean((scored["logp"] - scored["teacher_logp"])[m_tok]))
        if "ref_logp" in scored and m_tok.any():
            log_r = scored["ref_logp"] - scored["logp"]
            out["kl_ref_k1"] = float(np.mean(-log_r[m_tok]))
            out["kl_ref_k3"] = float(np.mean((np.exp(log_r) - 1 - log_r)[m_tok]))
        return out
