"""The reward-model recipe: SFT start -> decoder + scalar head -> pairwise (Bradley-Terry) training on preference
pairs -> held-out pairwise accuracy.

Training pairs come from the task's train split ("near_miss": the correct answer over a plausible wrong one, or
"samples": the SFT model's own answers labelled by the checker, as in `recipes.dpo`); the held-out pairs are near
misses on the test split, so pairwise accuracy (1[r_chosen > r_rejected]) measures whether the model learned to
tell right from wrong on problems it never saw. The head starts at zero (every reward 0: accuracy 0 by the strict
comparison, chance 0.5).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.batch import device_put_batch, split_microbatches
from jaxpost.config import DataConfig, EvalConfig, MeshConfig, OptimConfig, TrainConfig
from jaxpost.data.preference import arithmetic_preference_records, build_preference_iterator
from jaxpost.recipes import sft as sft_recipe
from jaxpost.recipes.common import Run, load_start_params, open_sft_start
from jaxpost.recipes.dpo import PAIR_SOURCES, build_pairs
from jaxpost.models.heads import ScalarHeadLM, make_sequence_scorer
from jaxpost.train.rm import PairwiseReward
from jaxpost.train.optim import make_optimizer
from jaxpost.train.state import TrainState, abstract_train_state, state_shardings
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
    """A Bradley-Terry reward model from an SFT start on a built-in task's preference pairs."""

    seed: int = 0
    steps: int = 150
    init_from: str = ""  # an SFT workdir; "" runs `sft` first into workdir/sft
    sft: sft_recipe.SFTConfig = dataclasses.field(default_factory=sft_recipe.SFTConfig)
    center_rewards_coefficient: float = 0.0  # TRL's RewardConfig option (0: off)
    pairs: str = "near_miss"
    n_prompts: int = 4096
    samples_per_prompt: int = 8
    pairs_per_prompt: int = 1
    sample_temperature: float = 1.0
    sample_batch: int = 128
    n_eval_pairs: int = 256
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=32, batch_size=32))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=10))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # sampling sizes for pairs="samples"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"RMConfig.steps must be > 0, got {self.steps}")
        if self.pairs not in PAIR_SOURCES:
            raise ValueError(f"RMConfig.pairs must be one of {PAIR_SOURCES}, got {self.pairs!r}")


def pairwise_accuracy(score, params, records, tokenizer, cfg: RMConfig) -> dict:
    """Held-out pairwise accuracy and mean margin of `records` (every pair, the last batch padded)."""
    it = build_preference_iterator(records, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                   overlong="truncate", shuffle=False, num_epochs=1)
    correct, margins = [], []
    for batch in it:
        r = np.asarray(score(params, batch))
        keep = batch["pair_mask"] > 0
        m = (r[0::2] - r[1::2])[keep]
        correct += list(m > 0)
        margins += list(m)
    it.close()
    return {"pairwise_accuracy": float(np.mean(correct)), "mean_margin": float(np.mean(margins)), "n": len(correct)}


def run(cfg: RMConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """SFT start (or init_from) -> reward model; writes config.json, metrics.jsonl, checkpoints/, pairs.jsonl,
    rm.png and results.json into workdir, resuming whatever exists there."""
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh
    sft_cfg, sft_dir, task, tokenizer = open_sft_start(workdir, cfg.init_from, cfg.sft, sft_recipe.run)

    model = ScalarHeadLM(sft_cfg.model)
    lm_params = load_start_params(sft_cfg, mesh, sft_dir)
    records = build_pairs(cfg, model.lm, lm_params, tokenizer, task, mesh, run.path("pairs.jsonl"))
    eval_records = arithmetic_preference_records(task, "test", cfg.n_eval_pairs, seed=cfg.seed + 1)

    tx, schedule = make_optimizer(cfg.optim, cfg.steps, logical_axes=model.logical_axes)
    abstract = abstract_train_state(model, tx)
    shardings = state_shardings(abstract, model.param_shardings(mesh), tx, mesh)
    batches = build_preference_iterator(records, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                        overlong=cfg.data.overlong, shuffle=cfg.data.shuffle, seed=cfg.seed)

    def make(lm_params, key):
        params = model.with_lm_params(lm_params, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=key)

    state = run.restore_or_init(abstract, shardings, batches,
                                lambda: jax.jit(make, out_shardings=shardings)(lm_params, jax.random.PRNGKey(cfg.seed)))
    del lm_params

    rows = 2 * (cfg.data.batch_size // jax.process_count())
    score = make_sequence_scorer(model, mesh, model.param_shardings(mesh), rows=rows)
    before = run.once("eval_before", lambda: pairwise_accuracy(score, state.params, eval_records, tokenizer, cfg))

    loss_kwargs = ({"center_rewards_coefficient": cfg.center_rewards_coefficient}
                   if cfg.center_rewards_coefficient else {})
    step_fn = make_step(model, tx, schedule, PairwiseReward(model, loss_kwargs=loss_kwargs), mesh=mesh,
                        state_shardings=shardings, units=cfg.data.batch_size, grad_accum=cfg.train.grad_accum)

    def to_device(batch):
        return device_put_batch(split_microbatches(batch, cfg.train.grad_accum, keys=step_fn.batch_shardings),
                                step_fn.batch_shardings)

    def evaluate(st):
        return {"eval_pairwise_accuracy": pairwise_accuracy(score, st.params, eval_records, tokenizer,
                                                            cfg)["pairwise_accuracy"]}

    state = run.train(step_fn, state, batches, to_device=to_device, evaluate=evaluate,
                      host_metrics=lambda: batches.stats, desc="rm")
    if state is None:
        return None
    after = pairwise_accuracy(score, state.params, eval_records, tokenizer, cfg)
    return run.finish({"pairwise_accuracy_before": before["pairwise_accuracy"],
                       "pairwise_accuracy_after": after["pairwise_accuracy"],
                       "mean_margin_after": after["mean_margin"], "eval_pairs": after["n"],
                       "train_pairs": len(records), "sft_dir": sft_dir},
                      plots=("loss", "accuracies", "margins", "chosen_rewards", "rejected_rewards",
                             "eval_pairwise_accuracy"), filename="rm.png", title="Bradley-Terry reward model")
