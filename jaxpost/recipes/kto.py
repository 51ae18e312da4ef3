"""The KTO recipe: SFT start -> unpaired good / bad answers -> (reference log-probs) -> the sharded KTO step -> host
loop with eval and checkpoints.

KTO (Ethayarajh et al. 2024) learns from single completions labelled desirable or undesirable, with no pairing:
the data a deployed model collects as thumbs up / down. Here the labels come from the task's checker.

`run(cfg, workdir)`:
1. the SFT start: the params and tokenizer of the SFT workdir `cfg.init_from`, or, without it, an SFT run of
   `cfg.sft` into `workdir/sft` first (itself resumable);
2. examples: "samples" draws `samples_per_prompt` completions of each training prompt from the SFT model at
   `sample_temperature` and labels each one with the task's checker (correct = desirable), the model's own answers;
   "near_miss" unpairs the task's (correct answer, plausible wrong answer) pairs. Written to `examples.jsonl`;
3. class balance: KTO's loss weighs the two classes by `desirable_weight` and `undesirable_weight`; the paper and
   TRL ask for desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3]. With
   `balance=True`, a ratio outside that range is brought to 1 by setting desirable_weight (recorded in results);
4. with reference="precomputed", one pass over the training batches computes the SFT (reference) model's log-probs
   of every example and KL row (`ref_logps.npy`), so the step holds no second copy of the weights;
5. training, then results.json (accuracy_before = the SFT start's, accuracy_after), kto.png.
Every stage is skipped when its output exists, so a killed run resumes where it stopped.

    python -m experiments.kto_arith --workdir runs/kto --config.init_from=runs/sft_arith
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxpost.batch import ROW_KEYS
from jaxpost.config import DataConfig, EvalConfig, LoRAConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.data.preference import (arithmetic_preference_records, build_kto_iterator, kto_records_from_pairs,
                                     kto_records_from_samples)
from jaxpost.losses import UNPAIRED_LOSSES
from jaxpost.models import LM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import (Run, batch_feeder, cached_records, evaluate_before, load_start_params,
                                    open_sft_start, precomputed, sample_accuracy, sample_task_completions,
                                    policy_init, policy_optimizer, task_evaluator, task_results)
from jaxpost.train.dpo import make_reference_logps
from jaxpost.train.kto import Unpaired
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")

EXAMPLE_SOURCES = ("samples", "near_miss")
#: The range of desirable_weight * n_desirable / (undesirable_weight * n_undesirable) KTO's authors recommend.
BALANCED_RATIO = (1.0, 4.0 / 3.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOConfig:
    """KTO (or another `UNPAIRED_LOSSES` loss) from an SFT start on a built-in task's unpaired examples.
    `data.batch_size` counts examples per optimizer step."""

    seed: int = 0
    steps: int = 150
    init_from: str = ""  # an SFT workdir; "" runs `sft` first into workdir/sft
    sft: sft_recipe.SFTConfig = dataclasses.field(default_factory=sft_recipe.SFTConfig)
    loss: str = "kto"  # an UNPAIRED_LOSSES name: kto, apo_zero_unpaired
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    balance: bool = True  # bring the class-weighted ratio into BALANCED_RATIO (module docstring)
    reference: str = "precomputed"  # "model" (held beside the policy; LoRA: the base) or "precomputed"
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    examples: str = "samples"
    n_prompts: int = 2048
    samples_per_prompt: int = 4
    sample_temperature: float = 1.0
    sample_batch: int = 128
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=32, batch_size=64))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=10))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logprobs_impl: str = "auto"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"KTOConfig.steps must be > 0, got {self.steps}")
        UNPAIRED_LOSSES.get(self.loss)
        if self.examples not in EXAMPLE_SOURCES:
            raise ValueError(f"KTOConfig.examples must be one of {EXAMPLE_SOURCES}, got {self.examples!r}")
        if self.reference not in ("model", "precomputed"):
            raise ValueError(f"KTOConfig.reference must be 'model' or 'precomputed', got {self.reference!r}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("KTOConfig: desirable_weight and undesirable_weight must be > 0")

    def loss_kwargs(self, **overrides) -> dict:
        """The hyperparameters of the chosen loss, as its registry entry names them (`overrides` replace fields)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return UNPAIRED_LOSSES.kwargs(self.loss, {**fields, **overrides})


def balanced_weights(cfg: KTOConfig, n_desirable: int, n_undesirable: int) -> dict:
    """{desirable_weight, undesirable_weight, ratio} after `cfg.balance` (module docstring)."""
    d, u = cfg.desirable_weight, cfg.undesirable_weight
    ratio = d * n_desirable / max(u * n_undesirable, 1e-9)
    if cfg.balance and n_desirable and n_undesirable and not BALANCED_RATIO[0] <= ratio <= BALANCED_RATIO[1]:
        d = u * n_undesirable / n_desirable
        ratio = 1.0
    return {"desirable_weight": d, "undesirable_weight": u, "ratio": ratio}


def build_examples(cfg: KTOConfig, lm, params, tokenizer, task, mesh, path: str) -> list[dict]:
    """The labelled examples (cached in `path`)."""
    def make():
        if cfg.examples == "near_miss":
            records = kto_records_from_pairs(arithmetic_preference_records(task, "train", cfg.n_prompts,
                                                                           seed=cfg.seed))
            return records, {"examples": len(records)}
        examples, samples = sample_task_completions(
            lm, params, tokenizer, task, mesh, n_prompts=cfg.n_prompts, samples_per_prompt=cfg.samples_per_prompt,
            temperature=cfg.sample_temperature, batch=cfg.sample_batch, eval_cfg=cfg.eval, seed=cfg.seed)
        records, stats = kto_records_from_samples([ex["prompt"] for ex in examples], samples, task.check,
                                                  answers=[ex["answer"] for ex in examples])
        stats["sample_accuracy"] = sample_accuracy(task, examples, samples)
        if not stats["desirable"] or not stats["undesirable"]:
            raise RuntimeError(f"the SFT start's {stats['samples']} samples are all of one class ({stats}): KTO "
                               "needs both; use examples='near_miss' or more samples")
        return records, stats

    return cached_records(path, make, what="KTO examples")


def _iterator(cfg: KTOConfig, records, tokenizer):
    return build_kto_iterator(records, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                              overlong=cfg.data.overlong, shuffle=cfg.data.shuffle, seed=cfg.seed)


def precompute_reference(cfg: KTOConfig, lm, params, records, tokenizer, mesh, path: str) -> np.ndarray:
    """Reference log-probs [steps, 2, rows] (the examples, then their KL rows) of this process's rows of every
    training batch, in training order."""
    rows = cfg.data.batch_size // jax.process_count()
    fn = make_reference_logps(lm, mesh, lm.param_shardings(mesh), rows=rows, logprobs_impl=cfg.logprobs_impl)

    def score(batch):
        return [fn(params, batch), fn(params, {k: batch["kl_" + k] for k in ROW_KEYS})]

    return precomputed(path, cfg.steps, _iterator(cfg, records, tokenizer), score)


def run(cfg: KTOConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) -> examples -> reference log-probs -> KTO; writes config.json, metrics.jsonl,
    checkpoints/, examples.jsonl, kto.png and results.json into workdir, resuming whatever exists there."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, cfg.sft, sft_recipe.run)

    base_lm = LM(sft_cfg.model)
    start_params = load_start_params(sft_cfg, mesh, sft_dir)
    records = build_examples(cfg, base_lm, start_params, tokenizer, task, mesh, run.path("examples.jsonl"))
    n_des = sum(bool(r["label"]) for r in records)
    weights = balanced_weights(cfg, n_des, len(records) - n_des)
    ref_logps = None
    if cfg.reference == "precomputed":
        ref_logps = precompute_reference(cfg, base_lm, start_params, records, tokenizer, mesh,
                                         run.process_path("ref_logps", "npy"))

    lm = LM(sft_cfg.model, cfg.lora)
    tx, schedule, abstract, shardings = policy_optimizer(lm, cfg.optim, cfg.steps, mesh)
    batches = _iterator(cfg, records, tokenizer)
    state = run.restore_or_init(abstract, shardings, batches,
                                policy_init(lm, tx, start_params, shardings, mesh, seed=cfg.seed))
    ref_params = start_params if cfg.reference == "model" and lm.lora is None else None
    if ref_params is None:
        del start_params

    evaluate = task_evaluator(lm, tokenizer, task, cfg.eval, mesh)
    evaluate_before(run, evaluate, state.params)

    loss_kwargs = cfg.loss_kwargs(desirable_weight=weights["desirable_weight"],
                                  undesirable_weight=weights["undesirable_weight"])
    objective = Unpaired(lm, loss=cfg.loss, loss_kwargs=loss_kwargs, reference=cfg.reference,
                         logprobs_impl=cfg.logprobs_impl)
    step_fn = make_step(lm, tx, schedule, objective, mesh=mesh, state_shardings=shardings, units=cfg.data.batch_size,
                        grad_accum=cfg.train.grad_accum)
    to_device = batch_feeder(
        step_fn, cfg.train.grad_accum, unit_key="label", per_process=cfg.data.batch_size // jax.process_count(),
        start_step=run.start_step,
        attach=None if ref_logps is None else lambda b, step: dict(b, ref_logps=ref_logps[step, 0],
                                                                     ref_kl_logps=ref_logps[step, 1]))

    state = run.train(lambda st, b: step_fn(st, ref_params, b), state, batches, to_device=to_device,
                      evaluate=lambda st: {"eval_accuracy": evaluate(st.params)},
                      host_metrics=lambda: batches.stats, desc=cfg.loss)
    if state is None:
        return None
    final = evaluate(state.params, full=True)
    return run.finish({**task_results(run, final), "loss": cfg.loss, "reference": cfg.reference,
                       "examples": len(records), "desirable": n_des, **weights, "sft_dir": sft_dir},
                      plots=("loss", "kl", "chosen_rewards", "rejected_rewards", "margins", "eval_accuracy"),
                      filename="kto.png", title=f"{cfg.loss} from the SFT start ({cfg.examples} examples)")

