"""Pieces every recipe shares: task and eval configs, the tokenizer of a workdir, batch placement, task accuracy."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.config import ModelConfig
from jaxpost.data import build_prompt_batches
from jaxpost.rollout import Sampler, SamplingConfig
from jaxpost.tokenizer import ChatTokenizer, HFTokenizer, decode_completion, load_tokenizer, train_tokenizer
from jaxpost.train.state import with_shardings

log = logging.getLogger("jaxpost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """A built-in verifiable task (`jaxpost.data.tasks`)."""

    name: str = "arithmetic"
    min_digits: int = 1
    max_digits: int = 2
    ops: tuple[str, ...] = ("+", "-")
    seed: int = 0

    def kwargs(self) -> dict:
        return {"min_digits": self.min_digits, "max_digits": self.max_digits, "ops": tuple(self.ops),
                "seed": self.seed}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out accuracy of greedy answers on the first `n_examples` problems of the task's test split."""

    n_examples: int = 200
    batch_size: int = 100
    max_prompt_len: int = 24
    max_new_tokens: int = 7

    def __post_init__(self):
        if self.n_examples < 0 or self.batch_size <= 0 or self.max_prompt_len <= 0 or self.max_new_tokens <= 0:
            raise ValueError(f"EvalConfig: invalid sizes {self}")


def setup_logging() -> None:
    logger = logging.getLogger("jaxpost")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
    SentencePiece `.model`, a `tokenizer.json` or a checkpoint directory: `jaxpost.tokenizer.load_tokenizer`); else
    one trained on the task's corpus. The result is saved into the workdir."""
    if has_tokenizer(workdir):
        return load_tokenizer(workdir)
    if path:
        tokenizer = load_tokenizer(path)
    else:
        tokenizer = train_tokenizer(task.corpus(4000), vocab_size=vocab_size)
    save_tokenizer(tokenizer, workdir)
    return tokenizer


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


def device_put_batch(batch: dict, shardings: dict) -> dict:
    """Host arrays of this process -> global jax.Arrays laid out by `shardings` (one code path for one or many
    processes: each process passes its own slice of the global batch)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in shardings}


@functools.lru_cache(maxsize=8)
def eval_sampler(lm, mesh, pad_id: int, max_prompt_len: int) -> Sampler:
    """One sampler per (model, mesh, pad id, prompt length), so that repeated evaluations reuse its compiled
    program (one prompt bucket: the power of two >= max_prompt_len)."""
    return Sampler(lm, mesh, pad_id=pad_id, min_prompt_bucket=max_prompt_len)


def task_accuracy(lm, params, tokenizer, task, examples, cfg: EvalConfig, mesh, *, n_samples: int = 5) -> dict:
    """Fraction of `examples` whose greedy completion (the KV-cache sampler at temperature 0, stopping at the
    tokenizer's stop ids) the task's checker accepts, and the first `n_samples` (prompt, completion, answer)
    triples."""
    if not examples:
        return {"accuracy": None, "n": 0}
    sampler = eval_sampler(lm, mesh, tokenizer.pad_id, cfg.max_prompt_len)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                              stop_ids=tuple(tokenizer.stop_ids))
    correct, total = 0, 0
    samples = []
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
            if len(samples) < n_samples:
                samples.append({"prompt": examples[batch["indices"][row]].get("prompt"),
                                "completion": completion, "answer": batch["answers"][row], "correct": ok})
    return {"accuracy": correct / total, "n": total, "samples": samples}


def restore_or_init(ckpt, abstract_state, shardings, batches, init, *, updates_per_step: int = 1):
    """(state, start_step, meta): the latest complete checkpoint in `ckpt`, restored onto `shardings` with the data
    iterator `batches` set to its saved position, or `init()` (a fresh sharded state) at step 0. A loop step that
    makes several optimizer updates (an RL iteration) passes `updates_per_step`: start_step = state.step / that."""
    latest = ckpt.latest_step()
    if latest is None:
        return init(), 0, {}
    state, data_state, meta = ckpt.restore(latest, with_shardings(abstract_state, shardings))
    batches.set_state(data_state)
    start_step = int(jax.device_get(state.step)) // updates_per_step
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
    return state, start_step, meta


def close_checkpoints(ckpt, state, batches, meta: dict, *, stop_at: int | None, steps: int) -> bool:
    """Ends a run's checkpointing. Returns True when the run was stopped early at `stop_at` (as a preemption
    would), after making sure the state at `stop_at` is saved, so a later call continues from there."""
    stopped = stop_at is not None and stop_at < steps
    if stopped:
        ckpt.wait()
        if ckpt.latest_step() != stop_at:
            ckpt.save(stop_at, state, data_state=batches.get_state(), meta=meta, force=True)
    ckpt.close()
    return stopped
