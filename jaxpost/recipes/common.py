"""Pieces every recipe shares: task and eval configs, the tokenizer of a workdir, batch placement, task accuracy."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys

import jax
import numpy as np

from jaxpost.data import build_prompt_batches
from jaxpost.rollout import Sampler, SamplingConfig
from jaxpost.tokenizer import Tokenizer, decode_completion, train_tokenizer
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


def load_or_make_tokenizer(workdir: str, task, *, path: str | None, vocab_size: int) -> Tokenizer:
    """The workdir's `tokenizer.model` if present (a resumed run keeps its tokenizer); else the model at `path`;
    else one trained on the task's corpus. The result is saved into the workdir."""
    local = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(local):
        return Tokenizer.load(local)
    if path:
        tokenizer = Tokenizer.load(path)
    else:
        tokenizer = train_tokenizer(task.corpus(4000), vocab_size=vocab_size)
    tokenizer.save(local)
    return tokenizer


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
