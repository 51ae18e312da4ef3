"""The SFT recipe: tokenizer -> grain pipeline -> sharded SFT step -> host loop with eval and checkpoints.

`run(cfg, workdir)` starts fresh in an empty workdir and resumes from the latest complete checkpoint otherwise,
continuing exactly as an uninterrupted run (same batches, same RNG, same optimizer state).

A pretrained start: `init_from` names a Hugging Face Llama / Qwen2 / Qwen3 directory (or a params directory from
`tools/convert_hf.py to-orbax`); the model config and the tokenizer come from it, the weights are read straight into
their shards. `lora.rank > 0` trains LoRA adapters on the frozen base instead of every weight. `export_hf` writes
the result (adapters merged) as a Hugging Face directory into `workdir/hf`, and, with LoRA, the adapters alone into
`workdir/adapters`.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from jaxpost.config import (DataConfig, EvalConfig, LoRAConfig, MeshConfig, ModelConfig, OptimConfig, TaskConfig,
                            TrainConfig)
from jaxpost.batch import device_put_batch, split_microbatches
from jaxpost.data import build_sft_iterator, read_jsonl, task_from_config
from jaxpost.models import LM
from jaxpost.models.lora import save_adapters
from jaxpost.recipes.common import (Run, evaluate_before, export_hf, load_or_make_tokenizer, load_pretrained,
                                    pretrained_config, pretrained_hf_config, task_evaluator, task_results)
from jaxpost.train.optim import make_optimizer
from jaxpost.train.sft import SFT
from jaxpost.train.state import (abstract_train_state, create_train_state, new_train_state, state_shardings,
                                 trainable_of)
from jaxpost.train.step import make_step

log = logging.getLogger("jaxpost")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """SFT on a built-in task (default) or on a JSONL file (`train_jsonl`); evaluation on the task's test split."""

    seed: int = 0
    steps: int = 200
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig.small(vocab_size=128))
    # A pretrained start: a Hugging Face model directory or a tools/convert_hf.py params directory ("" = random
    # init). Its config replaces `model` (keeping model.dtype, param_dtype, remat); its tokenizer is used unless
    # `tokenizer_path` is set.
    init_from: str = ""
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # rank 0: full fine-tuning
    export_hf: bool = False  # write workdir/hf (Hugging Face format, adapters merged) at the end
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train_jsonl: str | None = None
    tokenizer_path: str | None = None
    tokenizer_vocab: int = 64
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(seq_len=128, batch_size=16))
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logprobs_impl: str = "auto"

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"SFTConfig.steps must be > 0, got {self.steps}")


def run(cfg: SFTConfig, workdir: str, *, stop_at: int | None = None) -> dict | None:
    """Trains, evaluates and writes config.json, metrics.jsonl, checkpoints/, plots and results.json into workdir.

    `stop_at` ends this invocation after that step (and its checkpoint), as a preemption would; calling `run` again
    on the workdir continues the same run. Returns the results, or None when stopped early."""
    if cfg.init_from:  # the recorded config names the model actually trained (what DPO / RL starts read)
        cfg = dataclasses.replace(cfg, model=pretrained_config(cfg.init_from, cfg.model))
    run = Run(cfg, workdir, stop_at=stop_at)
    mesh = run.mesh

    task = task_from_config(cfg.task)
    tokenizer = load_or_make_tokenizer(workdir, task, path=cfg.tokenizer_path or cfg.init_from or None,
                                       vocab_size=cfg.tokenizer_vocab)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        source = cfg.tokenizer_path or cfg.init_from or workdir
        model = f"{cfg.init_from}/config.json" if cfg.init_from else "--config.model.vocab_size"
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary "
                         f"(vocab_size={cfg.model.vocab_size}, {model}) is smaller: the tokenizer does not match the "
                         f"model (raise vocab_size or use the model's own tokenizer)")

    lm = LM(cfg.model, cfg.lora)
    tx, schedule = make_optimizer(cfg.optim, cfg.steps, logical_axes=trainable_of(lm, lm.logical_axes))
    source = read_jsonl(cfg.train_jsonl, on_bad=cfg.data.on_bad_record) if cfg.train_jsonl else task.source("train")
    batches = build_sft_iterator(
        source, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, packing=cfg.data.packing,
        overlong=cfg.data.overlong, on_empty=cfg.data.on_empty, shuffle=cfg.data.shuffle, seed=cfg.seed)

    abstract = abstract_train_state(lm, tx)
    shardings = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh, model=lm)
    hf_config = None

    def init():
        nonlocal hf_config
        if not cfg.init_from:
            return create_train_state(lm, tx, mesh, cfg.seed)[0]
        params, hf_config = load_pretrained(cfg.init_from, cfg.model, mesh)
        init_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        if lm.lora is not None:
            params = lm.add_adapters(params, init_key, mesh)
        return jax.jit(lambda p, k: new_train_state(lm, tx, p, k), out_shardings=shardings,
                       donate_argnums=0)(params, state_key)

    state = run.restore_or_init(abstract, shardings, batches, init)
    n_train = sum(int(x.size) for x in jax.tree.leaves(trainable_of(lm, lm.abstract_params)))
    log.info("model %s: %.2fM params (%.3fM trained) on mesh %s", cfg.model.name, lm.n_params / 1e6,
             n_train / 1e6, dict(mesh.shape))

    evaluate = task_evaluator(lm, tokenizer, task, cfg.eval, mesh)
    evaluate_before(run, evaluate, state.params)

    rows = cfg.data.batch_size // jax.process_count()
    step_fn = make_step(lm, tx, schedule, SFT(lm, logprobs_impl=cfg.logprobs_impl), mesh=mesh,
                        state_shardings=shardings, units=cfg.data.batch_size, grad_accum=cfg.train.grad_accum)

    def to_device(batch):
        if batch["inputs"].shape[0] != rows:
            raise ValueError(f"data pipeline gave {batch['inputs'].shape[0]} rows per process, expected {rows}")
        return device_put_batch(split_microbatches(batch, cfg.train.grad_accum, keys=step_fn.batch_shardings),
                                step_fn.batch_shardings)

    state = run.train(step_fn, state, batches, to_device=to_device,
                      evaluate=lambda st: {"eval_accuracy": evaluate(st.params)},
                      host_metrics=lambda: batches.stats, desc="sft")
    if state is None:
        return None

    final = evaluate(state.params, full=True)
    results = {
        **task_results(run, final),
        "n_params": lm.n_params,
        "n_trained_params": n_train,
        "data": batches.stats,
    }
    if cfg.export_hf:
        if hf_config is None and cfg.init_from:  # a resumed run: the source config, read again for its extra fields
            hf_config = pretrained_hf_config(cfg.init_from)
        export_hf(lm.merged(state.params), cfg.model, tokenizer, run.path("hf"), base_config=hf_config)
        if lm.lora is not None and jax.process_index() == 0:
            save_adapters(state.params, lm.lora, run.path("adapters"))
        results["export"] = {"hf": run.path("hf")}
    return run.finish(results, plots=("loss", "grad_norm", "lr", "tokens_per_s", "eval_accuracy"),
                      filename="sft.png", title=f"SFT {cfg.model.name} on {cfg.task.name}")
