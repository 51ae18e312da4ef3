"""What every recipe shares: the run skeleton (`Run`: open the run, restore or start the state, train, finish it),
the SFT start of the post-training recipes, the tokenizer of a workdir, pretrained starts and task accuracy.

A recipe reads as

    run = Run(cfg, workdir, stop_at=stop_at)               # logging, workdir, config.json, mesh, checkpoints
    ...                                                     # data, model, optimizer, step
    state = run.restore_or_init(abstract, shardings, batches, init)  # the latest checkpoint, or init()
    state = run.train(step_fn, state, batches, to_device=..., evaluate=...)  # None when stopped early
    return run.finish(results, plots=(...), filename="x.png", title="...")   # results.json, the plot
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.batch import device_put_batch, split_microbatches
from jaxpost.checkpoint import Checkpointer
from jaxpost.cli import from_config_dict, to_json_dict, write_config
from jaxpost.config import EvalConfig, ModelConfig
from jaxpost.data import build_prompt_batches, task_from_config
from jaxpost.data.process_state import gather_process_states, state_for_process
from jaxpost.models import LM
from jaxpost.rollout import Sampler, SamplingConfig
from jaxpost.sharding import make_mesh
from jaxpost.tokenizers import ChatTokenizer, HFTokenizer, decode_completion, load_tokenizer, train_tokenizer
from jaxpost.train.loop import MetricsLog, Preempted, train_loop
from jaxpost.train.plots import plot_metrics
from jaxpost.train.optim import make_optimizer
from jaxpost.train.state import (abstract_train_state, new_train_state, state_shardings, trainable_of,
                                 with_shardings)

log = logging.getLogger("jaxpost")


def setup_logging() -> None:
    logger = logging.getLogger("jaxpost")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def is_primary() -> bool:
    """Process 0 writes the run's files (config, metrics, results, plots, tokenizer, caches); every process writes
    its own shards of the checkpoints."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def has_tokenizer(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model"))


def save_tokenizer(tokenizer: ChatTokenizer, workdir: str) -> None:
    """Writes the tokenizer into `workdir` in its own format (`tokenizer.model`, or `tokenizer.json` with its config),
    where `load_tokenizer(workdir)` finds it."""
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(workdir)
    else:
        tokenizer.save(os.path.join(workdir, "tokenizer.model"))


def load_or_make_tokenizer(workdir: str, task, *, path: str | None, vocab_size: int) -> ChatTokenizer:
    """The workdir's tokenizer if present (a resumed run keeps its tokenizer); else the one at `path` (a
    SentencePiece `.model`, a `tokenizer.json` or a checkpoint directory: `jaxpost.tokenizers.load_tokenizer`); else
    one trained on the task's corpus. The result is saved into the workdir (by process 0, which the others then
    load: every process tokenizes alike)."""
    found = has_tokenizer(workdir)
    barrier("jaxpost.tokenizer.found")  # every process has looked before process 0 writes
    if found:
        return load_tokenizer(workdir)
    if is_primary():
        tokenizer = load_tokenizer(path) if path else train_tokenizer(task.corpus(4000), vocab_size=vocab_size)
        save_tokenizer(tokenizer, workdir)
    barrier("jaxpost.tokenizer.saved")
    return tokenizer if is_primary() else load_tokenizer(workdir)


# ---- pretrained starts ----------------------------------------------------------------------------------------


def pretrained_config(path: str, model: ModelConfig) -> ModelConfig:
    """The ModelConfig of a pretrained start without reading its weights: a Hugging Face directory (`config.json`
    with safetensors) or a params directory from `tools/convert_hf.py to-orbax` (`model_config.json`). The compute
    settings of `model` (dtype, param_dtype, remat) are kept."""
    from jaxpost.models.hf import config_from_hf
    from jaxpost.models.params_io import MODEL_CONFIG

    keep = {"dtype": model.dtype, "param_dtype": model.param_dtype, "remat": model.remat}
    if os.path.exists(os.path.join(path, MODEL_CONFIG)):
        with open(os.path.join(path, MODEL_CONFIG)) as f:
            try:
                return dataclasses.replace(ModelConfig(**json.load(f)), **keep)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{os.path.join(path, MODEL_CONFIG)}: {e}") from e
    hf_path = os.path.join(path, "config.json")
    if os.path.exists(hf_path):
        with open(hf_path) as f:
            hf = json.load(f)
        return dataclasses.replace(config_from_hf(hf, source=hf_path), **keep)
    raise FileNotFoundError(f"init_from={path!r}: neither a Hugging Face model directory (config.json + "
                            f"*.safetensors) nor a params directory from tools/convert_hf.py (model_config.json)")


def pretrained_hf_config(path: str) -> dict | None:
    """The source Hugging Face `config.json` dict of a pretrained start (kept beside a converted params directory as
    `hf_config.json`), or None."""
    for name in ("hf_config.json", "config.json"):
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name)) as f:
                return json.load(f)
    return None


def load_pretrained(path: str, cfg: ModelConfig, mesh) -> tuple[dict, dict | None]:
    """(params laid out by `LM(cfg).param_shardings(mesh)`, the source Hugging Face config dict or None) of the
    pretrained start at `path` (see `pretrained_config`; `cfg` is what it returned). Weights are read straight into
    their shards."""
    from jaxpost.models.hf import from_pretrained
    from jaxpost.models.params_io import MODEL_CONFIG, load_orbax_params

    if os.path.exists(os.path.join(path, MODEL_CONFIG)):
        model, _ = load_orbax_params(path, mesh)
        params = model.params
        if any(x.dtype != jnp.dtype(cfg.param_dtype) for x in jax.tree.leaves(params)):
            shardings = jax.tree.map(lambda x: x.sharding, params)
            params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.param_dtype), p),
                             out_shardings=shardings, donate_argnums=0)(params)
        return params, model.hf_config
    model, _ = from_pretrained(path, mesh=mesh, dtype=cfg.param_dtype, compute_dtype=cfg.dtype)
    return model.params, model.hf_config


def export_hf(params, cfg: ModelConfig, tokenizer: ChatTokenizer, directory: str, *, base_config: dict | None,
              dtype: str | None = None) -> None:
    """A Hugging Face model directory (safetensors, config.json and the tokenizer) that transformers, vLLM and
    SGLang load: `params` must be plain decoder params (merge LoRA adapters first)."""
    from jaxpost.models.hf import save_pretrained

    save_pretrained(params, cfg, directory, base_config=base_config, dtype=dtype)
    if jax.process_index() == 0:
        save_tokenizer(tokenizer, directory)


@functools.lru_cache(maxsize=8)
def eval_sampler(lm, mesh, pad_id: int, max_prompt_len: int) -> Sampler:
    """One sampler per (model, mesh, pad id, prompt length), so that repeated evaluations reuse its compiled
    program (one prompt bucket: the power of two >= max_prompt_len)."""
    return Sampler(lm, mesh, pad_id=pad_id, min_prompt_bucket=max_prompt_len)


def task_accuracy(lm, params, tokenizer, task, examples, cfg: EvalConfig, mesh, *, n_samples: int = 5) -> dict:
    """Fraction of `examples` whose greedy completion (the KV-cache sampler at temperature 0, stopping at the
    tokenizer's stop ids) the task's checker accepts, and the first `n_samples` (prompt, completion, answer)
    triples. For a task that tells worked answers from direct ones (`task.has_trace`): `trace_fraction` (of the
    answers that used the trace), `trace_accuracy` and `direct_accuracy` (None when no answer took that form)."""
    if not examples:
        return {"accuracy": None, "n": 0}
    sampler = eval_sampler(lm, mesh, tokenizer.pad_id, cfg.max_prompt_len)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                              stop_ids=tuple(tokenizer.stop_ids))
    correct, total = 0, 0
    samples = []
    has_trace = getattr(task, "has_trace", None)
    by_form = {True: [0, 0], False: [0, 0]}  # traced / direct: [correct, total]
    for batch in build_prompt_batches(examples, tokenizer, batch_size=cfg.batch_size,
                                      max_prompt_len=cfg.max_prompt_len):
        # Every row, filler rows of the last batch included: all batches fall in one bucket (one compile).
        prompts = [tokens[:n] for tokens, n in zip(batch["tokens"], batch["lengths"])]
        rollout = sampler.generate(params, prompts, sampling)
        for row in np.nonzero(batch["valid"])[0]:
            completion = decode_completion(tokenizer, rollout.tokens[row, :rollout.lengths[row]])
            ok = task.check(completion, batch["answers"][row])
            correct += int(ok)
            total += 1
            if has_trace is not None:
                form = by_form[bool(has_trace(completion))]
                form[0] += int(ok)
                form[1] += 1
            if len(samples) < n_samples:
                samples.append({"prompt": examples[batch["indices"][row]].get("prompt"),
                                "completion": completion, "answer": batch["answers"][row], "correct": ok})
    out = {"accuracy": correct / total, "n": total, "samples": samples}
    if has_trace is not None:
        out["trace_fraction"] = by_form[True][1] / total
        out["trace_accuracy"] = by_form[True][0] / by_form[True][1] if by_form[True][1] else None
        out["direct_accuracy"] = by_form[False][0] / by_form[False][1] if by_form[False][1] else None
    return out


def sample_task_completions(lm, params, tokenizer, task, mesh, *, n_prompts: int, samples_per_prompt: int,
                            temperature: float, batch: int, eval_cfg: EvalConfig, seed: int):
    """(the first `n_prompts` train examples of `task`, their `samples_per_prompt` completions sampled from the
    model at `temperature`, as text): the model's own answers, for on-policy preference or KTO data. Prompts are
    sampled `batch` at a time, with the eval config's prompt and completion lengths."""
    examples = task.examples("train", n_prompts)
    sampler = eval_sampler(lm, mesh, tokenizer.pad_id, eval_cfg.max_prompt_len)
    sampling = SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens, temperature=temperature,
                              n_samples=samples_per_prompt, stop_ids=tuple(tokenizer.stop_ids))
    samples, G = [], samples_per_prompt
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": ex["prompt"]}],
                                         add_generation_prompt=True)[0] for ex in chunk]
        rollout = sampler.generate(params, prompts, sampling, seed=seed * 100003 + i)
        texts = [decode_completion(tokenizer, c) for c in rollout.completions()]
        samples += [texts[j * G:(j + 1) * G] for j in range(len(chunk))]
    return examples, samples


def sample_accuracy(task, examples, samples) -> float:
    """The fraction of sampled completions the task's checker accepts."""
    return float(np.mean([task.check(s, ex["answer"]) for ex, group in zip(examples, samples) for s in group]))


def cached_records(path: str, make, *, what: str) -> list[dict]:
    """JSONL records at `path`, or `make() -> (records, stats)` written there atomically (a killed run finds either
    the whole file or none)."""
    if os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f]
    t0 = time.perf_counter()
    records, stats = make()
    if is_primary():
        with open(path + ".tmp", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(path + ".tmp", path)
    log.info("%s: %s (%.0f s)", what, stats, time.perf_counter() - t0)
    return records


def precomputed(path: str, steps: int, batches, score, *, what: str = "reference log-probs") -> np.ndarray:
    """`score(batch)` of the first `steps` batches of `batches`, stacked [steps, ...] and cached at `path` (written
    atomically; a cache covering at least `steps` batches is reused): the reference log-probs a preference-style
    run precomputes once, in training order, so that its step holds no reference weights."""
    if os.path.exists(path):
        cached = np.load(path)
        if cached.shape[0] >= steps:
            return cached
    t0 = time.perf_counter()
    out = np.stack([np.asarray(score(next(batches)), np.float32) for _ in range(steps)])
    np.save(path + ".tmp.npy", out)
    os.replace(path + ".tmp.npy", path)
    log.info("%s of %d batches precomputed (%.0f s)", what, steps, time.perf_counter() - t0)
    return out


def batch_feeder(step_fn, grad_accum: int, *, unit_key: str, per_process: int, start_step: int,
                 attach=None):
    """`to_device(batch)` of a recipe: checks that the pipeline gave `per_process` units (the length of
    `batch[unit_key]`), adds per-step arrays (`attach(batch, step) -> batch`, e.g. the precomputed reference
    log-probs of that step), splits the batch into micro-batches and places it by the step's shardings."""
    counter = {"step": start_step}

    def to_device(batch):
        if batch[unit_key].shape[0] != per_process:
            raise ValueError(f"data pipeline gave {batch[unit_key].shape[0]} units ({unit_key}) per process, "
                             f"expected {per_process}")
        if attach is not None:
            batch = attach(batch, counter["step"])
        counter["step"] += 1
        return device_put_batch(split_microbatches(batch, grad_accum, keys=step_fn.batch_shardings),
                                step_fn.batch_shardings)

    return to_device


# ---- the run skeleton ------------------------------------------------------------------------------------------


class Run:
    """One recipe run in its workdir (module docstring). `cfg` has `mesh` (MeshConfig) and `train` (TrainConfig)
    fields. Holds the mesh, the Checkpointer, the metrics log (opened once, at the step the run resumes from) and the
    checkpoint metadata `meta` (saved with every checkpoint: values computed once per run, e.g. accuracy_before)."""

    def __init__(self, cfg, workdir: str, *, stop_at: int | None = None):
        self.t_start = time.perf_counter()
        setup_logging()
        os.makedirs(workdir, exist_ok=True)
        if is_primary():
            write_config(cfg, workdir)
        self.cfg, self.workdir, self.stop_at = cfg, workdir, stop_at
        self.mesh = make_mesh(cfg.mesh)
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                 async_save=cfg.train.async_checkpoints)
        self.meta: dict = {}
        self.start_step = 0
        self.metrics: MetricsLog | None = None
        self.batches = None
        self.train_time_s = 0.0

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def process_path(self, stem: str, ext: str) -> str:
        """A file of this process's own rows (e.g. precomputed reference log-probs): `stem.I.ext`, or
        `stem.I_of_N.ext` in a run of N > 1 processes, so that a run resumed on another process count recomputes it."""
        i, n = jax.process_index(), jax.process_count()
        return self.path(f"{stem}.{i}.{ext}" if n == 1 else f"{stem}.{i}_of_{n}.{ext}")

    def restore_or_init(self, abstract_state, shardings, batches, init, *, updates_per_step: int = 1):
        """The latest complete checkpoint, restored onto `shardings` with the data iterator `batches` set to its saved
        position, or `init()` (a fresh sharded state) at step 0. A loop step that makes several optimizer updates
        (an RL iteration) passes `updates_per_step`: the loop step is state.step / that. Opens the metrics log."""
        self.batches = batches
        latest = self.ckpt.latest_step()
        if latest is None:
            state = init()
        else:
            state, data_state, self.meta = self.ckpt.restore(None, with_shardings(abstract_state, shardings))
            batches.set_state(state_for_process(data_state, batches.get_state()))
            self.start_step = int(jax.device_get(state.step)) // updates_per_step
            log.info("resumed from %s at step %d", self.ckpt.directory, self.start_step)
        self.meta["config"] = to_json_dict(self.cfg)  # the config of the run that wrote each checkpoint
        self.metrics = MetricsLog(self.path("metrics.jsonl"), resume_step=self.start_step)
        return state

    def once(self, key: str, compute):
        """`meta[key]`, computed by `compute()` the first time this run (not again on resume)."""
        if key not in self.meta:
            self.meta[key] = compute()
            log.info("%s: %s", key, self.meta[key])
        return self.meta[key]

    def train(self, step_fn, state, batches, *, to_device=lambda b: b, evaluate=None, host_metrics=None,
              desc: str = "train"):
        """`train_loop` from the resume step to `cfg.steps` with the run's checkpoints, metrics log and cadence
        (cfg.train). `evaluate(state) -> dict` of metrics. Returns the final state, or None when the run stopped
        early at `stop_at` (its state saved, so a later call continues)."""
        cfg, ckpt = self.cfg, self.ckpt

        def checkpoint(step, state):
            ckpt.save(step, state, data_state=self.data_state(), meta=self.meta)

        t0 = time.perf_counter()
        try:
            state = train_loop(
                step_fn=step_fn, state=state, batches=batches, to_device=to_device, start_step=self.start_step,
                steps=cfg.steps, metrics_log=self.metrics, checkpoint=checkpoint,
                checkpoint_every=cfg.train.checkpoint_every or cfg.steps,
                evaluate=None if evaluate is None else (lambda step, st: evaluate(st)),
                eval_every=cfg.train.eval_every, log_every=cfg.train.log_every, host_metrics=host_metrics,
                desc=desc, stop_at=self.stop_at, max_bad_steps=cfg.train.max_bad_steps)
        except BaseException as e:
            # A preemption (`Preempted`), a failing data file, reward function or tokenizer, or NonFiniteError:
            # the saves already started (of states before the failure) complete, so the latest checkpoint on disk
            # is a whole, good one; nothing after the failure is saved.
            ckpt.close()
            if isinstance(e, Preempted):
                log.warning("%s", e)
            raise
        self.train_time_s = time.perf_counter() - t0
        stopped = self.stop_at is not None and self.stop_at < cfg.steps
        if stopped:
            ckpt.wait()
            if ckpt.latest_step() != self.stop_at:
                ckpt.save(self.stop_at, state, data_state=self.data_state(), meta=self.meta, force=True)
        ckpt.close()
        return None if stopped else state

    def data_state(self) -> dict:
        """The data item of a checkpoint: the iterator state of every process (`jaxpost.data.process_state`). A
        collective: every process calls it at the same step."""
        return gather_process_states(self.batches.get_state())

    def finish(self, results: dict, *, plots: tuple[str, ...] = (), filename: str = "metrics.png",
               title: str = "", xlabel: str = "step") -> dict:
        """Adds the step counts and wall times to `results`, writes results.json and the plot, logs them."""
        results = {**results, "steps": self.cfg.steps, "resumed_from_step": self.start_step,
                   "train_time_s": self.train_time_s, "wall_time_s": time.perf_counter() - self.t_start}
        if is_primary():
            with open(self.path("results.json"), "w") as f:
                json.dump(results, f, indent=2)
        if plots and is_primary():
            plot_metrics(self.workdir, plots, filename=filename, title=title, xlabel=xlabel)
        log.info("results: %s", json.dumps({k: v for k, v in results.items() if k not in ("samples", "data")}))
        return results


#: What a held-out task evaluation reports besides accuracy, for a task with worked answers (`task_accuracy`).
TRACE_KEYS = ("trace_fraction", "trace_accuracy", "direct_accuracy")


def evaluate_before(run: Run, evaluate, params) -> None:
    """Held-out evaluation of the start, once per run: `meta["accuracy_before"]` and, for a task with worked answers,
    `meta["trace_before"]` (TRACE_KEYS)."""
    if "accuracy_before" not in run.meta:
        full = evaluate(params, full=True)
        run.once("accuracy_before", lambda: full["accuracy"])
        run.meta["trace_before"] = {k: full[k] for k in TRACE_KEYS if k in full}


def task_results(run: Run, final: dict) -> dict:
    """accuracy_before / accuracy_after, the first samples, and <trace key>_before / _after for a task with worked
    answers, from the start's evaluation (`evaluate_before`) and the final one (`evaluate(params, full=True)`)."""
    out = {"accuracy_before": run.meta["accuracy_before"], "accuracy_after": final["accuracy"],
           "samples": final.get("samples", [])}
    before = run.meta.get("trace_before", {})
    for k in TRACE_KEYS:
        if k in final or k in before:
            out[f"{k}_before"], out[f"{k}_after"] = before.get(k), final.get(k)
    return out


def task_evaluator(lm, tokenizer, task, cfg: EvalConfig, mesh, *, params_of=lambda params: params):
    """`evaluate(params, full=False)`: held-out greedy accuracy on the task's first `cfg.n_examples` test problems
    (None when n_examples is 0); `full=True` gives `task_accuracy`'s dict with samples. `params_of` picks the
    decoder params out of a state's params (e.g. an RL state's "policy")."""
    examples = task.examples("test", cfg.n_examples)

    def evaluate(params, full: bool = False):
        if not cfg.n_examples:
            return {"accuracy": None, "samples": []} if full else None
        out = task_accuracy(lm, params_of(params), tokenizer, task, examples, cfg, mesh)
        return out if full else out["accuracy"]

    return evaluate


def policy_optimizer(lm, optim_cfg, total_steps: int, mesh):
    """(tx, schedule, abstract train state, its shardings) of a decoder fine-tuned for `total_steps` steps (the
    optimizer covers its trainable params: a LoRA model's adapters)."""
    tx, schedule = make_optimizer(optim_cfg, total_steps, logical_axes=trainable_of(lm, lm.logical_axes))
    abstract = abstract_train_state(lm, tx)
    return tx, schedule, abstract, state_shardings(abstract, lm.param_shardings(mesh), tx, mesh, model=lm)


def policy_init(lm, tx, start_params, shardings, mesh, *, seed: int):
    """`init()` of a state starting from `start_params` (decoder params), created sharded: a full model copies the
    start (which may stay the reference); a LoRA model adds fresh adapters and takes over the base arrays."""
    def init():
        init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
        params = lm.add_adapters(start_params, init_key, mesh) if lm.lora is not None else start_params
        donate = (0,) if lm.lora is not None else ()
        return jax.jit(lambda p, k: new_train_state(lm, tx, p, k), out_shardings=shardings,
                       donate_argnums=donate)(params, state_key)

    return init


# ---- the SFT start of the post-training recipes ---------------------------------------------------------------


def sft_start(workdir: str, init_from: str, sft_cfg, train_sft):
    """(SFT config, SFT workdir): `init_from` (an SFT workdir) with the config it was trained with, or, without it,
    `train_sft(sft_cfg, workdir/sft)` run first (itself resumable; skipped when its results.json exists)."""
    if init_from:
        path = os.path.join(init_from, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"init_from={init_from!r}: no config.json (expected an SFT workdir)")
        with open(path) as f:
            saved = json.load(f)
        saved.pop("class", None)
        return from_config_dict(type(sft_cfg), saved), init_from
    sft_dir = os.path.join(workdir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "results.json")):
        log.info("no init_from: training the SFT start into %s", sft_dir)
        train_sft(sft_cfg, sft_dir)
    return sft_cfg, sft_dir


def open_sft_start(workdir: str, init_from: str, sft_cfg, train_sft):
    """(SFT config, SFT workdir, task, tokenizer) of a post-training run: `sft_start`, its task, and its tokenizer
    (copied into `workdir`)."""
    sft_cfg, sft_dir = sft_start(workdir, init_from, sft_cfg, train_sft)
    task = task_from_config(sft_cfg.task)
    tokenizer = load_tokenizer(sft_dir)
    if is_primary():
        save_tokenizer(tokenizer, workdir)
    return sft_cfg, sft_dir, task, tokenizer


def load_params(model, mesh, workdir: str):
    """The final params of a workdir (an SFT run's decoder, or any model with `abstract_params` and
    `param_shardings`, e.g. a reward model's `ScalarHeadLM`), restored directly into their sharded layout."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
        return ckpt.restore_params(None, with_shardings(model.abstract_params, model.param_shardings(mesh)))
    finally:
        ckpt.close()


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
