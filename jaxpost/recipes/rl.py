"""The RL recipe (GRPO and its family, RLOO, REINFORCE++, PPO) on a built-in verifiable task, from an SFT start.

`run(cfg, workdir)`:
1. the SFT start: the params and tokenizer of the SFT workdir `cfg.init_from`, or an SFT run of `cfg.sft` into
   `workdir/sft` first (itself resumable);
2. the policy (+ value head or critic for PPO) initialised from it; the reference = the SFT params (held sharded
   beside the policy when a KL term or the `kl_ref` metric needs them);
3. prompts from the task's train split (a grain pipeline, resumable), rewards = the task's checker (0/1, reported
   as `accuracy`) plus optionally a learned reward model (an RM workdir of `jaxpost.recipes.rm` with the same
   model config and tokenizer);
4. `steps` RL iterations (`jaxpost.train.rl_loop.RLTrainer`), metrics every iteration, held-out greedy accuracy every
   `train.eval_every` iterations, checkpoints (policy, value, optimizer, step, RNG, prompt-iterator state);
5. results.json (`accuracy_before` = the SFT start's held-out greedy accuracy, `accuracy_after`, wall times) and
   rl.png (reward, accuracy, KL, entropy, clip fraction, response length, held-out accuracy).
A killed run resumes from its latest checkpoint and continues exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import jax

from jaxpost.config import (AdvantageConfig, EvalConfig, LoRAConfig, MeshConfig, OptimConfig, RLLossConfig,
                            RolloutConfig, TrainConfig, check_rl)
from jaxpost.data.prompts import build_prompt_iterator
from jaxpost.models import LM
from jaxpost.models.heads import ScalarHeadLM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import Run, load_params, load_start_params, open_sft_start, task_evaluator
from jaxpost.rollout.rewards import LearnedReward, RewardSet, digit_match_reward, task_reward
from jaxpost.train.optim import make_optimizer
from jaxpost.train.rl import PolicyModel
from jaxpost.train.rl_loop import RLTrainer
from jaxpost.train.state import abstract_train_state, new_train_state, state_shardings, trainable_of

log = logging.getLogger("jaxpost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """RL from an SFT start on a built-in task. `steps` counts RL iterations (each: one rollout batch, then
    rollout.ppo_epochs x rollout.minibatches optimizer updates). Defaults are GRPO (group-normalised advantages,
    PPO-clip with DAPO's clip-higher, token-mean loss, no KL)."""

    seed: int = 0
    steps: int = 100
    init_from: str = ""  # an SFT workdir; "" runs `sft` first into workdir/sft
    sft: sft_recipe.SFTConfig = dataclasses.field(default_factory=sft_recipe.SFTConfig)
    value: str = "none"  # "head" (value head on the policy's decoder) or "critic" (separate decoder) for PPO
    reference: bool = True  # hold the SFT params as the reference (KL term, kl_ref metrics)
    # LoRA adapters on the policy (rank 0: train every weight); the reference is then the base model with the
    # adapters disabled (no second copy of the weights)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: RLLossConfig = dataclasses.field(default_factory=lambda: RLLossConfig(eps_high=0.28))
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    correctness_weight: float = 1.0
    digit_match_weight: float = 0.0  # partial credit per correct digit (jaxpost.rollout.rewards.digit_match_reward)
    reward_model: str = ""  # an RM workdir; its score is added with weight reward_model_weight
    reward_model_weight: float = 1.0
    reward_timeout_s: float = 10.0
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5,
                                                                                min_lr_ratio=1.0))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(log_every=5, checkpoint_every=10))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logprobs_impl: str = "auto"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"RLConfig.steps must be > 0, got {self.steps}")
        check_rl(value=self.value, advantage=self.advantage, loss=self.loss, reference=self.reference)


def load_reward_model(path: str, model_cfg, mesh):
    """(ScalarHeadLM, params) of an RM workdir (`jaxpost.recipes.rm`), restored sharded; its model config must be
    the policy's."""
    model = ScalarHeadLM(model_cfg)
    return model, load_params(model, mesh, path)


def run(cfg: RLConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) -> RL; writes config.json, metrics.jsonl, checkpoints/, rl.png and results.json
    into workdir, resuming whatever exists there. `stop_at` stops after that iteration (as a preemption would)."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, cfg.sft, sft_recipe.run)
    t_rl = time.perf_counter()

    lm = LM(sft_cfg.model, cfg.lora)
    model = PolicyModel(lm, value=cfg.value)
    start_params = load_start_params(sft_cfg, mesh, sft_dir)
    ro = cfg.rollout
    tx, schedule = make_optimizer(cfg.optim, cfg.steps * ro.updates_per_iteration,
                                  logical_axes=trainable_of(model, model.logical_axes))
    abstract = abstract_train_state(model, tx)
    shardings = state_shardings(abstract, model.param_shardings(mesh), tx, mesh, model=model)
    prompts = build_prompt_iterator(task.source("train"), tokenizer, batch_size=ro.prompts_per_step,
                                    max_prompt_len=ro.max_prompt_len, seed=cfg.seed)

    def make(policy_params, key):
        init_key, state_key = jax.random.split(key)
        params = model.from_policy(policy_params, init_key)
        return new_train_state(model, tx, params, state_key)

    def init():
        key = jax.random.PRNGKey(cfg.seed)
        policy = start_params
        if lm.lora is not None:  # the base arrays move into the state (donated); the reference is that base
            policy = lm.add_adapters(start_params, jax.random.fold_in(key, 1), mesh)
        return jax.jit(make, out_shardings=shardings, donate_argnums=(0,) if lm.lora is not None else ())(
            policy, key)

    state = run.restore_or_init(abstract, shardings, prompts, init, updates_per_step=ro.updates_per_iteration)
    ref_params = start_params if cfg.reference and lm.lora is None else None
    if ref_params is None:
        del start_params

    functions, weights = {"correct": task_reward(task)}, {"correct": cfg.correctness_weight}
    if cfg.digit_match_weight:
        functions["digit_match"], weights["digit_match"] = digit_match_reward, cfg.digit_match_weight
    rewards = RewardSet(functions, weights=weights, timeout_s=cfg.reward_timeout_s)
    learned = None
    if cfg.reward_model:
        rm_model, rm_params = load_reward_model(cfg.reward_model, sft_cfg.model, mesh)
        learned = LearnedReward(rm_model, rm_params, mesh, rows=ro.rows_per_update)
    trainer = RLTrainer(model=model, tx=tx, schedule=schedule, mesh=mesh, state_shardings=shardings,
                        tokenizer=tokenizer, rewards=rewards, rollout=ro, loss=cfg.loss, advantage=cfg.advantage,
                        ref_params=ref_params, base_reference=cfg.reference and lm.lora is not None,
                        learned_reward=learned, learned_reward_weight=cfg.reward_model_weight,
                        accuracy_key="correct", grad_accum=cfg.train.grad_accum, logprobs_impl=cfg.logprobs_impl)

    evaluate = task_evaluator(lm, tokenizer, task, cfg.eval, mesh, params_of=lambda params: params["policy"])
    if "accuracy_before" not in run.meta:
        run.once("accuracy_before", lambda: evaluate(state.params))
        run.metrics.write({"step": 0, "eval_accuracy": run.meta["accuracy_before"]})

    # Each iteration draws its prompt batches from the prompt source itself (more than one under dynamic sampling).
    state = run.train(trainer.iteration, state, itertools.repeat(prompts),
                      evaluate=lambda st: {"eval_accuracy": evaluate(st.params)},
                      host_metrics=lambda: prompts.stats, desc=cfg.advantage.estimator)
    if state is None:
        return None
    final = evaluate(state.params, full=True)
    run.metrics.write({"step": cfg.steps, "eval_accuracy": final["accuracy"]})
    return run.finish({"accuracy_before": run.meta["accuracy_before"], "accuracy_after": final["accuracy"],
                       "samples": final["samples"], "estimator": cfg.advantage.estimator,
                       "policy_loss": cfg.loss.policy_loss, "value": cfg.value,
                       "rl_time_s": time.perf_counter() - t_rl, "sft_dir": sft_dir},
                      plots=("reward_mean", "accuracy", "eval_accuracy", "kl_ref_k3", "entropy", "clip_frac",
                             "response_length", "zero_adv_group_frac"), filename="rl.png",
                      title=f"{cfg.advantage.estimator} / {cfg.loss.policy_loss} from the SFT start")
