"""Configuration: frozen, keyword-only dataclasses validated on construction.

Experiments compose these into one top-level dataclass; `jaxpost.cli` turns it into command-line overrides
(`--config.steps=200`, `--config.model.d_model=512`) and back. Each value is defined once, in one of these classes,
and validated there; checks that span several configs (a KL penalty needs a reference, GAE a value model) are the
functions at the end, called by every place that combines them.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Literal

from jaxpost.losses import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES,
                            REQUIRED_AGGREGATION, SEQUENCE_LEVEL_ESTIMATORS, check_correction)

DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("none", "llama3")


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama 3 / Qwen2 / Qwen3-style decoder.

    `head_dim` defaults to d_model // n_heads. `qkv_bias` is Qwen2's attention bias; `qk_norm` is Qwen3's RMSNorm on
    queries and keys per head. `dtype` is the compute dtype (parameters stay in `param_dtype`, float32 master weights).
    `rope_scaling="llama3"` rescales the RoPE frequencies as Llama 3.1 does (`rope_factor`, `rope_low_freq_factor`,
    `rope_high_freq_factor`, `rope_original_max_len`; see `jaxpost.models.transformer.rope_frequencies`).
    """

    name: str = "custom"
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0
    mlp_dim: int = 1024
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len")
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: set head_dim")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"ModelConfig.{f} must be one of {DTYPES}, got {getattr(self, f)!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"ModelConfig.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling == "llama3":
            _positive(self, "rope_factor", "rope_low_freq_factor", "rope_original_max_len")
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ValueError(f"ModelConfig.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                                 f"rope_low_freq_factor={self.rope_low_freq_factor}")

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings included, counted once when tied)."""
        D, H, K, hd, F, V = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim, self.vocab_size
        attn = D * H * hd + 2 * D * K * hd + H * hd * D
        if self.qkv_bias:
            attn += H * hd + 2 * K * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * D * F + 2 * D
        return self.n_layers * layer + V * D * (1 if self.tie_embeddings else 2) + D

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 * matmul params + attention scores."""
        D, H, K, hd, F, V = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim, self.vocab_size
        matmul_params = self.n_layers * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F) + D * V
        attention = self.n_layers * 2 * 2 * H * hd * seq_len  # QK^T and PV, full (unmasked) square
        return 3.0 * (2.0 * matmul_params + attention)

    # ---- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> ModelConfig:
        """For unit tests: two layers, d_model 64, GQA 4:2."""
        return cls(**{**dict(name="tiny", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             mlp_dim=128, max_seq_len=256), **kw})

    @classmethod
    def small(cls, **kw) -> ModelConfig:
        """~13M parameters with a 512 vocabulary: learns the built-in tasks on a CPU in minutes."""
        return cls(**{**dict(name="small", vocab_size=512, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2,
                             mlp_dim=1536, max_seq_len=512), **kw})

    @classmethod
    def qwen3_bench(cls, *, vocab_size: int = 512, **kw) -> ModelConfig:
        """A Qwen3-like 4-layer d_model=256 model used by the training benchmark."""
        return cls(**{**dict(name=f"qwen3_bench_v{vocab_size}", vocab_size=vocab_size, d_model=256, n_layers=4,
                             n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=768, qk_norm=True, rms_eps=1e-6,
                             rope_theta=1_000_000.0, tie_embeddings=False, max_seq_len=4096), **kw})

    @classmethod
    def llama3_1_8b(cls, **kw) -> ModelConfig:
        # Llama 3.1 rescales the RoPE frequencies for long context (its config.json's rope_scaling).
        return cls(**{**dict(name="llama3_1_8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, mlp_dim=14336, rope_theta=500_000.0, rope_scaling="llama3",
                             rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                             rope_original_max_len=8192, rms_eps=1e-5, max_seq_len=131072, dtype="bfloat16"), **kw})

    @classmethod
    def qwen2_5_0_5b(cls, **kw) -> ModelConfig:
        return cls(**{**dict(name="qwen2_5_0_5b", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                             n_kv_heads=2, mlp_dim=4864, rope_theta=1_000_000.0, rms_eps=1e-6, qkv_bias=True,
                             tie_embeddings=True, max_seq_len=32768, dtype="bfloat16"), **kw})

    @classmethod
    def qwen2_5_7b(cls, **kw) -> ModelConfig:
        return cls(**{**dict(name="qwen2_5_7b", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                             n_kv_heads=4, mlp_dim=18944, rope_theta=1_000_000.0, rms_eps=1e-6, qkv_bias=True,
                             max_seq_len=32768, dtype="bfloat16"), **kw})

    @classmethod
    def qwen3_0_6b(cls, **kw) -> ModelConfig:
        return cls(**{**dict(name="qwen3_0_6b", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
                             n_kv_heads=8, head_dim=128, mlp_dim=3072, rope_theta=1_000_000.0, rms_eps=1e-6,
                             qk_norm=True, tie_embeddings=True, max_seq_len=40960, dtype="bfloat16"), **kw})

    @classmethod
    def qwen3_8b(cls, **kw) -> ModelConfig:
        return cls(**{**dict(name="qwen3_8b", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
                             n_kv_heads=8, head_dim=128, mlp_dim=12288, rope_theta=1_000_000.0, rms_eps=1e-6,
                             qk_norm=True, max_seq_len=40960, dtype="bfloat16"), **kw})

    @classmethod
    def preset(cls, name: str, **kw) -> ModelConfig:
        presets = {n: getattr(cls, n) for n in PRESETS}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(presets)}")
        return presets[name](**kw)


PRESETS = ("tiny", "small", "qwen3_bench", "llama3_1_8b", "qwen2_5_0_5b", "qwen2_5_7b", "qwen3_0_6b", "qwen3_8b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh sizes. One axis may be -1: it takes every device the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got data={self.data}, fsdp={self.fsdp}, "
                             f"tensor={self.tensor}")
        for name, s in zip(("data", "fsdp", "tensor"), sizes):
            if s != -1 and s < 1:
                raise ValueError(f"MeshConfig.{name} must be >= 1 or -1, got {s}")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"MeshConfig {sizes}: {n_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if sizes[0] * sizes[1] * sizes[2] != n_devices:
            raise ValueError(f"MeshConfig data*fsdp*tensor = {sizes[0] * sizes[1] * sizes[2]} but there are "
                             f"{n_devices} devices")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`, and global-norm clipping."""

    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        _positive(self, "lr", "eps")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_norm < 0:
            raise ValueError(f"OptimConfig.clip_norm must be >= 0 (0 disables), got {self.clip_norm}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How examples become batches. `batch_size` is global (all processes, all micro-batches) in rows of `seq_len`.
    `on_bad_record`: a malformed line of a JSONL data file (bad UTF-8 or JSON, wrong fields) is an error naming
    file:line and field ("error"), or is skipped, counted and logged ("skip")."""

    seq_len: int = 128
    batch_size: int = 16
    packing: bool = True
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    on_empty: Literal["drop", "keep", "error"] = "drop"
    shuffle: bool = True
    on_bad_record: Literal["error", "skip"] = "error"

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size")
        if self.overlong not in ("truncate", "drop", "error"):
            raise ValueError(f"DataConfig.overlong must be truncate|drop|error, got {self.overlong!r}")
        if self.on_empty not in ("drop", "keep", "error"):
            raise ValueError(f"DataConfig.on_empty must be drop|keep|error, got {self.on_empty!r}")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"DataConfig.on_bad_record must be error|skip, got {self.on_bad_record!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The host loop: accumulation, logging, evaluation and checkpoint cadence (the length is the experiment's
    `steps`). `max_bad_steps`: a step with a non-finite loss or gradient is skipped (params and optimizer state
    unchanged); this many in a row stop the run with `jaxpost.train.loop.NonFiniteError`."""

    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_bad_steps: int = 10

    def __post_init__(self):
        _positive(self, "grad_accum", "log_every", "keep_checkpoints", "max_bad_steps")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("TrainConfig.checkpoint_every and eval_every must be >= 0 (0 disables)")


#: Projections that can carry a LoRA adapter: attention q, k, v, o and the SwiGLU gate, up, down.
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Adapters of rank `rank` (0 disables LoRA) with scale alpha / rank on the projections in `targets`; `dropout` is
    applied to the adapter's input during training steps (not to the frozen path, not in sampling or scoring)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"LoRAConfig.rank must be an int >= 0 (0 disables LoRA), got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRAConfig.targets must be distinct names from {LORA_TARGETS}, got {self.targets!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """A built-in verifiable task (`jaxpost.data.make_task`): "arithmetic" (direct answers) or "reasoning_arith"
    (answered directly or through a worked trace; `n_operands` operands, `trace_fraction` of the gold completions
    worked). `kwargs()` gives the task the fields its constructor takes."""

    name: str = "arithmetic"
    min_digits: int = 1
    max_digits: int = 2
    ops: tuple[str, ...] = ("+", "-")
    n_operands: int = 2
    trace_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.n_operands < 2:
            raise ValueError(f"TaskConfig.n_operands must be >= 2, got {self.n_operands}")
        if not 0.0 <= self.trace_fraction <= 1.0:
            raise ValueError(f"TaskConfig.trace_fraction must be in [0, 1], got {self.trace_fraction}")

    def kwargs(self) -> dict:
        """Every task parameter (`jaxpost.data.task_from_config` passes a task the ones it takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}


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


# ---- reinforcement learning ---------------------------------------------------------------------------------------

#: The value model of an RL policy: none, a scalar head on the policy's trunk, or a separate critic decoder.
VALUE_MODES = ("none", "head", "critic")
#: Where a KL penalty to the reference goes: the loss (per token) or the reward (before the advantages).
KL_PLACEMENTS = ("loss", "reward")
#: Where the old policy's log-probs (the PPO ratio's denominator) come from (`RolloutConfig.old_logp`).
OLD_LOGP_SOURCES = ("trainer", "sampler")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """What one RL iteration samples and how it is consumed.

    prompts_per_step x group_size rows per iteration. max_new_tokens, temperature, top_k, top_p: the sampler;
    `temperature` is also the update's: its log-probs are under softmax(logits / temperature), the sampling
    distribution the ratio compares against.
    dynamic_sampling: keep only groups with unequal rewards, drawing up to max_sampling_rounds prompt batches.
    overlong_buffer > 0: DAPO's soft overlong penalty over the last `overlong_buffer` tokens before max_new_tokens
    (times overlong_penalty_factor). ppo_epochs passes over the batch, each in `minibatches` optimizer steps.
    old_logp: where the old policy's log-probs (the PPO ratio's denominator) come from: "trainer" recomputes them in
    the scoring pass with the update step's own forward and log-prob core (ratio 1 at the first update up to float
    rounding); "sampler" takes the sampler's (the same quantity under the untruncated temperature-T softmax,
    computed by the decode loop: equal to ~1e-5 in float32, checked every iteration as `sampler_logp_diff` when the
    trainer's are computed) and skips the policy's forward in the scoring pass; verl's rollout log-probs.
    sampler_dtype: the sampler's compute dtype when it differs from the model's (e.g. "bfloat16" with a float32
    trainer, as inference engines run): the rollout-trainer mismatch that `RLLossConfig.rollout_correction` corrects.
    """

    prompts_per_step: int = 64
    group_size: int = 8
    max_new_tokens: int = 8
    max_prompt_len: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0
    ppo_epochs: int = 1
    minibatches: int = 1
    old_logp: str = "trainer"
    sampler_dtype: str | None = None

    def __post_init__(self):
        _positive(self, "prompts_per_step", "group_size", "max_new_tokens", "max_prompt_len", "max_sampling_rounds",
                  "ppo_epochs", "minibatches")
        if not self.temperature > 0:
            raise ValueError(f"RolloutConfig.temperature must be > 0 for RL (sampling), got {self.temperature}")
        if self.rows % self.minibatches:
            raise ValueError(f"RolloutConfig: {self.rows} rows do not split into minibatches={self.minibatches}")
        if self.sampler_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"RolloutConfig.sampler_dtype must be None, float32, bfloat16 or float16, got "
                             f"{self.sampler_dtype!r}")
        if self.old_logp not in OLD_LOGP_SOURCES:
            raise ValueError(f"RolloutConfig.old_logp must be one of {OLD_LOGP_SOURCES}, got {self.old_logp!r}")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"RolloutConfig.overlong_buffer must be in [0, max_new_tokens], got "
                             f"{self.overlong_buffer}")

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches

    @property
    def rows_per_update(self) -> int:
        return self.rows // self.minibatches


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLLossConfig:
    """The RL update's objective (the sampling temperature it is computed under is `RolloutConfig.temperature`).

    policy_loss: a `POLICY_LOSSES` name (ppo: PPO-clip, GRPO and DAPO; gspo, gspo_seq, luspo; rloo_seq; reinforce;
      cispo; sapo; vespo); its hyperparameters are read from this config by the registry: eps_low, eps_high (None:
      = eps_low), dual_clip, delta (ppo); cispo_clip_max, cispo_clip_min; sapo_tau_pos, sapo_tau_neg;
      vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg (docs/losses.md: each with TRL's and verl's name).
    aggregation: a `LOSS_AGGREGATIONS` name; max_length: the constant of seq_mean_token_sum_norm (0: the sampler's
      max_new_tokens). luspo requires seq_mean_token_sum.
    kl_coef, kl_estimator, kl_in: a KL penalty to the reference, in the loss (per token, aggregated with the policy
      loss) or in the reward (subtracted before the advantages); 0 disables it. kl_importance_weighted: in the loss,
      multiply it by the ratio pi / pi_old (TRL's use_bias_correction_kl, its default; DeepSeek-V3.2's unbiased KL).
    entropy_coef: entropy bonus. vf_coef, vf_clip: the value loss (value model only).
    rollout_correction, correction_clip_min, correction_clip_max: importance correction for the sampler / trainer
      mismatch (`jaxpost.losses.correction`: "none" or token|sequence _truncate|_mask; TRL's
      vllm_importance_sampling_mode and clip bounds); needs the trainer's old log-probs (RolloutConfig.old_logp
      "trainer") beside the sampler's.
    """

    policy_loss: str = "ppo"
    eps_low: float = 0.2
    eps_high: float | None = None
    dual_clip: float | None = None
    delta: float | None = None
    cispo_clip_max: float = 5.0
    cispo_clip_min: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    aggregation: str = "token_mean"
    max_length: int = 0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in: str = "loss"
    kl_importance_weighted: bool = False
    entropy_coef: float = 0.0
    vf_coef: float = 0.1
    vf_clip: float | None = 0.2
    rollout_correction: str = "none"
    correction_clip_min: float | None = None
    correction_clip_max: float | None = 3.0

    def __post_init__(self):
        POLICY_LOSSES.get(self.policy_loss)
        LOSS_AGGREGATIONS.get(self.aggregation)
        KL_ESTIMATORS.get(self.kl_estimator)
        required = REQUIRED_AGGREGATION.get(self.policy_loss)
        if required is not None and self.aggregation != required:
            raise ValueError(f"RLLossConfig: policy_loss={self.policy_loss!r} is defined with "
                             f"aggregation={required!r}, got {self.aggregation!r}")
        check_correction(self.rollout_correction, self.correction_clip_min, self.correction_clip_max)
        if self.kl_importance_weighted and self.kl_in != "loss":
            raise ValueError("RLLossConfig.kl_importance_weighted applies to a KL in the loss (kl_in='loss')")
        if self.kl_in not in KL_PLACEMENTS:
            raise ValueError(f"RLLossConfig.kl_in must be one of {KL_PLACEMENTS}, got {self.kl_in!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.vf_coef < 0:
            raise ValueError("RLLossConfig: kl_coef, entropy_coef and vf_coef must be >= 0")
        if self.max_length < 0:
            raise ValueError(f"RLLossConfig.max_length must be >= 0, got {self.max_length}")

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_coef > 0 and self.kl_in == "loss"

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_coef > 0 and self.kl_in == "reward"

    def policy_kwargs(self) -> dict:
        """The hyperparameters of `policy_loss`, as its registry entry names them."""
        return POLICY_LOSSES.kwargs(self.policy_loss, self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
    """estimator: an `ADVANTAGE_ESTIMATORS` name; the registry reads its hyperparameters from this config:
    grpo_scale, grpo_eps, grpo_ddof (grpo's std scaling "group" | "batch" | "none", the epsilon added to the std:
    1e-6 as verl, TRL uses 1e-4; the std's ddof: 1, both); normalize, adv_eps, adv_ddof (rloo and reinforce:
    standardise the advantages over the batch, TRL's normalize_advantages with eps 1e-4, ddof 1); gamma, lam
    (discount and GAE lambda: reinforce_pp, gae).
    whiten: whiten the advantages of an estimator with a value model (GAE) over the batch (verl; TRL < 1.0's PPO);
    reinforce_pp always whitens. whiten_eps, whiten_ddof: the whitening's (x - mean) * rsqrt(var + eps), var with
    ddof (verl's masked_whiten: 1e-8, ddof 1; OpenRLHF uses ddof 0).
    negative_scale: multiplies the negative advantages (1: the estimator as is; 0: only better-than-baseline samples
    are reinforced, a RAFT-like positive-only update; the weighting of Zhu et al. 2025, "The Surprising
    Effectiveness of Negative Reinforcement in LLM Reasoning", written on the negative side).
    teacher_coef, teacher_gamma: on-policy distillation as a dense per-token advantage (the run holds a teacher,
    `RLConfig.teacher_from`): teacher_coef * `jaxpost.losses.on_policy_distill_advantages(old_logp, teacher_logp,
    gamma=teacher_gamma)` is added to the estimator's advantages: the per-token reward log p_teacher(y_t) -
    log q_student(y_t) (Thinking Machines Lab 2025, "On-Policy Distillation"; Qwen3). 0: no teacher term. With the
    task rewards weighted 0 it is pure on-policy distillation; with both, the teacher shapes the task's RL."""

    estimator: str = "grpo"
    grpo_scale: str = "group"
    grpo_eps: float = 1e-6
    grpo_ddof: int = 1
    normalize: bool = False
    adv_eps: float = 1e-4
    adv_ddof: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    whiten_eps: float = 1e-8
    whiten_ddof: int = 1
    negative_scale: float = 1.0
    teacher_coef: float = 0.0
    teacher_gamma: float = 0.0

    def __post_init__(self):
        ADVANTAGE_ESTIMATORS.get(self.estimator)
        if not (self.teacher_coef >= 0 and 0 <= self.teacher_gamma <= 1):
            raise ValueError(f"AdvantageConfig: teacher_coef must be >= 0 and teacher_gamma in [0, 1], got "
                             f"{self.teacher_coef}, {self.teacher_gamma}")
        if self.grpo_scale not in ("group", "batch", "none"):
            raise ValueError(f"AdvantageConfig.grpo_scale must be group|batch|none, got {self.grpo_scale!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("AdvantageConfig: gamma and lam must be in [0, 1]")
        if self.negative_scale < 0:
            raise ValueError(f"AdvantageConfig.negative_scale must be >= 0, got {self.negative_scale}")
        if {self.grpo_ddof, self.adv_ddof, self.whiten_ddof} - {0, 1}:
            raise ValueError("AdvantageConfig: grpo_ddof, adv_ddof and whiten_ddof must be 0 or 1")
        if not (self.grpo_eps >= 0 and self.adv_eps >= 0 and self.whiten_eps >= 0):
            raise ValueError("AdvantageConfig: grpo_eps, adv_eps and whiten_eps must be >= 0")

    @property
    def sequence_level(self) -> bool:
        """One advantage per sequence from outcome rewards (grpo, dr_grpo, rloo), else per token."""
        return self.estimator in SEQUENCE_LEVEL_ESTIMATORS

    @property
    def needs_values(self) -> bool:
        """The estimator reads the value model's values (gae)."""
        return "values_BT" in _required_keywords(ADVANTAGE_ESTIMATORS.get(self.estimator))

    def kwargs(self) -> dict:
        """The estimator's hyperparameters, as its registry entry names them."""
        return ADVANTAGE_ESTIMATORS.kwargs(self.estimator, self)


def _required_keywords(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty}


def check_value_mode(value: str) -> None:
    if value not in VALUE_MODES:
        raise ValueError(f"value must be one of {VALUE_MODES}, got {value!r}")


def check_rl(*, value: str, advantage: AdvantageConfig, loss: RLLossConfig, reference: bool,
             teacher: bool = False) -> None:
    """The checks that span an RL run's configs: the value model mode, an estimator that needs values has a value
    model, a KL penalty has a reference, a teacher term has a teacher and a teacher has a term. `reference` /
    `teacher`: the run holds a reference policy / a teacher."""
    check_value_mode(value)
    if (advantage.teacher_coef > 0) != teacher:
        raise ValueError("advantage.teacher_coef > 0 (on-policy distillation's per-token advantage) and a teacher "
                         "(RLConfig.teacher_from) go together: set both or neither")
    if advantage.needs_values and value == "none":
        raise ValueError(f"the {advantage.estimator} estimator needs a value model: set value='head' or 'critic'")
    if loss.kl_coef > 0 and not reference:
        raise ValueError("a KL penalty (loss.kl_coef > 0) needs reference=True (a reference policy; for a LoRA "
                         "policy, its base model)")
