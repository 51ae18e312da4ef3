"""The preference-optimisation recipe: SFT start -> preference pairs -> (reference log-probs) -> sharded DPO-family
step -> host loop with eval and checkpoints.

`run(cfg, workdir)`:
1. the SFT start: the params and tokenizer of the SFT workdir `cfg.init_from`, or, without it, an SFT run of
   `cfg.sft` into `workdir/sft` first (itself resumable);
2. pairs: "samples" draws `samples_per_prompt` completions of each training prompt from the SFT model at
   `sample_temperature` (the KV-cache sampler), labels them with the task's checker and pairs a correct answer
   (chosen) with an incorrect one (rejected), on-policy data as in RLHF practice; "near_miss" pairs the correct
   answer with a deterministic plausible wrong one (`jaxpost.data.preference`). Written to `pairs.jsonl`;
3. with reference="precomputed", one pass over the training batches computes the SFT (reference) model's log-probs
   of every pair (`ref_logps.npy`), so the step holds no second copy of the weights;
4. training, then results.json (accuracy_before = the SFT start's, accuracy_after), dpo.png.
Every stage is skipped when its output exists, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxpost.config import DataConfig, EvalConfig, LoRAConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.data.preference import (arithmetic_preference_records, build_preference_iterator,
                                     preference_records_from_samples)
from jaxpost.losses import DPO_LOSSES, F_DIVERGENCE_LOSSES, F_DIVERGENCES, REFERENCE_FREE_LOSSES
from jaxpost.models import LM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import (Run, batch_feeder, cached_records, evaluate_before, load_start_params,
                                    open_sft_start, precomputed, sample_accuracy, sample_task_completions,
                                    policy_init, policy_optimizer, task_evaluator, task_results)
from jaxpost.train.dpo import NLL_MEANS, ORPO_NLL, Preference, loss_names, make_reference_logps, preference_terms
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")

PAIR_SOURCES = ("samples", "near_miss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """DPO-family training from an SFT start on a built-in task's preference pairs."""

    seed: int = 0
    steps: int = 100
    init_from: str = ""  # an SFT workdir (tokenizer.model, checkpoints/, config.json); "" runs `sft` first
    sft: sft_recipe.SFTConfig = dataclasses.field(default_factory=sft_recipe.SFTConfig)
    # any name of DPO_LOSSES or REFERENCE_FREE_LOSSES (jaxpost.losses), or a list of them (and "sft") summed with
    # loss_weights: MPO, e.g. "sigmoid,bco_pair,sft" with (0.8, 0.2, 1.0); docs/losses.md maps each to TRL
    loss: str | tuple[str, ...] = "sigmoid"
    loss_weights: tuple[float, ...] = ()
    beta: float = 0.1
    # cDPO's label smoothing for "sigmoid" (TRL 1.16 ignores label_smoothing there: keep 0 to match it); robust DPO's
    # flip rate for "robust", EXO's epsilon for "exo_pair", the smoothing of simpo / cpo / aot
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # an NLL term on the chosen response, added once (RPO; CPO's cpo_alpha, TRL default 1)
    gamma: float = 0.5  # simpo's target margin
    alpha: float = 0.0  # AlphaPO's reward shape (simpo / alphapo / cpo*): 0 is SimPO's log-likelihood
    f_divergence: str = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha: float = 0.5  # the alpha of alpha_divergence
    ld_alpha: float | None = None  # LD-DPO: weight of the longer response's tail (None: off; 1 is plain DPO)
    use_weighting: bool = False  # WPO: weigh each pair by w(chosen) w(rejected)
    orpo_nll: str = "completion"  # ORPO's NLL over the chosen "completion" (paper) or the whole "sequence" (TRL)
    nll_mean: str = "sequence"  # the NLL terms' mean: each "sequence"'s token mean, or TRL's over the "batch"'s tokens
    reference: str = "precomputed"  # "model" (held beside the policy), "precomputed" or "none" (simpo, orpo)
    # LoRA adapters on the SFT start (rank 0: train every weight); with reference="model" the reference is then the
    # base model with the adapters disabled, not a second copy
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    pairs: str = "samples"
    n_prompts: int = 2048  # training prompts to build pairs from
    samples_per_prompt: int = 8
    pairs_per_prompt: int = 1  # up to this many (correct, incorrect) pairs from one prompt's samples
    sample_temperature: float = 1.0
    sample_batch: int = 128  # prompts per sampler call
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=32, batch_size=32))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=10))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logprobs_impl: str = "auto"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"DPOConfig.steps must be > 0, got {self.steps}")
        if self.pairs not in PAIR_SOURCES:
            raise ValueError(f"DPOConfig.pairs must be one of {PAIR_SOURCES}, got {self.pairs!r}")
        terms = preference_terms(self.loss, self.loss_weights, self.reference)  # validates names and references
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"DPOConfig.f_divergence must be one of {F_DIVERGENCES}, got {self.f_divergence!r}")
        if self.f_divergence != "reverse_kl":
            other = [n for n, _, fn in terms if fn is not None and n not in F_DIVERGENCE_LOSSES]
            if other:
                raise ValueError(f"DPOConfig.f_divergence={self.f_divergence!r} applies to the losses "
                                 f"{sorted(F_DIVERGENCE_LOSSES)} only (as in TRL), not {other}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"DPOConfig.ld_alpha must lie in [0, 1] (or None), got {self.ld_alpha}")
        if self.ld_alpha is not None and self.reference == "none":
            raise ValueError("DPOConfig.ld_alpha desensitises the DPO log-ratios: it needs a reference")
        if self.orpo_nll not in ORPO_NLL:
            raise ValueError(f"DPOConfig.orpo_nll must be one of {ORPO_NLL}, got {self.orpo_nll!r}")
        if self.nll_mean not in NLL_MEANS:
            raise ValueError(f"DPOConfig.nll_mean must be one of {NLL_MEANS}, got {self.nll_mean!r}")

    @property
    def loss_names(self) -> tuple[str, ...]:
        return loss_names(self.loss)

    def loss_kwargs(self) -> dict:
        """The hyperparameters of the chosen loss(es) that this config sets, as their registry entries name them."""
        out = {}
        for name in self.loss_names:
            if name != "sft":
                registry = REFERENCE_FREE_LOSSES if name in REFERENCE_FREE_LOSSES else DPO_LOSSES
                out.update(registry.kwargs(name, self))
        return out


def build_pairs(cfg: DPOConfig, lm, params, tokenizer, task, mesh, path: str) -> list[dict]:
    """The preference records (cached in `path`)."""
    return cached_records(path, lambda: _make_pairs(cfg, lm, params, tokenizer, task, mesh), what="preference pairs")


def _make_pairs(cfg, lm, params, tokenizer, task, mesh):
    if cfg.pairs == "near_miss":
        records = arithmetic_preference_records(task, "train", cfg.n_prompts, seed=cfg.seed)
        return records, {"pairs": len(records)}
    examples, samples = sample_task_completions(
        lm, params, tokenizer, task, mesh, n_prompts=cfg.n_prompts, samples_per_prompt=cfg.samples_per_prompt,
        temperature=cfg.sample_temperature, batch=cfg.sample_batch, eval_cfg=cfg.eval, seed=cfg.seed)
    records, stats = preference_records_from_samples(
        [ex["prompt"] for ex in examples], samples, task.check, answers=[ex["answer"] for ex in examples],
        max_pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed)
    stats["sample_accuracy"] = sample_accuracy(task, examples, samples)
    if not records:
        raise RuntimeError(f"no preference pairs from {cfg.n_prompts} prompts ({stats}): the SFT start answers all "
                           "correctly or all wrongly; use pairs='near_miss' or more samples")
    return records, stats


def _iterator(cfg: DPOConfig, records, tokenizer):
    return build_preference_iterator(records, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                     overlong=cfg.data.overlong, shuffle=cfg.data.shuffle, seed=cfg.seed)


def precompute_reference(cfg: DPOConfig, lm, params, records, tokenizer, mesh, path: str) -> np.ndarray:
    """Reference log-probs [steps, rows] of this process's rows of every training batch, in training order."""
    rows = 2 * (cfg.data.batch_size // jax.process_count())
    fn = make_reference_logps(lm, mesh, lm.param_shardings(mesh), rows=rows, logprobs_impl=cfg.logprobs_impl,
                              ld_alpha=cfg.ld_alpha)
    return precomputed(path, cfg.steps, _iterator(cfg, records, tokenizer), lambda batch: fn(params, batch))


def run(cfg: DPOConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) -> pairs -> reference log-probs -> DPO; writes config.json, metrics.jsonl,
    checkpoints/, pairs.jsonl, dpo.png and results.json into workdir, resuming whatever exists there."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, cfg.sft, sft_recipe.run)

    base_lm = LM(sft_cfg.model)
    start_params = load_start_params(sft_cfg, mesh, sft_dir)
    records = build_pairs(cfg, base_lm, start_params, tokenizer, task, mesh, run.path("pairs.jsonl"))
    ref_logps = None
    if cfg.reference == "precomputed":
        ref_logps = precompute_reference(cfg, base_lm, start_params, records, tokenizer, mesh,
                                         run.process_path("ref_logps", "npy"))

    lm = LM(sft_cfg.model, cfg.lora)
    tx, schedule, abstract, shardings = policy_optimizer(lm, cfg.optim, cfg.steps, mesh)
    batches = _iterator(cfg, records, tokenizer)
    state = run.restore_or_init(abstract, shardings, batches,
                                policy_init(lm, tx, start_params, shardings, mesh, seed=cfg.seed))
    # the reference: the SFT params held beside the policy, or, for LoRA, the policy's base (adapters disabled)
    ref_params = start_params if cfg.reference == "model" and lm.lora is None else None
    if ref_params is None:
        del start_params  # the step holds no reference weights

    evaluate = task_evaluator(lm, tokenizer, task, cfg.eval, mesh)
    evaluate_before(run, evaluate, state.params)

    objective = Preference(lm, loss=cfg.loss, loss_kwargs=cfg.loss_kwargs(), loss_weights=cfg.loss_weights or None,
                           reference=cfg.reference, logprobs_impl=cfg.logprobs_impl, ld_alpha=cfg.ld_alpha,
                           use_weighting=cfg.use_weighting, orpo_nll=cfg.orpo_nll, nll_mean=cfg.nll_mean)
    step_fn = make_step(lm, tx, schedule, objective, mesh=mesh, state_shardings=shardings, units=cfg.data.batch_size,
                        grad_accum=cfg.train.grad_accum)
    to_device = batch_feeder(step_fn, cfg.train.grad_accum, unit_key="pair_mask",
                             per_process=cfg.data.batch_size // jax.process_count(), start_step=run.start_step,
                             attach=None if ref_logps is None else lambda b, step: dict(b, ref_logps=ref_logps[step]))

    state = run.train(lambda st, b: step_fn(st, ref_params, b), state, batches, to_device=to_device,
                      evaluate=lambda st: {"eval_accuracy": evaluate(st.params)},
                      host_metrics=lambda: batches.stats, desc="+".join(cfg.loss_names))
    if state is None:
        return None
    final = evaluate(state.params, full=True)
    return run.finish({**task_results(run, final), "loss": cfg.loss, "reference": cfg.reference,
                       "pairs": len(records), "sft_dir": sft_dir},
                      plots=("loss", "chosen_rewards", "rejected_rewards", "margins", "accuracies", "eval_accuracy"),
                      filename="dpo.png", title=f"{'+'.join(cfg.loss_names)} from the SFT start ({cfg.pairs} pairs)")
