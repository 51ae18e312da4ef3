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
import inspect
import json
import logging
import os
import time

import jax
import numpy as np

from jaxpost.cli import from_config_dict, to_json_dict, write_config
from jaxpost.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.data import make_task
from jaxpost.data.preference import (arithmetic_preference_records, build_preference_iterator,
                                     preference_records_from_samples)
from jaxpost.models import LM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import (EvalConfig, close_checkpoints, decode_completion, device_put_batch, eval_sampler,
                                    restore_or_init, save_tokenizer, setup_logging, task_accuracy)
from jaxpost.rollout import SamplingConfig
from jaxpost.sharding import make_mesh
from jaxpost.models.lora import LoRAConfig
from jaxpost.tokenizer import load_tokenizer
from jaxpost.train.checkpoint import Checkpointer
from jaxpost.train.dpo import (get_preference_loss, make_preference_step, make_reference_logps,
                               split_preference_microbatches)
from jaxpost.train.loop import MetricsLog, train_loop
from jaxpost.train.optim import make_optimizer
from jaxpost.train.plots import plot_metrics
from jaxpost.train.state import (abstract_train_state, new_train_state, state_shardings, trainable_of,
                                 with_shardings)

log = logging.getLogger("jaxpost")

PAIR_SOURCES = ("samples", "near_miss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """DPO-family training from an SFT start on a built-in task's preference pairs."""

    seed: int = 0
    steps: int = 100
    init_from: str = ""  # an SFT workdir (tokenizer.model, checkpoints/, config.json); "" runs `sft` first
    sft: sft_recipe.SFTConfig = dataclasses.field(default_factory=sft_recipe.SFTConfig)
    loss: str = "sigmoid"  # any name of DPO_LOSSES or REFERENCE_FREE_LOSSES (jaxpost.losses)
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    gamma: float = 0.5  # simpo's target margin
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
        get_preference_loss(self.loss, self.reference)  # validates the loss / reference combination

    def loss_kwargs(self) -> dict:
        """The hyperparameters the chosen loss accepts."""
        accepted = inspect.signature(get_preference_loss(self.loss, self.reference)).parameters
        every = {"beta": self.beta, "label_smoothing": self.label_smoothing, "sft_weight": self.sft_weight,
                 "gamma": self.gamma}
        return {k: v for k, v in every.items() if k in accepted}


def sft_start(workdir: str, init_from: str, sft_cfg: sft_recipe.SFTConfig):
    """(SFT config, SFT workdir): `init_from` with the config it was trained with, or a fresh SFT run."""
    if init_from:
        path = os.path.join(init_from, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"init_from={init_from!r}: no config.json (expected an SFT workdir)")
        with open(path) as f:
            saved = json.load(f)
        saved.pop("class", None)
        return from_config_dict(sft_recipe.SFTConfig, saved), init_from
    sft_dir = os.path.join(workdir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "results.json")):
        log.info("no init_from: training the SFT start into %s", sft_dir)
        sft_recipe.run(sft_cfg, sft_dir)
    return sft_cfg, sft_dir


def load_start_params(sft_cfg, mesh, sft_dir: str):
    """The decoder params an SFT workdir ends with, as plain decoder params of `sft_cfg.model`: a LoRA SFT run's
    adapters are merged into its base."""
    lora = getattr(sft_cfg, "lora", None)
    if lora is None or not lora.enabled:
        return load_params(LM(sft_cfg.model), mesh, sft_dir)
    lm = LM(sft_cfg.model, lora)
    params = load_params(lm, mesh, sft_dir)
    shardings = LM(sft_cfg.model).param_shardings(mesh)
    return jax.jit(lm.merged, out_shardings=shardings, donate_argnums=0)(params)


def load_params(lm: LM, mesh, sft_dir: str):
    """The final params of a workdir (an SFT run's decoder, or any model with `abstract_params` and
    `param_shardings`, e.g. a reward model's `ScalarHeadLM`), restored directly into their sharded layout."""
    ckpt = Checkpointer(os.path.join(sft_dir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{sft_dir}/checkpoints holds no complete checkpoint")
        return ckpt.restore_params(step, with_shardings(lm.abstract_params, lm.param_shardings(mesh)))
    finally:
        ckpt.close()


def build_pairs(cfg: DPOConfig, lm, params, tokenizer, task, mesh, path: str) -> list[dict]:
    """The preference records (cached in `path`)."""
    if os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f]
    t0 = time.perf_counter()
    if cfg.pairs == "near_miss":
        records = arithmetic_preference_records(task, "train", cfg.n_prompts, seed=cfg.seed)
        stats = {"pairs": len(records)}
    else:
        examples = task.examples("train", cfg.n_prompts)
        sampler = eval_sampler(lm, mesh, tokenizer.pad_id, cfg.eval.max_prompt_len)
        sampling = SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.sample_temperature,
                                  n_samples=cfg.samples_per_prompt, stop_ids=tuple(tokenizer.stop_ids))
        samples = []
        for i in range(0, len(examples), cfg.sample_batch):
            chunk = examples[i:i + cfg.sample_batch]
            prompts = [tokenizer.encode_chat([{"role": "user", "content": ex["prompt"]}],
                                             add_generation_prompt=True)[0] for ex in chunk]
            rollout = sampler.generate(params, prompts, sampling, seed=cfg.seed * 100003 + i)
            texts = [decode_completion(tokenizer, c) for c in rollout.completions()]
            G = cfg.samples_per_prompt
            samples += [texts[j * G:(j + 1) * G] for j in range(len(chunk))]
        records, stats = preference_records_from_samples(
            [ex["prompt"] for ex in examples], samples, task.check, answers=[ex["answer"] for ex in examples],
            max_pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed)
        stats["sample_accuracy"] = float(np.mean([task.check(s, ex["answer"])
                                                  for ex, group in zip(examples, samples) for s in group]))
    if not records:
        raise RuntimeError(f"no preference pairs from {cfg.n_prompts} prompts ({stats}): the SFT start answers all "
                           "correctly or all wrongly; use pairs='near_miss' or more samples")
    with open(path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)
    log.info("preference pairs: %s (%.0f s)", stats, time.perf_counter() - t0)
    return records


def _iterator(cfg: DPOConfig, records, tokenizer):
    return build_preference_iterator(records, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                     overlong=cfg.data.overlong, shuffle=cfg.data.shuffle, seed=cfg.seed)


def precompute_reference(cfg: DPOConfig, lm, params, records, tokenizer, mesh, path: str) -> np.ndarray:
    """Reference log-probs [steps, rows] of this process's rows of every training batch, in training order."""
    if os.path.exists(path):
        ref = np.load(path)
        if ref.shape[0] >= cfg.steps:
            return ref
    t0 = time.perf_counter()
    rows = 2 * (cfg.data.batch_size // jax.process_count())
    fn = make_reference_logps(lm, mesh, lm.param_shardings(mesh), rows=rows, logprobs_impl=cfg.logprobs_impl)
    it = _iterator(cfg, records, tokenizer)
    out = np.stack([np.asarray(fn(params, next(it))) for _ in range(cfg.steps)]).astype(np.float32)
    np.save(path + ".tmp.npy", out)
    os.replace(path + ".tmp.npy", path)
    log.info("reference log-probs of %d batches precomputed (%.0f s)", cfg.steps, time.perf_counter() - t0)
    return out


def run(cfg: DPOConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) -> pairs -> reference log-probs -> DPO; writes config.json, metrics.jsonl,
    checkpoints/, pairs.jsonl, dpo.png and results.json into workdir, resuming whatever exists there."""
    t_start = time.perf_counter()
    setup_logging()
    os.makedirs(workdir, exist_ok=True)
    write_config(cfg, workdir)
    sft_cfg, sft_dir = sft_start(workdir, cfg.init_from, cfg.sft)
    task = make_task(sft_cfg.task.name, **sft_cfg.task.kwargs())
    tokenizer = load_tokenizer(sft_dir)
    save_tokenizer(tokenizer, workdir)

    mesh = make_mesh(cfg.mesh)
    base_lm = LM(sft_cfg.model)
    start_params = load_start_params(sft_cfg, mesh, sft_dir)
    records = build_pairs(cfg, base_lm, start_params, tokenizer, task, mesh, os.path.join(workdir, "pairs.jsonl"))
    ref_logps = None
    if cfg.reference == "precomputed":
        ref_logps = precompute_reference(cfg, base_lm, start_params, records, tokenizer, mesh,
                                         os.path.join(workdir, f"ref_logps.{jax.process_index()}.npy"))

    lm = LM(sft_cfg.model, cfg.lora)
    tx, schedule = make_optimizer(cfg.optim, cfg.steps, logical_axes=trainable_of(lm, lm.logical_axes))
    abstract = abstract_train_state(lm, tx)
    shardings = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh, model=lm)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoints)
    batches = _iterator(cfg, records, tokenizer)

    def init():
        init_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        params = lm.add_adapters(start_params, init_key, mesh) if lm.lora is not None else start_params
        # full model: a copy of the start (which may stay the reference); LoRA: the base arrays move into the state
        donate = (0,) if lm.lora is not None else ()
        return jax.jit(lambda p, k: new_train_state(lm, tx, p, k), out_shardings=shardings,
                       donate_argnums=donate)(params, state_key)

    state, start_step, meta = restore_or_init(ckpt, abstract, shardings, batches, init)
    # the reference: the SFT params held beside the policy, or, for LoRA, the policy's base (adapters disabled)
    ref_params = start_params if cfg.reference == "model" and lm.lora is None else None
    if ref_params is None:
        del start_params  # the step holds no reference weights

    eval_examples = task.examples("test", cfg.eval.n_examples)

    def evaluate(params, full: bool = False):
        out = task_accuracy(lm, params, tokenizer, task, eval_examples, cfg.eval, mesh)
        return out if full else out["accuracy"]

    meta["config"] = to_json_dict(cfg)
    if "accuracy_before" not in meta:
        meta["accuracy_before"] = evaluate(state.params) if cfg.eval.n_examples else None
        log.info("held-out accuracy of the SFT start: %s", meta["accuracy_before"])

    step_fn = make_preference_step(lm, tx, schedule, mesh, shardings, grad_accum=cfg.train.grad_accum,
                                   pairs=cfg.data.batch_size, loss=cfg.loss, loss_kwargs=cfg.loss_kwargs(),
                                   reference=cfg.reference, logprobs_impl=cfg.logprobs_impl)
    pairs_per_process = cfg.data.batch_size // jax.process_count()
    counter = {"step": start_step}

    def to_device(batch):
        if batch["pair_mask"].shape[0] != pairs_per_process:
            raise ValueError(f"data pipeline gave {batch['pair_mask'].shape[0]} pairs per process, "
                             f"expected {pairs_per_process}")
        if ref_logps is not None:
            batch = dict(batch, ref_logps=ref_logps[counter["step"]])
        counter["step"] += 1
        return device_put_batch(split_preference_microbatches(batch, cfg.train.grad_accum), step_fn.batch_shardings)

    def checkpoint(step, state):
        ckpt.save(step, state, data_state=batches.get_state(), meta=meta)

    t_train = time.perf_counter()
    state = train_loop(
        step_fn=lambda st, b: step_fn(st, ref_params, b), state=state, batches=batches, to_device=to_device,
        start_step=start_step, steps=cfg.steps,
        metrics_log=MetricsLog(os.path.join(workdir, "metrics.jsonl"), resume_step=start_step),
        checkpoint=checkpoint, checkpoint_every=cfg.train.checkpoint_every or cfg.steps,
        evaluate=lambda step, st: {"eval_accuracy": evaluate(st.params)}, eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every, host_metrics=lambda: batches.stats, desc=cfg.loss, stop_at=stop_at)
    train_time = time.perf_counter() - t_train
    if close_checkpoints(ckpt, state, batches, meta, stop_at=stop_at, steps=cfg.steps):
        return None

    final = evaluate(state.params, full=True) if cfg.eval.n_examples else {"accuracy": None, "samples": []}
    results = {
        "accuracy_before": meta["accuracy_before"],
        "accuracy_after": final["accuracy"],
        "samples": final["samples"],
        "loss": cfg.loss,
        "reference": cfg.reference,
        "pairs": len(records),
        "steps": cfg.steps,
        "resumed_from_step": start_step,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "sft_dir": sft_dir,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_metrics(workdir, ("loss", "chosen_rewards", "rejected_rewards", "margins", "accuracies", "eval_accuracy"),
                 filename="dpo.png", title=f"{cfg.loss} from the SFT start ({cfg.pairs} pairs)")
    log.info("results: %s", json.dumps({k: v for k, v in results.items() if k != "samples"}))
    return results
