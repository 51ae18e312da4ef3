"""The RL recipe (GRPO and its family, RLOO, REINFORCE++, PPO) on a built-in verifiable task or your own prompts,
from an SFT start.

`run(cfg, workdir)`:
1. the SFT start: the params and tokenizer of the SFT workdir `cfg.init_from`, or an SFT run of `cfg.sft` into
   `workdir/sft` first (itself resumable);
2. the policy (+ value head or critic for PPO) initialised from it; the reference = the SFT params (held sharded
   beside the policy when a KL term or the `kl_ref` metric needs them);
3. prompts from the task's train split or from `prompts_jsonl` (a grain pipeline, resumable); rewards = the task's
   checker (0/1, reported as `accuracy`), or the functions named in `rewards` (below), plus optionally a learned
   reward model (an RM workdir of `jaxpost.recipes.rm` with the same model config and tokenizer);
4. `steps` RL iterations (`jaxpost.train.rl_loop.RLTrainer`), metrics every iteration, held-out evaluation every
   `train.eval_every` iterations, checkpoints (policy, value, optimizer, step, RNG, prompt-iterator state);
5. results.json (`accuracy_before` = the SFT start's held-out greedy accuracy, `accuracy_after`, wall times) and
   rl.png (reward, accuracy, KL, entropy, clip fraction, response length, held-out accuracy).
A killed run resumes from its latest checkpoint and continues exactly.

Your own data (what TRL's GRPOTrainer users bring: a prompt dataset with extra columns, reward functions of the
completion and those columns, weights):

    # train.jsonl, one record a line: "prompt" (or "messages"), any other fields
    {"prompt": "What is 17 + 25?", "answer": "42", "level": 1}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 * 4?"}],
     "answer": "12", "level": 2}

    # my_rewards.py (importable: on PYTHONPATH, e.g. the directory `python -m` runs from); called once per sample
    # with the record's other fields as keyword arguments
    def brevity(prompt, completion, *, level, **example):
        return 1.0 if len(completion) <= 8 * level else 0.0

    python -m experiments.grpo_arith --workdir runs/grpo_own --config.init_from=runs/sft_arith \\
        --config.prompts_jsonl=train.jsonl --config.eval_jsonl=test.jsonl \\
        --config.rewards=math_answer,my_rewards:brevity --config.reward_weights=1.0,0.2 \\
        --config.reward_aggregation=normalize_then_sum --config.advantage.grpo_scale=batch \\
        --config.advantage.grpo_eps=1e-4   # the last three: TRL's multi_objective_aggregation="normalize_then_sum"

- `prompts_jsonl`: records with `prompt` or `messages` (a final assistant turn is left out and travels as
  `reference`, as a `completion` field does); every other field reaches the reward functions as a keyword argument.
  The file is read and checked before anything is trained: a malformed line, a record without a field that a
  configured reward requires (`answer` for the built-in verifiers, an imported function's keyword parameters without
  default), or a prompt longer than `rollout.max_prompt_len` tokens is a `DataError` naming `file:line`.
- `rewards` / `reward_weights`: built-in names (correct = the task's checker, digit_match, math_answer, exact_match,
  format) and import paths "pkg.mod:fn" (or TRL's dotted "pkg.mod.fn"), comma-separated, with one weight each ("" =
  all 1.0); an unknown name, a module that does not import, a non-callable, a signature that cannot take
  `(prompt, completion, **example)` or a bad / miscounted weight is a ValueError when the config is built
  (`jaxpost.rollout.reward_registry`). "" keeps the built-in task's rewards (`correctness_weight`,
  `digit_match_weight`); `prompts_jsonl` needs them named.
- `reward_aggregation`: "sum" (weighted sum) or "normalize_then_sum" (each function standardised within its prompt
  group, then weighted and summed: `jaxpost.rollout.rewards.RewardSet`, TRL's convention).
- `accuracy_reward`: the reward reported as `accuracy` (and `eval_accuracy`): "" = the first 0/1 answer verifier
  among the rewards (correct, math_answer, exact_match), "none", or a reward's name.
- `eval_jsonl`: held-out records (same format, with an `answer` field; the first `eval.n_examples`, prompts up to
  `eval.max_prompt_len` tokens), decoded greedily and scored by the configured function rewards summed with their
  weights (no learned reward model, no overlong penalty): metrics `eval_reward_mean` and, with an accuracy reward,
  `eval_accuracy`; results.json adds `eval_reward_before` / `eval_reward_after`. Without `eval_jsonl` the built-in
  task's test split is evaluated when the prompts are the task's, and evaluation is skipped (accuracy_before and
  accuracy_after None) when they come from `prompts_jsonl`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxpost.config import (AdvantageConfig, EvalConfig, LoRAConfig, MeshConfig, OptimConfig, RLLossConfig,
                            RolloutConfig, TrainConfig, check_rl)
from jaxpost.data.prompts import build_prompt_iterator, prompt_messages
from jaxpost.data.sources import DataError, read_jsonl
from jaxpost.models import LM
from jaxpost.models.heads import ScalarHeadLM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.distill import check_same_tokenizer, load_workdir_params
from jaxpost.recipes.common import (TRACE_KEYS, Run, eval_sampler, evaluate_before, load_params, load_start_params,
                                    open_sft_start, task_evaluator, task_results)
from jaxpost.rollout import SamplingConfig
from jaxpost.rollout.reward_registry import RewardSpec, accuracy_reward_name, build_reward_set, parse_rewards
from jaxpost.rollout.rewards import REWARD_AGGREGATIONS, LearnedReward, RewardSet
from jaxpost.tokenizers import decode_completion, load_tokenizer
from jaxpost.train.loop import read_metrics
from jaxpost.train.optim import make_optimizer
from jaxpost.train.rl import PolicyModel
from jaxpost.train.rl_loop import RLTrainer
from jaxpost.train.state import abstract_train_state, new_train_state, state_shardings, trainable_of

log = logging.getLogger("jaxpost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """RL from an SFT start on a built-in task or your own prompts (module docstring). `steps` counts RL iterations
    (each: one rollout batch, then rollout.ppo_epochs x rollout.minibatches optimizer updates). Defaults are GRPO
    (group-normalised advantages, PPO-clip with DAPO's clip-higher, token-mean loss, no KL)."""

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
    # your own data and rewards (module docstring)
    prompts_jsonl: str = ""  # JSONL prompt records; "" = the built-in task's train split
    eval_jsonl: str = ""  # JSONL held-out records with `answer`; "" = the task's test split, or none with prompts_jsonl
    rewards: str = ""  # "name,pkg.mod:fn,...": built-in names and import paths; "" = the task's checker (+ digit_match)
    reward_weights: str = ""  # "1.0,0.5": one weight per entry of `rewards`; "" = every weight 1.0
    reward_aggregation: str = "sum"  # "sum" | "normalize_then_sum" (per-function z-scores within each group)
    accuracy_reward: str = ""  # the reward reported as accuracy: "" = the first 0/1 answer verifier, "none", a name
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5,
                                                                                min_lr_ratio=1.0))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(log_every=5, checkpoint_every=10))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logprobs_impl: str = "auto"
    # on-policy distillation as a dense per-token advantage: a teacher workdir (any recipe's; the policy's tokenizer),
    # weighted by advantage.teacher_coef (the task rewards may be weighted 0: pure distillation)
    teacher_from: str = ""

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"RLConfig.steps must be > 0, got {self.steps}")
        check_rl(value=self.value, advantage=self.advantage, loss=self.loss, reference=self.reference,
                 teacher=bool(self.teacher_from))
        if self.reward_aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(f"RLConfig.reward_aggregation must be one of {REWARD_AGGREGATIONS}, got "
                             f"{self.reward_aggregation!r}")
        if self.rewards and (self.correctness_weight != 1.0 or self.digit_match_weight != 0.0):
            raise ValueError("RLConfig: with `rewards` set, name every reward there and weigh it in `reward_weights` "
                             "(e.g. rewards='correct,digit_match', reward_weights='1.0,0.3') instead of "
                             "correctness_weight / digit_match_weight")
        if self.reward_weights and not self.rewards:
            raise ValueError(f"RLConfig.reward_weights={self.reward_weights!r} without `rewards`: name the reward "
                             f"functions they weigh")
        if self.prompts_jsonl and not self.rewards:
            raise ValueError("RLConfig.prompts_jsonl needs `rewards`: name the reward functions for your data, e.g. "
                             "rewards='math_answer' or 'my_module:my_reward' (rewards='correct' is the built-in "
                             "task's checker)")
        accuracy_reward_name(self.reward_specs(), self.accuracy_reward)  # imports and checks every reward now

    def reward_specs(self) -> tuple[RewardSpec, ...]:
        """The checked reward list (`jaxpost.rollout.reward_registry.parse_rewards`): `rewards` / `reward_weights`,
        or, without them, the built-in task's checker "correct" (weight correctness_weight) and "digit_match"
        (digit_match_weight, when not 0)."""
        if self.rewards:
            return parse_rewards(self.rewards, self.reward_weights)
        names, weights = ["correct"], [self.correctness_weight]
        if self.digit_match_weight:
            names.append("digit_match")
            weights.append(self.digit_match_weight)
        return parse_rewards(",".join(names), ",".join(repr(float(w)) for w in weights))


def training_curves(metrics_path: str, keys, *, window: int = 10) -> dict:
    """{"curves": {key: [[iteration, value], ...]}, "<key>_first10", "<key>_last10"}: the per-iteration curves of
    `keys` in metrics.jsonl and their means over the first and last `window` iterations (e.g. whether the training
    reward rose)."""
    records = [r for r in read_metrics(metrics_path) if r.get("step", 0) > 0]
    out = {"curves": {}}
    for key in keys:
        pts = [[r["step"], r[key]] for r in records if r.get(key) is not None]
        out["curves"][key] = pts
        if pts:
            name = key.replace("/", "_")
            out[f"{name}_first{window}"] = float(np.mean([v for _, v in pts[:window]]))
            out[f"{name}_last{window}"] = float(np.mean([v for _, v in pts[-window:]]))
    return out


def load_reward_model(path: str, model_cfg, mesh):
    """(ScalarHeadLM, params) of an RM workdir (`jaxpost.recipes.rm`), restored sharded; its model config must be
    the policy's."""
    model = ScalarHeadLM(model_cfg)
    return model, load_params(model, mesh, path)


def _prompt_text(messages: Sequence[Mapping]) -> str:
    """The text the reward functions get as `prompt`: the last user message (as the prompt pipeline gives it)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def read_prompt_jsonl(path: str, *, needs: Mapping[str, Sequence[str]] | None = None) -> tuple[list[dict], list[int]]:
    """(records, their 1-based line numbers) of a JSONL file of prompt records (`prompt` or `messages`, any other
    fields; `jaxpost.data.prompts.prompt_messages`). `needs`: field -> the rewards that read it; a record without
    the field (among its fields as the reward functions get them) is an error. Raises DataError naming
    `path:line` for the first bad line (`jaxpost.data.sources.read_jsonl`), FileNotFoundError for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such JSONL file")
    needs = dict(needs or {})

    def check(record):
        _, extra = prompt_messages(record)
        for field, readers in needs.items():
            if field not in extra:
                raise DataError(f"missing field {field!r} (read by {', '.join(readers)})")
        return dict(record)

    records = read_jsonl(path, normalize=check)
    with open(path, encoding="utf-8") as f:  # the lines read_jsonl parsed: the non-blank ones
        lines = [n for n, line in enumerate(f, start=1) if line.strip()]
    if not records:
        raise DataError(f"{path}: no records")
    return records, lines


def check_prompt_lengths(path: str, records: Sequence[Mapping], lines: Sequence[int], tokenizer, *,
                         max_prompt_len: int, setting: str) -> None:
    """Raises DataError naming `path:line` for the first record whose chat-encoded prompt (with the generation
    prompt) is longer than `max_prompt_len` tokens (the config field `setting`)."""
    for record, line in zip(records, lines):
        messages, _ = prompt_messages(record)
        n = len(tokenizer.encode_chat(messages, add_generation_prompt=True)[0])
        if n > max_prompt_len:
            raise DataError(f"{path}:{line}: prompt has {n} tokens > {setting}={max_prompt_len}; raise {setting} or "
                            f"shorten the prompt")


def reward_evaluator(lm, tokenizer, records: Sequence[Mapping], rewards: RewardSet, cfg: EvalConfig, mesh, *,
                     accuracy_key: str | None, params_of=lambda params: params):
    """`evaluate(params, full=False)` on held-out prompt records (the first `cfg.n_examples`): greedy completions (the
    KV-cache sampler at temperature 0), scored by `rewards` (weighted sum). Returns the metrics
    {"eval_reward_mean": mean total reward, "eval_accuracy": mean of the `accuracy_key` reward (with one)}; {} without
    records; `full=True` gives {"metrics": ..., "samples": the first 5 (prompt, completion, answer, reward)}."""
    encoded = []
    for record in records[:cfg.n_examples]:
        messages, extra = prompt_messages(record)
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        encoded.append((np.asarray(ids, np.int32), _prompt_text(messages), extra))
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, stop_ids=tuple(tokenizer.stop_ids))

    def evaluate(params, full: bool = False):
        if not encoded:
            return {"metrics": {}, "samples": []} if full else {}
        sampler = eval_sampler(lm, mesh, tokenizer.pad_id, cfg.max_prompt_len)
        completions = []
        for start in range(0, len(encoded), cfg.batch_size):
            prompts = [ids for ids, _, _ in encoded[start:start + cfg.batch_size]]
            n = len(prompts)
            prompts += [prompts[0]] * (cfg.batch_size - n)  # filler rows: every batch has one shape (one compile)
            rollout = sampler.generate(params_of(params), prompts, sampling)
            completions += [decode_completion(tokenizer, rollout.tokens[row, :rollout.lengths[row]])
                            for row in range(n)]
        res = rewards([text for _, text, _ in encoded], completions, [extra for _, _, extra in encoded])
        metrics = {"eval_reward_mean": float(np.mean(res.total))}
        if accuracy_key is not None:
            metrics["eval_accuracy"] = float(np.mean(res.per_function[accuracy_key]))
        if not full:
            return metrics
        samples = [{"prompt": text, "completion": completions[i], "answer": extra.get("answer"),
                    "reward": float(res.total[i]),
                    **({"correct": float(res.per_function[accuracy_key][i])} if accuracy_key is not None else {})}
                   for i, (_, text, extra) in enumerate(encoded[:5])]
        return {"metrics": metrics, "samples": samples}

    return evaluate


def run(cfg: RLConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) -> RL; writes config.json, metrics.jsonl, checkpoints/, rl.png and results.json
    into workdir, resuming whatever exists there. `stop_at` stops after that iteration (as a preemption would)."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    specs = cfg.reward_specs()
    accuracy_key = accuracy_reward_name(specs, cfg.accuracy_reward)
    needs: dict[str, list[str]] = {}
    for spec in specs:
        for field in spec.needs:
            needs.setdefault(field, []).append(f"reward {spec.source!r}")
    # Your own prompt files are read and checked before the SFT start (which may train first).
    train_file = read_prompt_jsonl(cfg.prompts_jsonl, needs=needs) if cfg.prompts_jsonl else None
    eval_file = None
    if cfg.eval_jsonl:
        eval_file = read_prompt_jsonl(cfg.eval_jsonl, needs={"answer": ["the held-out evaluation"], **needs})
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, cfg.sft, sft_recipe.run)
    if train_file is not None:
        check_prompt_lengths(cfg.prompts_jsonl, *train_file, tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                             setting="rollout.max_prompt_len")
    if eval_file is not None:
        n = cfg.eval.n_examples
        check_prompt_lengths(cfg.eval_jsonl, eval_file[0][:n], eval_file[1][:n], tokenizer,
                             max_prompt_len=cfg.eval.max_prompt_len, setting="eval.max_prompt_len")
    t_rl = time.perf_counter()

    lm = LM(sft_cfg.model, cfg.lora)
    model = PolicyModel(lm, value=cfg.value)
    start_params = load_start_params(sft_cfg, mesh, sft_dir)
    ro = cfg.rollout
    tx, schedule = make_optimizer(cfg.optim, cfg.steps * ro.updates_per_iteration,
                                  logical_axes=trainable_of(model, model.logical_axes))
    abstract = abstract_train_state(model, tx)
    shardings = state_shardings(abstract, model.param_shardings(mesh), tx, mesh, model=model)
    source = task.source("train") if train_file is None else train_file[0]
    prompts = build_prompt_iterator(source, tokenizer, batch_size=ro.prompts_per_step,
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

    # a task with worked answers: the fraction of samples that use the trace is measured (weight 0: not rewarded)
    traced = train_file is None and hasattr(task, "has_trace")
    observe = {"trace": lambda prompt, completion, **_: float(task.has_trace(completion))} if traced else None
    rewards = build_reward_set(specs, task=task, timeout_s=cfg.reward_timeout_s, aggregation=cfg.reward_aggregation,
                               observe=observe)
    learned = None
    if cfg.reward_model:
        rm_model, rm_params = load_reward_model(cfg.reward_model, sft_cfg.model, mesh)
        learned = LearnedReward(rm_model, rm_params, mesh, rows=ro.rows_per_update)
    teacher = None
    if cfg.teacher_from:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher_from), student_from=sft_dir,
                             teacher_from=cfg.teacher_from)
        teacher = load_workdir_params(cfg.teacher_from, mesh)
    trainer = RLTrainer(model=model, tx=tx, schedule=schedule, mesh=mesh, state_shardings=shardings,
                        tokenizer=tokenizer, rewards=rewards, rollout=ro, loss=cfg.loss, advantage=cfg.advantage,
                        ref_params=ref_params, base_reference=cfg.reference and lm.lora is not None,
                        learned_reward=learned, learned_reward_weight=cfg.reward_model_weight,
                        accuracy_key=accuracy_key, grad_accum=cfg.train.grad_accum, logprobs_impl=cfg.logprobs_impl,
                        teacher=teacher)

    # Held-out evaluation: eval_jsonl (greedy, the function rewards summed), else the task's test split when the
    # prompts are the task's, else none.
    plots = (("eval_accuracy", "accuracy") + (("eval_trace_fraction", "reward/trace") if traced else ())
             + ("response_length", "reward_mean", "kl_ref_k3", "entropy", "clip_frac", "zero_adv_group_frac"))
    if eval_file is not None:
        eval_rewards = build_reward_set(specs, task=task, timeout_s=cfg.reward_timeout_s, aggregation="sum")
        evaluate = reward_evaluator(lm, tokenizer, eval_file[0], eval_rewards, cfg.eval, mesh,
                                    accuracy_key=accuracy_key, params_of=lambda params: params["policy"])
        if "eval_before" not in run.meta:
            before = run.once("eval_before", lambda: evaluate(state.params))
            if before:
                run.metrics.write({"step": 0, **before})
        eval_metrics = evaluate if cfg.eval.n_examples else None  # params -> metrics
        plots += ("eval_reward_mean",)
    elif train_file is not None:
        log.info("no held-out evaluation: prompts from %s and no eval_jsonl", cfg.prompts_jsonl)
        eval_metrics = None
    else:
        evaluate = task_evaluator(lm, tokenizer, task, cfg.eval, mesh, params_of=lambda params: params["policy"])

        def eval_metrics(params, full=None):
            full = full or evaluate(params, full=True)
            return {f"eval_{k}": full[k] for k in ("accuracy",) + TRACE_KEYS if full.get(k) is not None}

        if "accuracy_before" not in run.meta:
            evaluate_before(run, evaluate, state.params)
            run.metrics.write({"step": 0, **eval_metrics(None, {"accuracy": run.meta["accuracy_before"],
                                                                  **run.meta["trace_before"]})})

    # Each iteration draws its prompt batches from the prompt source itself (more than one under dynamic sampling).
    state = run.train(trainer.iteration, state, itertools.repeat(prompts),
                      evaluate=None if eval_metrics is None else (lambda st: eval_metrics(st.params)),
                      host_metrics=lambda: prompts.stats, desc=cfg.advantage.estimator)
    if state is None:
        return None
    if eval_file is not None:
        final = evaluate(state.params, full=True)
        if final["metrics"]:
            run.metrics.write({"step": cfg.steps, **final["metrics"]})
        before, after = run.meta["eval_before"], final["metrics"]
        head = {"accuracy_before": before.get("eval_accuracy"), "accuracy_after": after.get("eval_accuracy"),
                "eval_reward_before": before.get("eval_reward_mean"),
                "eval_reward_after": after.get("eval_reward_mean"), "samples": final["samples"]}
    elif train_file is not None:
        head = {"accuracy_before": None, "accuracy_after": None, "samples": []}
    else:
        final = evaluate(state.params, full=True)
        run.metrics.write({"step": cfg.steps, **eval_metrics(None, final)})
        head = task_results(run, final)
    curves = training_curves(run.path("metrics.jsonl"), ("reward_mean", "response_length") +
                             (("reward/trace",) if traced else ()))
    return run.finish({**head, "estimator": cfg.advantage.estimator,
                       "policy_loss": cfg.loss.policy_loss, "value": cfg.value,
                       "rl_time_s": time.perf_counter() - t_rl, "sft_dir": sft_dir, **curves},
                      plots=plots, filename="rl.png",
                      title=f"{cfg.advantage.estimator} / {cfg.loss.policy_loss} from the SFT start",
                      xlabel="iteration")
