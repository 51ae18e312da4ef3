"""The distillation recipe: a frozen teacher (an SFT, RL, DPO, KTO or distillation workdir) -> a smaller student
(an SFT workdir with the same tokenizer) -> one of four ways to distil -> host loop with eval and checkpoints.

`run(cfg, workdir)`:
1. the student: the params, task and tokenizer of the SFT workdir `cfg.init_from`; the teacher: the final params of
   the workdir `cfg.teacher_from` (its model config followed back to the SFT run it started from; an RL state's
   "policy", a LoRA run's adapters merged), held frozen beside the student. The two tokenizers must be identical
   (same size, same pieces: `check_same_tokenizer`);
2. `method` (each a Distill or SFT objective of `jaxpost.train` through `make_step`):
   - "logit_kd": supervised KD (Hinton et al. 2015): `Distill(loss="forward_kl")` on the task's fixed SFT rows
     (prompts + gold completions, packed as the SFT recipe packs them);
   - "seq_kd": sequence-level KD (Kim & Rush 2016): the teacher samples one completion of each of the first
     `n_prompts` training prompts once (at `teacher_temperature`; 0 = greedy; cached in `teacher_samples.jsonl`), and
     the student is trained on them with the plain SFT objective (`jaxpost.train.sft.SFT`);
   - "gkd": generalized KD (Agarwal et al. 2024, arXiv:2306.13649, Alg. 1): each step draws `data.batch_size`
     training prompts; with probability `lmbda` their completions are sampled from the current student (at
     `student_temperature`, the KV-cache sampler), else they are the gold completions; the loss is JSD(`beta`) over
     the full vocabulary on the completion tokens (`Distill(loss="jsd")`);
   - "on_policy": the student samples every step; the loss is the per-token reverse KL to the teacher over the full
     vocabulary on its own completions (`Distill(loss="reverse_kl")`; GKD with lambda = 1, MiniLLM's objective
     without its policy-gradient estimator);
   The rows of "gkd" and "on_policy" hold one sample each ([batch_size, max_prompt_len + max_new_tokens]), laid out
   by `jaxpost.rollout.rollout_batch` for both kinds, so the step compiles once;
3. held-out greedy accuracy of the student before, every `train.eval_every` steps and after, and of the teacher
   once (`eval_teacher`); metrics.jsonl, results.json, distill.png.
A killed run resumes from its latest checkpoint (state + data-iterator position) and continues exactly: the
sampling seeds and GKD's coin derive from the state's RNG key and step, as in `jaxpost.train.rl_loop`.

    python -m experiments.distill_reason --workdir runs/distill_reason \\
        --config.teacher_from=runs/grpo_reason --config.init_from=runs/sft_reason_quarter
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os

import jax
import numpy as np

from jaxpost.batch import ROW_KEYS, device_put_batch, split_microbatches
from jaxpost.cli import from_config_dict
from jaxpost.config import (
    DataConfig,
    EvalConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from jaxpost.data import build_sft_iterator
from jaxpost.data.prompts import build_prompt_iterator
from jaxpost.losses import DISTILL_LOSSES
from jaxpost.models import LM
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import (
    Run,
    batch_feeder,
    cached_records,
    evaluate_before,
    load_params,
    load_start_params,
    open_sft_start,
    policy_init,
    policy_optimizer,
    sample_accuracy,
    sample_task_completions,
    task_evaluator,
    task_results,
)
from jaxpost.rollout import Rollout, Sampler, SamplingConfig, rollout_batch
from jaxpost.tokenizers import ChatTokenizer, load_tokenizer
from jaxpost.train.distill import Distill
from jaxpost.train.rl import PolicyModel
from jaxpost.train.sft import SFT
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")

METHODS = ("logit_kd", "seq_kd", "gkd", "on_policy")
#: The divergence each logit-distillation method minimises (seq_kd trains with the SFT objective instead).
METHOD_LOSS = {"logit_kd": "forward_kl", "gkd": "jsd", "on_policy": "reverse_kl"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Distillation of a teacher workdir into a student SFT workdir (module docstring). `data.batch_size` counts rows
    per optimizer step: packed SFT rows ("logit_kd", "seq_kd") or prompts with one completion each ("gkd",
    "on_policy")."""

    seed: int = 0
    steps: int = 100
    method: str = "logit_kd"
    teacher_from: str = "runs/grpo_reason"  # a workdir of any recipe whose model shares the student's tokenizer
    init_from: str = "runs/sft_student"  # the student's SFT workdir (its task, tokenizer and start params)
    temperature: float = 1.0  # the divergence's softmax temperature (Distill's loss_kwargs)
    beta: float = 0.5  # JSD(beta) of "gkd": 0 -> forward KL, 1 -> reverse KL (TRL's convention)
    lmbda: float = 0.5  # "gkd": the probability that a step's completions are the student's own
    kd_weight: float = 1.0
    nll_weight: float = 0.0  # + the student's NLL of the batch's completions (Hinton's hard-label term)
    scale_by_t2: bool = False
    student_temperature: float = 1.0  # sampling temperature of the student ("gkd", "on_policy")
    teacher_temperature: float = 1.0  # sampling temperature of the teacher ("seq_kd"; 0 = greedy)
    n_prompts: int = 2048  # "seq_kd": training prompts the teacher answers
    sample_batch: int = 128  # "seq_kd": prompts per sampler call
    max_prompt_len: int = 16  # sampled rows ("gkd", "on_policy", "seq_kd"): prompt tokens
    max_new_tokens: int = 72  # and completion tokens (stop token included)
    eval_teacher: bool = True  # the teacher's held-out greedy accuracy, once per run
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=128, batch_size=16))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    kl_impl: str = "auto"
    logprobs_impl: str = "auto"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"DistillConfig.steps must be > 0, got {self.steps}")
        if self.method not in METHODS:
            raise ValueError(f"DistillConfig.method must be one of {METHODS}, got {self.method!r}")
        if not self.teacher_from or not self.init_from:
            raise ValueError("DistillConfig needs teacher_from (the teacher's workdir) and init_from (the student's "
                             "SFT workdir)")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"DistillConfig.lmbda must lie in [0, 1], got {self.lmbda}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"DistillConfig.beta must lie in [0, 1], got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
        if self.student_temperature < 0 or self.teacher_temperature < 0:
            raise ValueError("DistillConfig: sampling temperatures must be >= 0")
        if min(self.n_prompts, self.sample_batch, self.max_prompt_len, self.max_new_tokens) <= 0:
            raise ValueError("DistillConfig: n_prompts, sample_batch, max_prompt_len, max_new_tokens must be > 0")
        if self.method in METHOD_LOSS:
            DISTILL_LOSSES.get(self.loss)

    @property
    def loss(self) -> str | None:
        """The DISTILL_LOSSES name of the method (None for seq_kd, trained with the SFT objective)."""
        return METHOD_LOSS.get(self.method)

    @property
    def sample_seq_len(self) -> int:
        """Tokens per row of sampled (or gold, for gkd) prompt + completion rows."""
        return self.max_prompt_len + self.max_new_tokens

    def loss_kwargs(self) -> dict:
        return DISTILL_LOSSES.kwargs(self.loss, self)


# ---- the teacher ---------------------------------------------------------------------------------------------------


def _read_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r}: no config.json (expected a jaxpost workdir)")
    with open(path) as f:
        return json.load(f)


def workdir_sft_config(workdir: str) -> sft_recipe.SFTConfig:
    """The SFT config a workdir's model started from (its model, task and tokenizer settings): an SFT run's own; for a
    run that starts from an SFT workdir (RL, DPO, KTO, distillation, PRM: `init_from`), that workdir's, or, without
    one, the SFT run it trained first (`workdir/sft`, else its `sft` config)."""
    saved = _read_config(workdir)
    cls = saved.pop("class", None)
    if cls == "SFTConfig":
        return from_config_dict(sft_recipe.SFTConfig, saved)
    if saved.get("init_from"):
        return workdir_sft_config(saved["init_from"])
    if os.path.exists(os.path.join(workdir, "sft", "config.json")):
        return workdir_sft_config(os.path.join(workdir, "sft"))
    if "sft" in saved:
        return from_config_dict(sft_recipe.SFTConfig, saved["sft"])
    raise ValueError(f"{workdir}/config.json ({cls}): cannot tell which model it trained")


def workdir_model(workdir: str) -> ModelConfig:
    """The decoder config a workdir trained (`workdir_sft_config`'s model)."""
    return workdir_sft_config(workdir).model


def load_workdir_params(workdir: str, mesh) -> tuple[LM, dict]:
    """(LM, its final decoder params, sharded on `mesh`) of any recipe's workdir (`workdir_model`): an RL state's
    "policy" (its value model is not read); a LoRA run's adapters merged into their base."""
    saved = _read_config(workdir)
    model_cfg = workdir_model(workdir)
    lora = from_config_dict(LoRAConfig, saved["lora"]) if "lora" in saved else None
    lora = lora if lora is not None and lora.enabled else None
    lm = LM(model_cfg, lora)
    if saved.get("class") == "RLConfig":
        params = load_params(PolicyModel(lm), mesh, workdir)["policy"]
    else:
        params = load_params(lm, mesh, workdir)
    base = LM(model_cfg)
    if lora is not None:
        params = jax.jit(lm.merged, out_shardings=base.param_shardings(mesh), donate_argnums=0)(params)
    return base, params


def tokenizer_pieces(tokenizer: ChatTokenizer) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def check_same_tokenizer(student: ChatTokenizer, teacher: ChatTokenizer, *, student_from: str,
                         teacher_from: str) -> None:
    """Raises ValueError naming both tokenizer files unless the two tokenizers have the same size and the same
    piece at every id (logit distillation compares the two models' distributions id by id)."""
    where = f"student {_tokenizer_file(student_from)}, teacher {_tokenizer_file(teacher_from)}"
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"distillation needs one tokenizer: the student's has {student.vocab_size} pieces, the "
                         f"teacher's {teacher.vocab_size} ({where})")
    s, t = tokenizer_pieces(student), tokenizer_pieces(teacher)
    diff = [i for i in range(len(s)) if s[i] != t[i]]
    if diff:
        i = diff[0]
        raise ValueError(f"distillation needs one tokenizer: {len(diff)} of {len(s)} pieces differ (first at id {i}: "
                         f"student {s[i]!r}, teacher {t[i]!r}) ({where}); train the student's SFT start with "
                         f"--config.tokenizer_path=<the teacher's tokenizer file>")
    if tuple(student.stop_ids) != tuple(teacher.stop_ids) or student.pad_id != teacher.pad_id:
        raise ValueError(f"distillation needs one tokenizer: special ids differ ({where})")


def _tokenizer_file(workdir: str) -> str:
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(workdir, name)):
            return os.path.join(workdir, name)
    return workdir


# ---- sampled rows ("gkd", "on_policy") ----------------------------------------------------------------------------


def gold_rollout(prompts, tokenizer: ChatTokenizer, *, max_new_tokens: int) -> Rollout:
    """The prompts' gold completions (each prompt record's `reference`, i.e. its assistant turn) as a `Rollout`, so
    that `rollout_batch` lays them out exactly as the student's samples: completion = the chat encoding of
    (user, assistant) after the prompt's own tokens (the assistant turn and its closing token)."""
    tokens = np.full((len(prompts), max_new_tokens), tokenizer.pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for r, p in enumerate(prompts):
        if "reference" not in p.example:
            raise ValueError(f"prompt {p.index}: no gold completion (an assistant turn or `completion` field)")
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": p.text},
                                        {"role": "assistant", "content": p.example["reference"]}])
        n_prompt = len(p.ids)
        if list(ids[:n_prompt]) != list(p.ids):
            raise ValueError(f"prompt {p.index}: its gold conversation does not extend the prompt's tokens (a "
                             f"system turn?); gkd's fixed rows need single-turn prompt records")
        completion = ids[n_prompt:]
        if len(completion) > max_new_tokens:
            raise ValueError(f"prompt {p.index}: gold completion of {len(completion)} tokens > "
                             f"max_new_tokens={max_new_tokens}; raise max_new_tokens")
        tokens[r, :len(completion)] = completion
        lengths[r] = len(completion)
    mask = np.arange(max_new_tokens)[None, :] < lengths[:, None]
    return Rollout(tokens=tokens, mask=mask, logprobs=np.zeros(tokens.shape, np.float32), lengths=lengths,
                   finish=np.zeros((len(prompts),), np.int32), prompt_index=np.arange(len(prompts), dtype=np.int32),
                   prompts=[p.ids for p in prompts], steps=int(lengths.max(initial=0)))


def step_seed(state, step: int, *salt: int) -> int:
    """A host seed from the state's RNG key, the step and `salt` (`RLTrainer._seed`'s derivation)."""
    key = np.asarray(jax.device_get(state.rng)).astype(np.uint32).tolist()
    return int(np.random.SeedSequence([*key, step, *salt]).generate_state(1)[0])


class SampledDistillStep:
    """`step(state, prompts) -> (state, metrics)` of "gkd" / "on_policy": draws a prompt batch from the iterator
    `prompts`, decides (GKD's coin, probability `lmbda`; always for on_policy) whether the completions are the
    student's own samples or the gold ones, lays them out as rows and runs the Distill step on them."""

    def __init__(self, cfg: DistillConfig, lm, tokenizer, mesh, step_fn, teacher_params):
        self.cfg, self.tokenizer, self.step_fn, self.teacher_params = cfg, tokenizer, step_fn, teacher_params
        self.sampler = Sampler(lm, mesh, pad_id=tokenizer.pad_id, min_prompt_bucket=cfg.max_prompt_len)
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.student_temperature,
                                       stop_ids=tuple(tokenizer.stop_ids))
        self.lmbda = 1.0 if cfg.method == "on_policy" else cfg.lmbda

    def on_policy(self, state, step: int) -> bool:
        if self.lmbda >= 1.0:
            return True
        return bool(np.random.default_rng(step_seed(state, step, 1)).random() < self.lmbda)

    def __call__(self, state, prompts):
        cfg = self.cfg
        batch_prompts = next(prompts)
        step = int(jax.device_get(state.step))
        sampled = self.on_policy(state, step)
        if sampled:
            rollout = self.sampler.generate(state.params, [p.ids for p in batch_prompts], self.sampling,
                                            seed=step_seed(state, step, 0))
        else:
            rollout = gold_rollout(batch_prompts, self.tokenizer, max_new_tokens=cfg.max_new_tokens)
        rows = rollout_batch(rollout, seq_len=cfg.sample_seq_len, pad_id=self.tokenizer.pad_id,
                             rows=len(batch_prompts))
        batch = device_put_batch(split_microbatches({k: rows[k] for k in ROW_KEYS}, cfg.train.grad_accum,
                                                    keys=self.step_fn.batch_shardings), self.step_fn.batch_shardings)
        state, metrics = self.step_fn(state, self.teacher_params, batch)
        return state, {**metrics, "on_policy": float(sampled),
                       "completion_length": float(np.mean(rollout.lengths))}


# ---- the recipe ------------------------------------------------------------------------------------------------


def teacher_samples(cfg: DistillConfig, teacher, teacher_params, tokenizer, task, mesh, path: str) -> list[dict]:
    """"seq_kd"'s data: one teacher completion of each of the first `n_prompts` training prompts, as
    {"prompt", "completion"} records (cached in `path`)."""
    def make():
        eval_cfg = dataclasses.replace(cfg.eval, max_prompt_len=cfg.max_prompt_len,
                                       max_new_tokens=cfg.max_new_tokens)
        examples, samples = sample_task_completions(
            teacher, teacher_params, tokenizer, task, mesh, n_prompts=cfg.n_prompts, samples_per_prompt=1,
            temperature=cfg.teacher_temperature, batch=cfg.sample_batch, eval_cfg=eval_cfg, seed=cfg.seed)
        records = [{"prompt": ex["prompt"], "completion": group[0]} for ex, group in zip(examples, samples)]
        return records, {"records": len(records), "teacher_sample_accuracy": sample_accuracy(task, examples, samples)}

    return cached_records(path, make, what="teacher samples")


def run(cfg: DistillConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """Teacher + student SFT start -> distillation by `cfg.method`; writes config.json, metrics.jsonl, checkpoints/,
    (teacher_samples.jsonl,) distill.png and results.json into workdir, resuming whatever exists there. `stop_at`
    stops after that step (as a preemption would); returns the results, or None when stopped early."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, sft_recipe.SFTConfig(),
                                                       sft_recipe.run)
    check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher_from), student_from=sft_dir,
                         teacher_from=cfg.teacher_from)
    teacher, teacher_params = load_workdir_params(cfg.teacher_from, mesh)
    lm = LM(sft_cfg.model)
    if teacher.cfg.vocab_size != lm.cfg.vocab_size:
        raise ValueError(f"distillation needs one vocabulary: the student ({sft_dir}) has {lm.cfg.vocab_size} "
                         f"embedding rows, the teacher ({cfg.teacher_from}) {teacher.cfg.vocab_size}")
    start_params = load_start_params(sft_cfg, mesh, sft_dir)

    evaluate = task_evaluator(lm, tokenizer, task, cfg.eval, mesh)
    if cfg.eval_teacher:
        teacher_eval = task_evaluator(teacher, tokenizer, task, cfg.eval, mesh)
    records = None
    if cfg.method == "seq_kd":
        records = teacher_samples(cfg, teacher, teacher_params, tokenizer, task, mesh,
                                  run.path("teacher_samples.jsonl"))

    tx, schedule, abstract, shardings = policy_optimizer(lm, cfg.optim, cfg.steps, mesh)
    sampled = cfg.method in ("gkd", "on_policy")
    if sampled and jax.process_count() > 1:
        raise NotImplementedError(f"method={cfg.method!r} feeds every process the whole sampled batch: one process "
                                  f"only for now")
    if sampled:
        batches = build_prompt_iterator(task.source("train"), tokenizer, batch_size=cfg.data.batch_size,
                                        max_prompt_len=cfg.max_prompt_len, seed=cfg.seed)
    else:
        source = records if records is not None else task.source("train")
        batches = build_sft_iterator(
            source, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, packing=cfg.data.packing,
            overlong=cfg.data.overlong, on_empty=cfg.data.on_empty, shuffle=cfg.data.shuffle, seed=cfg.seed)
    state = run.restore_or_init(abstract, shardings, batches,
                                policy_init(lm, tx, start_params, shardings, mesh, seed=cfg.seed))
    del start_params
    log.info("distill (%s): student %s %.2fM params, teacher %s %.2fM params", cfg.method, lm.cfg.name,
             lm.n_params / 1e6, teacher.cfg.name, teacher.n_params / 1e6)
    evaluate_before(run, evaluate, state.params)
    if cfg.eval_teacher:
        run.once("teacher_accuracy", lambda: teacher_eval(teacher_params))

    if cfg.method == "seq_kd":
        objective = SFT(lm, logprobs_impl=cfg.logprobs_impl)
        teacher_params = None  # the step holds no teacher
    else:
        objective = Distill(lm, teacher, loss=cfg.loss, loss_kwargs=cfg.loss_kwargs(), kd_weight=cfg.kd_weight,
                            nll_weight=cfg.nll_weight, scale_by_t2=cfg.scale_by_t2, kl_impl=cfg.kl_impl,
                            logprobs_impl=cfg.logprobs_impl)
    step_fn = make_step(lm, tx, schedule, objective, mesh=mesh, state_shardings=shardings,
                        units=cfg.data.batch_size, grad_accum=cfg.train.grad_accum)

    def eval_metrics(st):
        return {"eval_accuracy": evaluate(st.params)}

    if sampled:
        state = run.train(SampledDistillStep(cfg, lm, tokenizer, mesh, step_fn, teacher_params), state,
                          itertools.repeat(batches), evaluate=eval_metrics, host_metrics=lambda: batches.stats,
                          desc=cfg.method)
    else:
        to_device = batch_feeder(step_fn, cfg.train.grad_accum, unit_key="inputs",
                                 per_process=cfg.data.batch_size // jax.process_count(), start_step=run.start_step)
        fn = step_fn if teacher_params is None else (lambda st, b: step_fn(st, teacher_params, b))
        state = run.train(fn, state, batches, to_device=to_device, evaluate=eval_metrics,
                          host_metrics=lambda: batches.stats, desc=cfg.method)
    if state is None:
        return None
    final = evaluate(state.params, full=True)
    results = {**task_results(run, final), "method": cfg.method, "loss": cfg.loss,
               "teacher_accuracy": run.meta.get("teacher_accuracy"), "teacher_from": cfg.teacher_from,
               "sft_dir": sft_dir, "student_params": lm.n_params, "teacher_params": teacher.n_params}
    if records is not None:
        results["teacher_samples"] = len(records)
    return run.finish(results, plots=("loss", "kl", "nll", "eval_accuracy", "on_policy", "completion_length",
                                      "grad_norm", "lr"),
                      filename="distill.png", title=f"{cfg.method}: {teacher.cfg.name} -> {lm.cfg.name}")
