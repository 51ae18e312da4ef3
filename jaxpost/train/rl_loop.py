"""The RL iteration, host side: prompts -> sampler -> rewards -> scoring -> advantages -> PPO epochs of updates.

One call of `RLTrainer.iteration(state, prompts, more_prompts)`:

1. rollout: the KV-cache sampler draws `group_size` completions of each prompt from the current policy params (read
   in place, no copy);
2. rewards: the verifier functions (`RewardSet`, on decoded text) and optionally a learned reward model, weighted;
   DAPO's soft overlong penalty; dynamic sampling (DAPO) drops groups whose rewards are all equal and draws more
   prompts (`more_prompts()`) until the batch is full or `max_sampling_rounds` is reached (the rest is padding rows,
   masked out everywhere);
3. scoring: one forward-only pass gives the old policy's log-probs and entropy, the reference's log-probs and the
   value model's values (with `old_logp="sampler"` the old log-probs are the sampler's own, and the pass runs only
   for a reference or a value model, or not at all);
4. advantages over the whole batch (`jaxpost.train.rl.compute_advantages`);
5. `ppo_epochs` passes over the rows, shuffled and split into `minibatches` optimizer steps of the pure sharded
   update step (`jaxpost.train.rl.make_rl_step`).

Randomness (sampling seeds and mini-batch orders) derives from the train state's RNG key and the iteration number,
so a run resumed from a checkpoint (state + prompt-iterator state) continues exactly as if uninterrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxpost.losses import dynamic_sampling_keep, overlong_penalty
from jaxpost.rollout import Rollout, Sampler, SamplingConfig, rollout_batch
from jaxpost.tokenizer import decode_completion
from jaxpost.train.dpo import ROW_KEYS
from jaxpost.train.rl import (AdvantageConfig, PolicyModel, RLLossConfig, batch_keys, compute_advantages,
                              make_rl_scorer, make_rl_step, split_rl_microbatches)

log = logging.getLogger("jaxpost")

#: Where the old policy's log-probs come from (`RolloutConfig.old_logp`).
OLD_LOGP_SOURCES = ("trainer", "sampler")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """What one RL iteration samples and how it is consumed.

    prompts_per_step x group_size rows per iteration. max_new_tokens, temperature, top_k, top_p: the sampler.
    dynamic_sampling: keep only groups with unequal rewards, drawing up to max_sampling_rounds prompt batches.
    overlong_buffer > 0: DAPO's soft overlong penalty over the last `overlong_buffer` tokens before max_new_tokens
    (times overlong_penalty_factor). ppo_epochs passes over the batch, each in `minibatches` optimizer steps.
    old_logp: where the old policy's log-probs (the PPO ratio's denominator) come from: "trainer" recomputes them in
    the scoring pass with the update step's own forward and log-prob core (ratio 1 at the first update up to float
    rounding); "sampler" takes the sampler's (the same quantity under the untruncated temperature-T softmax,
    computed by the decode loop: equal to ~1e-5 in float32, checked every iteration as `sampler_logp_diff` when the
    trainer's are computed) and skips the policy's forward in the scoring pass; verl's rollout log-probs.
    """

    prompts_per_step: int = 64
    group_size: int = 8
    max_new_tokens: int = 8
    max_prompt_len: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0
    ppo_epochs: int = 1
    minibatches: int = 1
    old_logp: str = "trainer"

    def __post_init__(self):
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "max_prompt_len", "max_sampling_rounds",
                     "ppo_epochs", "minibatches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RolloutConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"RolloutConfig.temperature must be > 0 for RL (sampling), got {self.temperature}")
        if self.rows % self.minibatches:
            raise ValueError(f"RolloutConfig: {self.rows} rows do not split into minibatches={self.minibatches}")
        if self.old_logp not in OLD_LOGP_SOURCES:
            raise ValueError(f"RolloutConfig.old_logp must be one of {OLD_LOGP_SOURCES}, got {self.old_logp!r}")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"RolloutConfig.overlong_buffer must be in [0, max_new_tokens], got "
                             f"{self.overlong_buffer}")

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches


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
    return Rollout(tokens=tokens, mask=np.arange(N)[None, :] < lengths[:, None], logprobs=logprobs, lengths=lengths, finish=finish,
                   prompt_index=np.repeat(np.arange(total_groups, dtype=np.int32), group_size), prompts=prompts,
                   steps=max(p.steps for p in parts)), row_mask


class RLTrainer:
    """Runs RL iterations for one policy model on one mesh (see the module docstring).

    rewards(prompts, completions, examples) -> RewardResult (a `jaxpost.rollout.rewards.RewardSet`);
    learned_reward: optional `LearnedReward` (scores rollout rows), weighted by `learned_reward_weight`;
    accuracy_key: the reward function whose mean is reported as `accuracy` (a 0/1 verifier);
    ref_params: the reference decoder params (sharded like the policy's) for a KL term or the `kl_ref` metric; for a
    LoRA policy, pass none and set `base_reference=True`: the reference is the base model (adapters disabled).
    """

    def __init__(self, *, model: PolicyModel, tx, schedule, mesh, state_shardings, tokenizer, rewards,
                 rollout: RolloutConfig, loss: RLLossConfig, advantage: AdvantageConfig, ref_params=None,
                 learned_reward=None, learned_reward_weight: float = 1.0, accuracy_key: str | None = None,
                 grad_accum: int = 1, logprobs_impl: str = "auto", base_reference: bool = False):
        if loss.temperature != rollout.temperature:
            raise ValueError(f"loss.temperature={loss.temperature} must equal rollout.temperature="
                             f"{rollout.temperature}: the ratio compares log-probs under the sampling distribution")
        if model.value == "none" and advantage.estimator == "gae":
            raise ValueError("the gae estimator needs a value model: set value='head' or 'critic'")
        if base_reference and (getattr(model.lm, "lora", None) is None or ref_params is not None):
            raise ValueError("base_reference=True needs a LoRA policy and no ref_params")
        if loss.kl_coef > 0 and ref_params is None and not base_reference:
            raise ValueError("a KL penalty (kl_coef > 0) needs the reference params (or, for a LoRA policy, "
                             "base_reference=True)")
        if loss.aggregation == "seq_mean_token_sum_norm" and not loss.max_length:
            loss = dataclasses.replace(loss, max_length=rollout.max_new_tokens)
        self.model, self.mesh, self.tokenizer, self.rewards = model, mesh, tokenizer, rewards
        self.rollout_cfg, self.loss_cfg, self.adv_cfg = rollout, loss, advantage
        self.ref_params, self.learned_reward, self.learned_weight = ref_params, learned_reward, learned_reward_weight
        self.accuracy_key = accuracy_key
        self.grad_accum = grad_accum
        self.rows_per_update = rollout.rows // rollout.minibatches
        self.sampler = Sampler(model.lm, mesh, pad_id=tokenizer.pad_id, min_prompt_bucket=rollout.max_prompt_len)
        self.sampling = SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                       top_k=rollout.top_k, top_p=rollout.top_p, n_samples=rollout.group_size,
                                       stop_ids=tuple(tokenizer.stop_ids))
        self.step = make_rl_step(model, tx, schedule, mesh, state_shardings, loss, rows=self.rows_per_update,
                                 grad_accum=grad_accum, logprobs_impl=logprobs_impl)
        self.keys = batch_keys(model, loss)
        with_ref = ref_params is not None or base_reference
        self.trainer_logp = rollout.old_logp == "trainer"
        self.scorer = None  # nothing to score: sampler log-probs, no reference, no value model
        if self.trainer_logp or with_ref or model.value != "none":
            self.scorer = make_rl_scorer(model, mesh, state_shardings.params, rows=self.rows_per_update,
                                         temperature=rollout.temperature, with_ref=with_ref,
                                         policy=self.trainer_logp, logprobs_impl=logprobs_impl)
        self._advantages = jax.jit(compute_advantages,
                                   static_argnames=("cfg", "group_size", "kl_coef", "kl_estimator"))

    # -- pieces -------------------------------------------------------------------------------------------------
    def _seed(self, state, iteration: int, *salt: int) -> int:
        key = np.asarray(jax.device_get(state.rng)).astype(np.uint32).tolist()
        return int(np.random.SeedSequence([*key, iteration, *salt]).generate_state(1)[0])

    def _score_rewards(self, rollout: Rollout, prompts, batch) -> tuple[np.ndarray, dict]:
        completions = [decode_completion(self.tokenizer, c) for c in rollout.completions()]
        texts = [prompts[i].text for i in rollout.prompt_index]
        examples = [prompts[i].example for i in rollout.prompt_index]
        res = self.rewards(texts, completions, examples)
        total = res.total.copy()
        info = {"per_function": res.per_function, "failed": sum(res.failed.values()),
                "timed_out": sum(res.timed_out.values()), "time": res.time_s, "completions": completions}
        if self.learned_reward is not None:
            learned = self.learned_reward(batch)
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

    # -- one iteration --------------------------------------------------------------------------------------------
    def iteration(self, state, prompts: list, more_prompts: Callable[[], list] | None = None):
        """(new state, metrics: host floats) of one RL iteration on `prompts` (a list of `Prompt`s; more are drawn
        with `more_prompts()` under dynamic sampling)."""
        cfg, G = self.rollout_cfg, self.rollout_cfg.group_size
        it = int(jax.device_get(state.step)) // cfg.updates_per_iteration
        params = state.params
        timings = {"rollout_time_s": 0.0, "reward_time_s": 0.0}

        # 1-2. rollouts and rewards (dynamic sampling: rounds until the batch holds prompts_per_step informative
        # groups)
        parts, kept, first = [], [], None
        round_prompts = prompts
        for rnd in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            if rnd > 0:
                if more_prompts is None:
                    break
                round_prompts = more_prompts()
            t0 = time.perf_counter()
            ro = self.sampler.generate(params["policy"], [p.ids for p in round_prompts], self.sampling,
                                       seed=self._seed(state, it, 0, rnd))
            timings["rollout_time_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            total, info = self._score_rewards(ro, round_prompts, self._rows(ro) if self.learned_reward else None)
            timings["reward_time_s"] += time.perf_counter() - t0
            ro = dataclasses.replace(ro, prompts=[p.ids for p in round_prompts])
            parts.append((ro, round_prompts, total, info))
            keep = np.asarray(dynamic_sampling_keep(total, group_size=G))
            if first is None:
                first = {"zero_adv_group_frac": float(1.0 - keep.mean()), "info": info, "total": total, "ro": ro,
                         "prompts": round_prompts}
            groups = [(len(parts) - 1, g) for g in range(len(round_prompts))]
            if cfg.dynamic_sampling:
                groups = [gr for gr, k in zip(groups, keep) if k]
            kept += groups
            if len(kept) >= cfg.prompts_per_step:
                break
        kept = kept[:cfg.prompts_per_step]
        if not cfg.dynamic_sampling:
            rollout, row_mask = parts[0][0], np.ones((cfg.rows,), np.float32)
            rewards = parts[0][2]
        else:
            rollout, row_mask = concat_rollouts([p[0] for p in parts], kept, G, pad_id=self.tokenizer.pad_id,
                                                total_groups=cfg.prompts_per_step)
            rewards = np.zeros((cfg.rows,), np.float32)
            for gi, (pi, g) in enumerate(kept):
                rewards[gi * G:(gi + 1) * G] = parts[pi][2][g * G:(g + 1) * G]
        batch = self._rows(rollout)

        # 3. scoring pass: old log-probs, entropy, reference log-probs, values
        t0 = time.perf_counter()
        scored = {}
        n = self.rows_per_update
        for start in range(0, cfg.rows, n) if self.scorer is not None else ():
            out = self.scorer(params, self.ref_params, {k: batch[k][start:start + n] for k in ROW_KEYS})
            for k, v in jax.device_get(out).items():
                scored.setdefault(k, []).append(np.asarray(v))
        scored = {k: np.concatenate(v) for k, v in scored.items()}
        if not self.trainer_logp:
            scored["logp"] = batch["sample_logp"].astype(np.float32)
        timings["score_time_s"] = time.perf_counter() - t0

        # 4. advantages over the whole batch
        mask = batch["loss_mask"] * row_mask[:, None]
        lc = self.loss_cfg
        kl_coef = lc.kl_coef if lc.kl_in_reward else 0.0
        adv, returns, _ = self._advantages(
            rewards, mask, row_mask, scored["logp"], scored.get("ref_logp", scored["logp"]),
            scored.get("values", np.zeros_like(mask)), cfg=self.adv_cfg, group_size=G, kl_coef=kl_coef,
            kl_estimator=lc.kl_estimator)
        adv = np.asarray(adv)
        full = {**{k: batch[k] for k in ROW_KEYS}, "loss_mask": mask.astype(np.float32), "old_logp": scored["logp"],
                "advantages": adv}
        if lc.kl_in_loss:
            full["ref_logp"] = scored["ref_logp"]
        if self.model.value != "none":
            full["old_values"] = scored["values"]
            full["returns"] = np.asarray(returns)

        self.last_batch = full  # (host arrays of this iteration's update batch, for inspection)

        # 5. ppo_epochs x minibatches updates
        t0 = time.perf_counter()
        step_metrics = []
        for epoch in range(cfg.ppo_epochs):
            order = np.random.default_rng(self._seed(state, it, 1, epoch)).permutation(cfg.rows)
            for mbi in range(cfg.minibatches):
                idx = order[mbi * n:(mbi + 1) * n]
                mb = split_rl_microbatches({k: full[k][idx] for k in self.keys}, self.grad_accum)
                mb = {k: jax.device_put(v, self.step.batch_shardings[k]) for k, v in mb.items()}
                state, m = self.step(state, mb)
                step_metrics.append(m)
        step_metrics = jax.device_get(step_metrics)
        timings["update_time_s"] = time.perf_counter() - t0

        # metrics
        valid = row_mask > 0
        m_tok = mask > 0
        out = {k: float(np.mean([float(sm[k]) for sm in step_metrics])) for k in step_metrics[0]}
        out["first_update_ratio"] = float(step_metrics[0]["ratio"])
        out["first_update_clip_frac"] = float(step_metrics[0].get("clip_frac", 0.0))
        r_first = first["total"]
        out.update({
            "reward_mean": float(r_first.mean()), "reward_std": float(r_first.std()),
            "zero_adv_group_frac": first["zero_adv_group_frac"],
            "response_length": float(first["ro"].lengths.mean()),
            "truncated_frac": float(np.mean(first["ro"].finish == 2)),
            "batch_reward_mean": float(rewards[valid].mean()) if valid.any() else 0.0,
            "batch_groups": float(valid.sum() / G), "sampling_rounds": float(len(parts)),
            "reward_failed": float(sum(p[3]["failed"] for p in parts)),
            "reward_timed_out": float(sum(p[3]["timed_out"] for p in parts)),
            "adv_abs_mean": float(np.abs(adv)[m_tok].mean()) if m_tok.any() else 0.0,
            **timings,
        })
        if self.trainer_logp:  # the scoring pass's view of the rollout, and its check of the sampler
            out["entropy_rollout"] = float(scored["entropy"][m_tok].mean()) if m_tok.any() else 0.0
            out["sampler_logp_diff"] = float(np.max(np.abs(scored["logp"] - batch["sample_logp"])[m_tok],
                                                    initial=0.0))
        for name, v in first["info"]["per_function"].items():
            out[f"reward/{name}"] = float(np.mean(v))
        if self.accuracy_key is not None:
            out["accuracy"] = float(np.mean(first["info"]["per_function"][self.accuracy_key]))
        if "ref_logp" in scored and m_tok.any():
            log_r = scored["ref_logp"] - scored["logp"]
            out["kl_ref_k1"] = float(np.mean(-log_r[m_tok]))
            out["kl_ref_k3"] = float(np.mean((np.exp(log_r) - 1 - log_r)[m_tok]))
        self.last_samples = [(first["prompts"][first["ro"].prompt_index[i]].text, first["info"]["completions"][i],
                              float(r_first[i])) for i in range(min(4, len(r_first)))]
        return state, out
