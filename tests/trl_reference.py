"""TRL 1.16 reference numbers for jaxpost's loss tests, computed by TRL's own code.

This is a small library, not a test module (pytest does not collect it: no ``test_`` name, no test functions). Each
``trl_*`` function takes numpy inputs and runs the *actual* TRL method that computes the loss, e.g.
``GRPOTrainer._compute_loss(fake_self, fake_model, inputs)``, then back-propagates with torch and returns the loss and
its gradient with respect to the policy's per-token (or per-sequence) log-probs, as float64 numpy arrays.

How
---
A TRL trainer cannot be built without a model, tokenizer, dataset and accelerate state, but its loss methods only read a
handful of attributes. So each function builds:

* a *fake self*: a ``_Strict`` object holding exactly the attributes the TRL method reads (copied from what the
  trainer's ``__init__`` would set from its config), with the other TRL methods it calls bound from the real class
  (``GRPOTrainer.get_off_policy_mask``, ``DPOTrainer.compute_ref_log_probs``, ``ORPOTrainer.concatenated_forward`` ...).
  Reading any attribute that was not provided raises an ``AttributeError`` naming it, so a TRL code path this file does
  not support fails loudly instead of silently using a default;
* a fake ``accelerator`` (single process on CPU: ``gather``/``gather_for_metrics``/``reduce`` are the identity, as
  accelerate's are when not distributed; ``num_processes=1``, ``unwrap_model`` identity, ``autocast`` a no-op);
* ``_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}`` as TRL sets it; the logged values are
  returned as ``metrics``;
* a fake model / forward helper that returns the given log-probs as a leaf tensor with ``requires_grad``. For GRPO and
  RLOO it replaces ``_get_per_token_logps_and_entropies`` (returns ``(per_token_logps, zero entropies, None)``); for
  DPO it is a callable that honours the contract of TRL's fused LM head (``model(..., labels=labels,
  fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` whose per-token fields are zero where the shifted label is
  ``-100``); for ORPO it returns given logits.

Inputs are laid out as TRL's own collators/generation code lay them out (GRPO/RLOO: left-padded prompt of one token and
right-padded completion; DPO: ``DataCollatorForPreference``'s ``[chosen rows; rejected rows]`` with one prompt token;
ORPO: ``DPODataCollatorWithPadding``'s right-padded ``chosen_*``/``rejected_*`` ids, masks and labels).

Three blocks of TRL are inline in the very long ``_generate_and_score_completions`` methods and cannot be called on
their own: the vLLM importance-sampling ratio, the GRPO advantages and the RLOO advantages. Only those are reproduced
here, line by line, with ``self.`` kept as in TRL and a comment citing the file and lines.

Everything runs in float64 (TRL itself usually runs float32/bf16), except where TRL forces a dtype (see the quirks).

TRL 1.16 quirks worth knowing when comparing
--------------------------------------------
GRPO (``trl/trainer/grpo_trainer.py``, ``_compute_loss``):
* normalisation: ``grpo``/``sapo`` = mean over sequences of per-sequence token means; ``bnpo`` = token mean over the
  micro-batch; ``dr_grpo`` = token sum / (B * max_completion_length); ``dapo``/``cispo``/``vespo`` = token sum /
  ``num_items_in_batch`` (the *generation batch* token count, divided by num_processes and multiplied by
  grad_accum/steps_per_generation); ``luspo`` = mean over sequences of per-sequence token *sums*.
* ``epsilon_high`` defaults to ``epsilon``; for ``cispo`` it is the *absolute* clamp ε_max on the ratio (so the default
  0.2 clamps ratios at 0.2 — TRL recommends 5.0).
* ``delta`` (two-sided clip) clamps only ``coef_1``; the clamp happens after ``coef_2`` was built.
* KL term: k3 estimator ``exp(ref-logp) - (ref-logp) - 1``, multiplied by the (token or sequence) ratio ``coef_1``
  when ``use_bias_correction_kl`` (default True); it is added after the vLLM IS correction, so it is not IS-weighted.
* vLLM IS ratio uses ``old_per_token_logps`` (trainer) minus ``sampling_per_token_logps`` (vLLM), masked, ``nan``→0;
  ``sequence_*`` modes sum (not average) the diff over tokens. ``*_mask`` modes zero ratios outside
  ``[clip_min, clip_max]`` (``clip_min=None`` → -inf), ``*_truncate`` modes clamp. The ratio multiplies the per-token
  loss for every loss type except ``vespo``, where it enters the gamma weights instead (then only ``token_*`` modes are
  allowed).
* the off-policy mask (OPSM) uses the *sampling* log-probs when vLLM is on, else ``old_per_token_logps``.
* ``policy_loss`` is only logged when the entropy bonus is on; ``clip_ratio/low_min``/``high_max`` are per-sequence
  means without clamping the denominator (NaN for an all-masked row, then ignored by ``nanmin``/``nanmax``).
* the advantages are ``(B,)`` and unsqueezed to ``(B, 1)``; ``old_per_token_logps=None`` means "use
  ``per_token_logps.detach()``" (ratio 1 with gradient ``A``).
* ``nanstd`` uses Bessel's correction (unbiased); ``1e-4`` is added to the std; rows whose every reward is NaN get
  advantage 0 and are excluded from the group statistics.

RLOO (``trl/trainer/rloo_trainer.py``): the ratio is *per sequence*: ``exp(sum(logp*mask) - old_logps)``, PPO-clipped
per sequence, and the loss is a plain mean over sequences (no token normalisation). The KL penalty is not in the loss:
``beta * sum_t (old_logp - ref_logp)`` (first-order estimator, can be negative) is subtracted from the rewards before
the leave-one-out baseline. Advantages are not std-normalised unless ``normalize_advantages`` (then batch-whitened with
``nanstd + 1e-4``).

DPO (``trl/trainer/dpo_trainer.py``, ``_compute_loss``):
* sequence log-probs are ``log_probs.sum(1)`` with no explicit mask: TRL relies on the fused LM head returning 0 where
  the (shifted) label is -100. ``completion_mask[..., 1:]`` is the mask for the ``(2B, L-1)`` log-prob rows; with the
  single prompt token used here that is exactly the caller's ``[chosen_mask; rejected_mask]``.
* ``ipo`` and ``sigmoid_norm`` divide each score by the completion length taken from the *unshifted*
  ``completion_mask`` (same count), ``clamp(min=1)``; ``sft`` is a token mean over the chosen rows of the whole batch.
* ``robust`` divides by ``1 - 2*label_smoothing``; ``exo_pair`` needs ``label_smoothing > 0``; ``aot``/``aot_unpaired``
  sort across the batch; ``discopop`` reads ``args.discopop_tau``.
* ``f_divergence_type="alpha_divergence"`` looks the clamp up in ``{float16, bfloat16, float32}``: float64 raises
  ``KeyError``, so this file runs that case in float32 (tolerance ~1e-6 relative).
* ``use_weighting`` (WPO) weights every pair by ``exp(mean_t(logp - log_sum_sq_probs))`` of chosen times rejected, with
  no gradient through the weight.
* ``ld_alpha``: tokens beyond the shorter completion of the pair are scaled by ``ld_alpha`` in both the policy and the
  reference sums (``compute_ref_log_probs`` applies the same weighting to the reference).
* In real TRL precomputed reference log-probs travel through a ``datasets`` column and come back float32.
* Metrics ``rewards/*`` are ``beta * logratio`` regardless of ``f_divergence_type``.

CPO (``trl/experimental/cpo/cpo_trainer.py``): ``cpo_loss`` takes per-sequence log-probs; TRL passes the token *mean*
of the completion log-probs for ``loss_type in ("ipo", "simpo")`` (``average_log_prob=...``; ``"alphapo"`` is turned
into ``"simpo"`` by ``CPOConfig``) and the token *sum* otherwise; ``alpha != 0`` (AlphaPO reward shaping) does not
change that. The trainer's total loss is ``losses.mean() + cpo_alpha * nll`` with ``cpo_alpha=1.0`` by default
(``0`` for ``"alphapo"``), the NLL being a token mean over the chosen *completion* tokens of the batch.

ORPO (``trl/experimental/orpo/orpo_trainer.py``): ``odds_ratio_loss`` takes per-sequence *mean* completion log-probs
and casts them to float32; it returns ``beta * logsigmoid(log_odds)`` (a reward, so the total loss is
``nll - losses.mean()``). The NLL (``concatenated_forward``/``cross_entropy_loss``) is ``nn.CrossEntropyLoss`` with
mean reduction over the chosen rows' labels = ``input_ids`` where ``attention_mask == 1`` — prompt tokens included —
after the shift (the first token of each row is never predicted), i.e. one token mean over the whole chosen batch, not
a mean of per-sequence means. ``trl_orpo_nll`` runs TRL's ``get_batch_loss_metrics`` on given logits to get it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "trl_cpo_loss",
    "trl_dpo_loss",
    "trl_grpo_advantages",
    "trl_grpo_loss",
    "trl_grpo_vllm_importance_sampling_ratio",
    "trl_orpo_loss",
    "trl_orpo_nll",
    "trl_rloo_advantages",
    "trl_rloo_loss",
]

_DTYPE = torch.float64
_PROMPT_TOKEN, _COMPLETION_TOKEN, _PAD_TOKEN = 1, 2, 0


# ----------------------------------------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------------------------------------


class _Strict:
    """Attribute bag that names the missing attribute when TRL reads one it was not given."""

    def __init__(self, _name: str, **attrs):
        object.__setattr__(self, "_name", _name)
        self.__dict__.update(attrs)

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        raise AttributeError(
            f"trl_reference: TRL read `{self._name}.{item}`, which this fake does not provide: that TRL code path "
            "is not supported by tests/trl_reference.py"
        )


class _FakeAccelerator(_Strict):
    """Single-process accelerate on CPU: the collectives are the identity, as accelerate's are when not distributed."""

    def __init__(self):
        super().__init__(
            "accelerator",
            device=torch.device("cpu"),
            num_processes=1,
            process_index=0,
            is_main_process=True,
            sync_gradients=True,
        )

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, input_data, use_gather_object=False):
        return input_data

    def reduce(self, tensor, reduction="sum", scale=1.0):
        return tensor

    def unwrap_model(self, model, keep_fp32_wrapper=True, keep_torch_compile=True):
        return model

    def autocast(self, autocast_handler=None):
        return contextlib.nullcontext()


def _fake_model(name="model"):
    """Stands for `self.model`: TRL reads `.training` (train/eval mode) and `.is_gradient_checkpointing`."""
    return _Strict(name, training=True, is_gradient_checkpointing=False)


def _fake_self(trainer_cls, name: str, methods: Sequence[str] = (), **attrs) -> _Strict:
    """A fake trainer `self` with `attrs` and the named TRL methods bound from `trainer_cls` (staticmethods unbound)."""
    fake = _Strict(
        name,
        accelerator=_FakeAccelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        **attrs,
    )
    for method in methods:
        raw = inspect.getattr_static(trainer_cls, method)
        if isinstance(raw, staticmethod):
            setattr(fake, method, raw.__func__)
        else:
            setattr(fake, method, types.MethodType(raw, fake))
    return fake


def _metrics_of(fake) -> dict:
    """The train metrics TRL appended, one value per key (each is appended once per call here)."""
    out = {}
    for key, values in fake._metrics["train"].items():
        out[key] = values[-1] if len(values) == 1 else list(values)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Array helpers
# ----------------------------------------------------------------------------------------------------------------------


def _t(x, dtype=_DTYPE, requires_grad=False):
    t = torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _mask(m):
    m = np.asarray(m)
    if not np.isin(m, (0, 1)).all():
        raise ValueError("trl_reference: masks must be 0/1")
    return torch.tensor(m.astype(np.int64))  # TRL's masks are long tensors


def _grad(t: torch.Tensor) -> np.ndarray:
    if t.grad is None:  # the loss does not depend on it (e.g. everything masked)
        return np.zeros(tuple(t.shape), dtype=np.float64)
    return t.grad.detach().to(torch.float64).numpy().copy()


def _check_2d(name, x, shape=None):
    x = np.asarray(x)
    if x.ndim != 2 or (shape is not None and x.shape != shape):
        raise ValueError(f"trl_reference: `{name}` must have shape {shape or '(B, T)'}, got {x.shape}")
    return x


def _check_1d(name, x, n):
    x = np.asarray(x)
    if x.shape != (n,):
        raise ValueError(f"trl_reference: `{name}` must have shape ({n},), got {x.shape}")
    return x


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"trl_reference: unsupported {name}={value!r}; supported: {sorted(choices)}")


def _rl_inputs(completion_mask: torch.Tensor) -> dict:
    """prompt/completion ids and masks as GRPO/RLOO's `_generate_and_score_completions` returns them (one prompt
    token, left-padded prompt, right-padded completion)."""
    B = completion_mask.size(0)
    completion_ids = torch.where(completion_mask.bool(), _COMPLETION_TOKEN, _PAD_TOKEN).long()
    return {
        "prompt_ids": torch.full((B, 1), _PROMPT_TOKEN, dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def _logps_forward(per_token_logps: torch.Tensor):
    """Replacement for `_get_per_token_logps_and_entropies`: returns the given log-probs, zero entropies, no aux loss."""

    def forward(model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                compute_aux_loss=False, **multimodal):
        if logits_to_keep != per_token_logps.size(1) or input_ids.size(0) != per_token_logps.size(0):
            raise AssertionError("trl_reference: unexpected shapes requested from the forward helper")
        if compute_aux_loss:
            raise ValueError("trl_reference: MoE aux loss is not supported")
        if any(v is not None for v in multimodal.values()):
            raise ValueError("trl_reference: multimodal inputs are not supported")
        entropies = torch.zeros_like(per_token_logps.detach()) if compute_entropy else None
        return per_token_logps, entropies, None

    return forward


# ----------------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------------

_GRPO_LOSS_TYPES = {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
_VLLM_IS_MODES = {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask"}


def _grpo_vllm_is_ratio(self, old_per_token_logps, sampling_per_token_logps, completion_mask, tool_mask=None):
    # ---- Reproduced verbatim from trl/trainer/grpo_trainer.py (TRL 1.16.0), GRPOTrainer._generate_and_score_completions,
    # ---- lines 2660-2707 ("Compute the importance sampling ratio when using vLLM"), `self` being the fake trainer.
    # ---- Inline in that method, so it cannot be called on its own.
    if self.use_vllm and self.vllm_importance_sampling_correction:
        mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
        # Tokens whose sampling logprob was NaN (unavailable from vLLM) get a zero difference, so their
        # importance ratio is exactly 1 (no correction) rather than propagating NaN through the loss.
        per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)

        sequence_level_is = self.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]
        if sequence_level_is:
            per_sequence_logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
            logps_diff = per_sequence_logps_diff
        else:
            logps_diff = per_token_logps_diff

        vllm_importance_sampling_ratio = torch.exp(logps_diff)

        # vllm_importance_sampling_ratio.shape:
        #   token_* modes:     (B, T)  (per-token ratio)
        #   sequence_* modes:  (B, 1)  (per-sequence ratio)

        if self.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
            vllm_importance_sampling_ratio = torch.clamp(
                vllm_importance_sampling_ratio,
                min=self.vllm_importance_sampling_clip_min,
                max=self.vllm_importance_sampling_clip_max,
            )
        elif self.vllm_importance_sampling_mode in ["sequence_mask", "token_mask"]:
            min_val = (
                self.vllm_importance_sampling_clip_min
                if self.vllm_importance_sampling_clip_min is not None
                else -math.inf
            )
            max_val = (
                self.vllm_importance_sampling_clip_max
                if self.vllm_importance_sampling_clip_max is not None
                else math.inf
            )

            invalid_mis_mask = (vllm_importance_sampling_ratio < min_val) | (
                vllm_importance_sampling_ratio > max_val
            )
            vllm_importance_sampling_ratio = vllm_importance_sampling_ratio.masked_fill(
                invalid_mis_mask, value=0.0
            )
        else:
            raise ValueError(
                f"Unknown vLLM importance sampling level: {self.vllm_importance_sampling_mode}. Possible values are 'token_truncate', 'token_mask', 'sequence_truncate', and 'sequence_mask'."
            )
    # ---- end of the reproduced block
    return vllm_importance_sampling_ratio


def trl_grpo_vllm_importance_sampling_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask, *,
                                            vllm_importance_sampling_mode="sequence_mask",
                                            vllm_importance_sampling_clip_min=None,
                                            vllm_importance_sampling_clip_max=3.0) -> np.ndarray:
    """TRL's vLLM importance-sampling ratio: (B, T) for `token_*` modes, (B, 1) for `sequence_*` modes."""
    _check_choice("vllm_importance_sampling_mode", vllm_importance_sampling_mode, _VLLM_IS_MODES)
    fake = _Strict("self", use_vllm=True, vllm_importance_sampling_correction=True,
                   vllm_importance_sampling_mode=vllm_importance_sampling_mode,
                   vllm_importance_sampling_clip_min=vllm_importance_sampling_clip_min,
                   vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max)
    ratio = _grpo_vllm_is_ratio(fake, _t(old_per_token_logps), _t(sampling_per_token_logps), _mask(completion_mask))
    return ratio.numpy().copy()


def trl_grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, loss_type="dapo", beta=0.0,
                  ref_per_token_logps=None, epsilon=0.2, epsilon_high=None, delta=None,
                  importance_sampling_level="token", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                  vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                  use_bias_correction_kl=True, sampling_per_token_logps=None,
                  vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=None,
                  vllm_importance_sampling_clip_max=3.0, off_policy_mask_threshold=None, max_completion_length=None,
                  num_items_in_batch=None) -> dict:
    """Runs `GRPOTrainer._compute_loss` (TRL 1.16) on the given per-token log-probs.

    Args mirror `GRPOConfig` (`epsilon_high=None` → `epsilon`, as `GRPOTrainer.__init__` does). Shapes:
    `per_token_logps`, `old_per_token_logps` (or None: TRL then uses `per_token_logps.detach()`),
    `ref_per_token_logps` (required when `beta != 0`), `sampling_per_token_logps` (vLLM's, turns on `use_vllm` and
    `vllm_importance_sampling_correction`) and `completion_mask` are (B, T); `advantages` is (B,) (or (B, T), which
    TRL also accepts). `max_completion_length` (only read by `dr_grpo`) defaults to T. `num_items_in_batch` (only
    read by `dapo`/`cispo`/`vespo`) defaults to `completion_mask.sum()`, as TRL computes it for a single process with
    one micro-batch per generation batch. Mode train, one process, `current_gradient_accumulation_steps=1`,
    `steps_per_generation=1`, no entropy bonus, `top_entropy_quantile=1.0`, no MoE aux loss, no tool mask.

    Returns dict(loss=float, grad=(B, T) d loss / d per_token_logps, metrics=TRL's logged train metrics,
    importance_sampling_ratio=the vLLM IS ratio or None).
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    _check_choice("loss_type", loss_type, _GRPO_LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level, {"token", "sequence"})
    per_token_logps = _check_2d("per_token_logps", per_token_logps)
    B, T = per_token_logps.shape
    _check_2d("completion_mask", completion_mask, (B, T))
    advantages = np.asarray(advantages)
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"trl_reference: `advantages` must be (B,) or (B, T), got {advantages.shape}")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("trl_reference: `ref_per_token_logps` is required when beta != 0")
    use_vllm = sampling_per_token_logps is not None
    if use_vllm:
        _check_choice("vllm_importance_sampling_mode", vllm_importance_sampling_mode, _VLLM_IS_MODES)
        # Same check as GRPOTrainer.__init__
        if loss_type == "vespo" and vllm_importance_sampling_mode not in ["token_truncate", "token_mask"]:
            raise ValueError(
                f"VESPO loss requires `vllm_importance_sampling_mode` to be either 'token_truncate' or "
                f"'token_mask'. Got: {vllm_importance_sampling_mode}."
            )

    args = _Strict(
        "args",
        use_bias_correction_kl=use_bias_correction_kl,
        delta=delta,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        steps_per_generation=1,
    )
    fake = _fake_self(
        GRPOTrainer,
        "GRPOTrainer",
        methods=("get_off_policy_mask", "get_gamma_weights", "get_high_entropy_mask"),
        args=args,
        model=_fake_model(),
        # GRPOTrainer.__init__ assignments
        loss_type=loss_type,
        beta=beta,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high if epsilon_high is not None else epsilon,
        importance_sampling_level=importance_sampling_level,
        off_policy_mask_threshold=off_policy_mask_threshold,
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm,
        vllm_importance_sampling_mode=vllm_importance_sampling_mode,
        vllm_importance_sampling_clip_min=vllm_importance_sampling_clip_min,
        vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max,
        max_completion_length=T if max_completion_length is None else max_completion_length,
        # Trainer state
        current_gradient_accumulation_steps=1,
    )

    logps = _t(per_token_logps, requires_grad=True)
    fake._get_per_token_logps_and_entropies = _logps_forward(logps)
    mask = _mask(completion_mask)
    inputs = _rl_inputs(mask)
    inputs["advantages"] = _t(advantages)
    if old_per_token_logps is not None:
        inputs["old_per_token_logps"] = _t(_check_2d("old_per_token_logps", old_per_token_logps, (B, T)))
    if beta != 0.0:
        inputs["ref_per_token_logps"] = _t(_check_2d("ref_per_token_logps", ref_per_token_logps, (B, T)))
    # `num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()` (long tensor) in TRL
    inputs["num_items_in_batch"] = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    is_ratio = None
    if use_vllm:
        sampling = _t(_check_2d("sampling_per_token_logps", sampling_per_token_logps, (B, T)))
        # With vLLM, TRL always computes old_per_token_logps (the trainer's log-probs before the update)
        old = inputs["old_per_token_logps"] if old_per_token_logps is not None else logps.detach().clone()
        is_ratio = _grpo_vllm_is_ratio(fake, old, sampling, mask)
        inputs["importance_sampling_ratio"] = is_ratio
        inputs["sampling_per_token_logps"] = sampling

    loss = GRPOTrainer._compute_loss(fake, fake.model, inputs)
    loss.backward()
    return {
        "loss": loss.item(),
        "grad": _grad(logps),
        "metrics": _metrics_of(fake),
        "importance_sampling_ratio": None if is_ratio is None else is_ratio.numpy().copy(),
    }


def _rewards_per_func(rewards, num_generations: int, dtype: str):
    """(torch dtype, rewards [B, K] as TRL's rewards_per_func, B, K), whole groups of num_generations checked."""
    tdtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    rewards_per_func = torch.tensor(np.asarray(rewards, dtype=np.float64), dtype=tdtype)
    if rewards_per_func.dim() == 1:
        rewards_per_func = rewards_per_func.unsqueeze(1)
    B, K = rewards_per_func.shape
    if B % num_generations:
        raise ValueError("trl_reference: the batch must hold whole groups of num_generations")
    return tdtype, rewards_per_func, B, K


def trl_grpo_advantages(rewards_per_func, num_generations, *, reward_weights=None, scale_rewards="group",
                        multi_objective_aggregation="sum_then_normalize", dtype="float64") -> dict:
    """GRPO advantages as `GRPOTrainer._generate_and_score_completions` computes them (train mode, one process).

    `rewards_per_func` is (B, K) (NaN = the reward function returned None), rows grouped by prompt in consecutive
    blocks of `num_generations`. `scale_rewards` accepts True/False like `GRPOConfig` ("group"/"none").
    `dtype="float32"` reproduces TRL's precision (its rewards tensor is float32). Returns dict(advantages (B,),
    rewards (B,) aggregated reward before normalisation, std_rewards (B,), frac_reward_zero_std).
    """
    from trl.trainer.utils import nanstd

    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # GRPOConfig.__post_init__
    _check_choice("scale_rewards", scale_rewards, {"group", "batch", "none"})
    _check_choice("multi_objective_aggregation", multi_objective_aggregation,
                  {"sum_then_normalize", "normalize_then_sum"})
    tdtype, rewards_per_func, B, K = _rewards_per_func(rewards_per_func, num_generations, dtype)
    self = _Strict(
        "GRPOTrainer",
        reward_funcs=[None] * K,
        reward_weights=torch.tensor(list(reward_weights) if reward_weights is not None else [1.0] * K, dtype=tdtype),
        scale_rewards=scale_rewards,
        multi_objective_aggregation=multi_objective_aggregation,
    )
    if len(self.reward_weights) != K:
        raise ValueError("trl_reference: reward_weights must have one weight per reward function")
    device = "cpu"

    # ---- Reproduced verbatim from trl/trainer/grpo_trainer.py (TRL 1.16.0), GRPOTrainer._generate_and_score_completions,
    # ---- lines 2759-2810 (unscorable mask, aggregation, group/batch scaling, nan_to_num), mode "train".
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)

    if self.multi_objective_aggregation == "sum_then_normalize":
        # Apply weights to each reward function's output and sum
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if self.scale_rewards in ["group", "none"]:
            # If self.scale_rewards = "none", we'll only use std_rewards to check for zero std for logging
            if num_generations > 1:
                std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:  # doesn't occur during training, but could occur in eval when num_generations_eval=1
                std_rewards = torch.zeros_like(rewards)
        elif self.scale_rewards == "batch":
            # Compute global std
            if rewards.numel() > 1:
                std_rewards = nanstd(rewards).expand_as(rewards)
            else:  # doesn't occur during training, but could occur in eval when num_generations_eval=batch_size=1
                std_rewards = torch.zeros_like(rewards)
        else:
            raise ValueError(
                f"Invalid value for scale_rewards: {self.scale_rewards}. Must be one of 'batch', 'group', or 'none'."
            )

        advantages = rewards - mean_grouped_rewards
        if self.scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging

    elif self.multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, len(self.reward_funcs))
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, len(self.reward_funcs))
        rewards = (reward_k * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
        is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))  # for logging

    else:
        raise ValueError(
            f"Invalid multi_objective_aggregation: {self.multi_objective_aggregation}. Must be "
            "'sum_then_normalize' or 'normalize_then_sum'."
        )

    # Unscorable completions (every reward func returned None) carry no learning signal: their reward is NaN here,
    # so zero their advantage to keep them from moving the policy.
    advantages = torch.nan_to_num(advantages, nan=0.0)
    # ---- end of the reproduced block

    return {
        "advantages": advantages.to(torch.float64).numpy().copy(),
        "rewards": rewards.to(torch.float64).numpy().copy(),
        "std_rewards": std_rewards.to(torch.float64).numpy().copy(),
        "frac_reward_zero_std": is_std_zero.float().mean().item(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# RLOO
# ----------------------------------------------------------------------------------------------------------------------


def trl_rloo_loss(per_token_logps, old_logps_seq, advantages, completion_mask, *, epsilon=0.2,
                  epsilon_high=None) -> dict:
    """Runs `RLOOTrainer._compute_loss` (TRL 1.16): a per-sequence PPO clip on `exp(sum_t logp*mask - old_logps)`.

    `per_token_logps`, `completion_mask`: (B, T); `old_logps_seq`, `advantages`: (B,) (TRL's `old_logps` is
    `(old_per_token_logps * completion_mask).sum(1)`). Returns dict(loss, grad (B, T), metrics).
    """
    from trl.trainer.rloo_trainer import RLOOTrainer

    per_token_logps = _check_2d("per_token_logps", per_token_logps)
    B, T = per_token_logps.shape
    _check_2d("completion_mask", completion_mask, (B, T))
    fake = _fake_self(
        RLOOTrainer,
        "RLOOTrainer",
        model=_fake_model(),
        epsilon_low=epsilon,
        epsilon_high=epsilon_high if epsilon_high is not None else epsilon,
        aux_loss_enabled=False,
    )
    logps = _t(per_token_logps, requires_grad=True)
    fake._get_per_token_logps_and_entropies = _logps_forward(logps)
    inputs = _rl_inputs(_mask(completion_mask))
    inputs["old_logps"] = _t(_check_1d("old_logps_seq", old_logps_seq, B))
    inputs["advantages"] = _t(_check_1d("advantages", advantages, B))
    loss = RLOOTrainer._compute_loss(fake, fake.model, inputs)
    loss.backward()
    return {"loss": loss.item(), "grad": _grad(logps), "metrics": _metrics_of(fake)}


def trl_rloo_advantages(rewards, num_generations, *, normalize_advantages=False, reward_weights=None,
                        reward_clip_range=None, beta=0.0, old_per_token_logps=None, ref_per_token_logps=None,
                        completion_mask=None, dtype="float64") -> np.ndarray:
    """RLOO advantages as `RLOOTrainer._generate_and_score_completions` computes them (train mode, one process).

    `rewards`: (B,) already-aggregated rewards, or (B, K) per-function rewards combined with `reward_weights` as TRL
    does (NaN = reward function returned None). Groups are consecutive blocks of `num_generations`. With `beta != 0`,
    pass `old_per_token_logps`, `ref_per_token_logps` and `completion_mask` (B, T): TRL subtracts
    `beta * sum_t (old - ref) * mask` from the rewards. Returns the advantages (B,).
    """
    from trl.trainer.utils import nanstd

    tdtype, rewards_per_func, B, K = _rewards_per_func(rewards, num_generations, dtype)
    self = _Strict(
        "RLOOTrainer",
        reward_weights=torch.tensor(list(reward_weights) if reward_weights is not None else [1.0] * K, dtype=tdtype),
        reward_clip_range=reward_clip_range,
        beta=beta,
        normalize_advantages=normalize_advantages,
    )
    if beta != 0.0:
        if old_per_token_logps is None or ref_per_token_logps is None or completion_mask is None:
            raise ValueError("trl_reference: beta != 0 needs old_per_token_logps, ref_per_token_logps, completion_mask")
        old_per_token_logps = torch.tensor(np.asarray(old_per_token_logps, np.float64), dtype=tdtype)
        ref_per_token_logps = torch.tensor(np.asarray(ref_per_token_logps, np.float64), dtype=tdtype)
        completion_mask = _mask(completion_mask)
    device = "cpu"

    def gather(x):  # accelerate.utils.gather, single process
        return x

    # ---- Reproduced verbatim from trl/trainer/rloo_trainer.py (TRL 1.16.0), RLOOTrainer._generate_and_score_completions,
    # ---- lines 1653-1699 (unscorable mask, weighting, clipping, KL-in-reward, leave-one-out baseline, normalisation),
    # ---- mode "train".
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)

    # Apply weights to each reward function's output and sum
    rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan

    # Apply reward clipping if specified
    if self.reward_clip_range:
        rewards = rewards.clamp(min=self.reward_clip_range[0], max=self.reward_clip_range[1])

    # Include the KL penalty in the reward
    if self.beta != 0.0:
        # RLOO uses the first-order log ratio for the per-token KL estimate, following the original RLOO paper
        # (Ahmadian et al., 2024, https://huggingface.co/papers/2405.14782). Unlike GRPOTrainer's Schulman
        # approximation (always >= 0), this can be negative per token. The divergence is intentional: RLOO applies
        # KL as a reward penalty (summed across tokens per sequence), while GRPO adds it to the per-token loss.
        per_token_kl = old_per_token_logps - ref_per_token_logps
        # Apply sequence-level KL penalty to rewards (sum KL across tokens first, then apply to each sequence)
        kl = (per_token_kl * completion_mask).sum(-1)
        kl = gather(kl)  # rewards are gathered, so kl must be too
        rewards = rewards - self.beta * kl

    grouped_rewards = rewards.view(-1, num_generations)
    mean_grouped_rewards = torch.nanmean(grouped_rewards, dim=1)  # logging only in TRL
    if num_generations > 1:
        std_rewards = nanstd(grouped_rewards, dim=1)
    else:  # doesn't occur during training, but could occur in eval when num_generations_eval=1
        std_rewards = torch.zeros_like(mean_grouped_rewards)  # noqa: F841 (logging only in TRL)

    # RLOO advantages computation. The leave-one-out baseline averages over scorable siblings only: nansum drops
    # unscorable rewards and the divisor is (scorable count − 1). A group with a single scorable completion yields
    # 0/0 = NaN, and unscorable rows stay NaN; both are zeroed by nan_to_num below.
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)  # (num_prompts, 1)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)  # (num_prompts, 1)
    if num_generations > 1:
        baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)  # (num_prompts, num_generations)
        baselines = baselines.view(-1)  # Flatten back to match rewards shape
        advantages = rewards - baselines
    else:  # this case doesn't occur during training, but could in eval when num_generations_eval=1
        advantages = torch.zeros_like(rewards)

    # Normalize advantages over the scorable subset only (unscorable advantages are still NaN here).
    if self.normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)

    # Unscorable completions carry no learning signal: zero their advantage to keep them from moving the policy.
    advantages = torch.nan_to_num(advantages, nan=0.0)
    # ---- end of the reproduced block

    return advantages.to(torch.float64).numpy().copy()


# ----------------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------------

_DPO_LOSS_TYPES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
_F_DIVERGENCES = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}


class _FakeFusedLM:
    """A causal LM patched with TRL's `add_fused_lm_head`, reduced to its output contract: called with
    `labels=...` and `fused_lm_head=True`, it returns a `FusedCausalLMOutput` whose per-token fields have shape
    (batch, seq_len - 1) and are zero where the shifted label is -100 (see trl/trainer/utils.py `_fused_forward`)."""

    def __init__(self, log_probs, log_sum_sq_probs=None, name="model"):
        self.log_probs = log_probs  # (2B, L - 1), position j scores token j + 1
        self.log_sum_sq_probs = log_sum_sq_probs
        self.training = True
        self.is_gradient_checkpointing = False
        self._name = name

    def __call__(self, input_ids=None, attention_mask=None, use_cache=None, labels=None, fused_lm_head=False,
                 **kwargs):
        from trl.trainer.utils import FusedCausalLMOutput

        if not fused_lm_head or labels is None:
            raise AssertionError("trl_reference: DPO is expected to call the fused LM head with labels")
        if kwargs:
            raise ValueError(f"trl_reference: unsupported model kwargs {sorted(kwargs)} (MoE / multimodal)")
        mask = labels[:, 1:] != -100
        if tuple(mask.shape) != tuple(self.log_probs.shape):
            raise AssertionError("trl_reference: label/log-prob shape mismatch")
        zeros = torch.zeros(mask.shape, dtype=self.log_probs.dtype)
        return FusedCausalLMOutput(
            loss=None,
            log_probs=self.log_probs.masked_fill(~mask, 0.0),
            entropy=zeros,
            log_sum_sq_probs=None if self.log_sum_sq_probs is None else self.log_sum_sq_probs.masked_fill(~mask, 0.0),
            mean_logits=zeros,
            is_top1=torch.zeros(mask.shape, dtype=torch.bool),
            label_mask=mask,
            aux_loss=None,
        )


def _pad_cols(x: np.ndarray, T: int) -> np.ndarray:
    return np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, T - x.shape[1])))


def trl_dpo_loss(chosen_per_token_logps, rejected_per_token_logps, ref_chosen_per_token_logps,
                 ref_rejected_per_token_logps, chosen_mask, rejected_mask, *, loss_type=("sigmoid",),
                 loss_weights=None, beta=0.1, label_smoothing=0.0, ld_alpha=None, f_divergence_type="reverse_kl",
                 f_alpha_divergence_coef=0.5, use_weighting=False, chosen_log_sum_sq_probs=None,
                 rejected_log_sum_sq_probs=None, discopop_tau=0.05) -> dict:
    """Runs `DPOTrainer._compute_loss(fake_self, fake_model, inputs, return_outputs=False)` (TRL 1.16).

    Per-token arrays are (B, Tc) for chosen and (B, Tr) for rejected (entry t = log-prob of completion token t),
    masks 0/1 of the same shapes (right-padded like TRL's collator). The batch is laid out as
    `DataCollatorForPreference` builds it: one prompt token, rows `[chosen; rejected]`, `completion_mask` 0 on the
    prompt, so `completion_mask[..., 1:]` is the caller's masks. The reference sequence log-probs are precomputed by
    TRL's `compute_ref_log_probs` on a fake reference model (`precompute_ref_log_probs=True`), so `ld_alpha` applies to
    them too. `use_weighting` (WPO) needs `chosen_/rejected_log_sum_sq_probs` (log sum_v p_v^2 per token).
    `loss_type` is a str or a sequence, `loss_weights` one weight per type (default 1.0 each).

    Returns dict(loss, grad_chosen (B, Tc), grad_rejected (B, Tr), ref_chosen_logps (B,), ref_rejected_logps (B,),
    metrics).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    for lt in loss_types:
        _check_choice("loss_type", lt, _DPO_LOSS_TYPES)
    _check_choice("f_divergence_type", f_divergence_type, _F_DIVERGENCES)
    # The configuration checks of DPOConfig.__post_init__ and DPOTrainer.__init__
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(
            "`loss_weights` must have the same length as `loss_type` when combining multiple losses. "
            f"Got {len(loss_weights)} weights for {len(loss_types)} loss types."
        )
    f_divergence_loss_types = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= f_divergence_loss_types:
        raise ValueError(f"`f_divergence_type='{f_divergence_type}'` is only supported for {sorted(f_divergence_loss_types)}")
    if use_weighting and any(lt in {"aot", "aot_unpaired"} for lt in loss_types):
        raise NotImplementedError("WPO-style weighting is not implemented for 'aot' or 'aot_unpaired'")
    if use_weighting and "sft" in loss_types:
        # TRL 1.16 itself fails here: the "sft" per-sequence loss is `batch_loss.expand(batch_size)` and the WPO
        # weighting multiplies it in place (`per_sequence_loss *= ...`), which raises a RuntimeError in torch.
        raise NotImplementedError("trl_reference: TRL 1.16 raises for loss_type 'sft' with use_weighting=True")
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError("Label smoothing must be greater than 0.0 when using 'exo_pair' loss.")
    if use_weighting and (chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None):
        raise ValueError("trl_reference: use_weighting needs chosen_log_sum_sq_probs and rejected_log_sum_sq_probs")

    pc = _check_2d("chosen_per_token_logps", chosen_per_token_logps)
    pr = _check_2d("rejected_per_token_logps", rejected_per_token_logps)
    B, Tc = pc.shape
    Tr = pr.shape[1]
    if pr.shape[0] != B:
        raise ValueError("trl_reference: chosen and rejected must have the same batch size")
    rc = _check_2d("ref_chosen_per_token_logps", ref_chosen_per_token_logps, (B, Tc))
    rr = _check_2d("ref_rejected_per_token_logps", ref_rejected_per_token_logps, (B, Tr))
    mc = _check_2d("chosen_mask", chosen_mask, (B, Tc))
    mr = _check_2d("rejected_mask", rejected_mask, (B, Tr))
    T = max(Tc, Tr)

    # TRL's alpha-divergence looks its clamp up in {float16, bfloat16, float32}: float64 would raise KeyError there
    alpha_div = f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1.0) >= 1e-6
    dtype = torch.float32 if alpha_div else _DTYPE

    # Collator layout (DataCollatorForPreference.torch_call): input_ids = prompt + completion, right-padded;
    # attention_mask 1 on prompt + completion; completion_mask 0 on the prompt, 1 on the completion.
    comp = _mask(np.concatenate([_pad_cols(mc, T), _pad_cols(mr, T)]).astype(np.int64))  # (2B, T)
    ones = torch.ones((2 * B, 1), dtype=torch.long)
    completion_mask = torch.cat([torch.zeros_like(ones), comp], dim=1)  # (2B, 1 + T)
    attention_mask = torch.cat([ones, comp], dim=1)
    input_ids = torch.cat([ones * _PROMPT_TOKEN, torch.where(comp.bool(), _COMPLETION_TOKEN, _PAD_TOKEN)], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}

    chosen = _t(pc, dtype=dtype, requires_grad=True)
    rejected = _t(pr, dtype=dtype, requires_grad=True)
    zc, zr = torch.zeros((B, T - Tc), dtype=dtype), torch.zeros((B, T - Tr), dtype=dtype)
    policy_logps = torch.cat([torch.cat([chosen, zc], 1), torch.cat([rejected, zr], 1)], 0)  # (2B, L - 1)
    log_sum_sq = None
    if use_weighting:
        log_sum_sq = _t(np.concatenate([
            _pad_cols(_check_2d("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs, (B, Tc)), T),
            _pad_cols(_check_2d("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs, (B, Tr)), T),
        ]), dtype=dtype)
    model = _FakeFusedLM(policy_logps, log_sum_sq)
    ref_model = _FakeFusedLM(_t(np.concatenate([_pad_cols(rc, T), _pad_cols(rr, T)]), dtype=dtype), name="ref_model")

    fake = _fake_self(
        DPOTrainer,
        "DPOTrainer",
        args=_Strict("args", discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        model=model,
        ref_model=ref_model,
        # DPOTrainer.__init__ assignments
        beta=beta,
        precompute_ref_logps=True,
        loss_types=loss_types,
        loss_weights=list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types),
        ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        aux_loss_enabled=False,
        _total_train_tokens=0,
        _tp_size=1,
    )
    # precompute_ref_log_probs=True: `_precompute_ref_logps` calls `compute_ref_log_probs` per collated batch
    ref_chosen_logps, ref_rejected_logps = DPOTrainer.compute_ref_log_probs(fake, ref_model, dict(inputs))
    inputs["ref_chosen_logps"] = ref_chosen_logps
    inputs["ref_rejected_logps"] = ref_rejected_logps

    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    loss.backward()
    return {
        "loss": loss.item(),
        "grad_chosen": _grad(chosen),
        "grad_rejected": _grad(rejected),
        "ref_chosen_logps": ref_chosen_logps.to(torch.float64).numpy().copy(),
        "ref_rejected_logps": ref_rejected_logps.to(torch.float64).numpy().copy(),
        "metrics": _metrics_of(fake),
    }


# ----------------------------------------------------------------------------------------------------------------------
# CPO / ORPO
# ----------------------------------------------------------------------------------------------------------------------


def trl_cpo_loss(chosen_logps, rejected_logps, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
                 simpo_gamma=0.5, alpha=0.0) -> dict:
    """Runs `CPOTrainer.cpo_loss(fake_self, chosen_logps, rejected_logps)` (trl.experimental.cpo, TRL 1.16).

    `chosen_logps`, `rejected_logps`: (B,) per-sequence policy log-probs as TRL passes them: the token *mean* over the
    completion for `loss_type in ("ipo", "simpo", "alphapo")`, the token *sum* for "sigmoid"/"hinge" (whatever
    `alpha`). "alphapo" becomes "simpo" as `CPOConfig.__post_init__` does. Returns dict(losses (B,), loss (their
    mean), chosen_rewards, rejected_rewards, grad_chosen, grad_rejected (of losses.mean())). The trainer adds
    `cpo_alpha * nll` (not included here).
    """
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    if loss_type == "kto_pair":
        raise ValueError("Support for kto_pair has been removed in CPOTrainer. Please use KTOTrainer.")
    if loss_type == "alphapo":  # CPOConfig.__post_init__ syntactic sugar (also sets cpo_alpha=0)
        loss_type = "simpo"
    _check_choice("loss_type", loss_type, {"sigmoid", "hinge", "ipo", "simpo"})
    chosen_logps = np.asarray(chosen_logps)
    B = chosen_logps.shape[0]
    _check_1d("chosen_logps", chosen_logps, B)
    attrs = {"beta": beta, "label_smoothing": label_smoothing, "loss_type": loss_type, "alpha": alpha}
    if loss_type == "simpo":  # CPOTrainer.__init__ sets simpo_gamma only for simpo
        attrs["simpo_gamma"] = simpo_gamma
    fake = _fake_self(CPOTrainer, "CPOTrainer", **attrs)
    pc = _t(chosen_logps, requires_grad=True)
    pr = _t(_check_1d("rejected_logps", rejected_logps, B), requires_grad=True)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, pc, pr)
    loss = losses.mean()
    loss.backward()
    return {
        "losses": losses.detach().numpy().copy(),
        "loss": loss.item(),
        "chosen_rewards": chosen_rewards.numpy().copy(),
        "rejected_rewards": rejected_rewards.numpy().copy(),
        "grad_chosen": _grad(pc),
        "grad_rejected": _grad(pr),
    }


def trl_orpo_loss(chosen_logps_mean, rejected_logps_mean, *, beta=0.1) -> dict:
    """Runs `ORPOTrainer.odds_ratio_loss(fake_self, ...)` (trl.experimental.orpo, TRL 1.16).

    Inputs: (B,) per-sequence *mean* completion log-probs (< 0), as `concatenated_forward` computes them
    (`average_log_prob=True`). TRL casts them to float32 inside. Returns dict(losses (B,) = TRL's
    `beta * logsigmoid(log_odds)` (a reward: the trainer's loss is `nll - losses.mean()`), loss = `-losses.mean()`,
    grad_chosen, grad_rejected (of `-losses.mean()`), chosen_rewards, rejected_rewards, log_odds_ratio (mean
    logsigmoid), log_odds_chosen (mean log-odds)).

    TRL's NLL term, added to this: `nn.CrossEntropyLoss()` (mean) over the *chosen* rows only, with labels =
    `input_ids` where `attention_mask == 1` (prompt tokens included), shifted by one, so one token mean over all
    non-pad tokens but the first of each chosen row, across the whole batch; see `trl_orpo_nll` to get it from logits.
    """
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen_logps_mean = np.asarray(chosen_logps_mean)
    B = chosen_logps_mean.shape[0]
    _check_1d("chosen_logps_mean", chosen_logps_mean, B)
    fake = _fake_self(ORPOTrainer, "ORPOTrainer", beta=beta)
    pc = _t(chosen_logps_mean, requires_grad=True)
    pr = _t(_check_1d("rejected_logps_mean", rejected_logps_mean, B), requires_grad=True)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        fake, pc, pr)
    loss = -losses.mean()
    loss.backward()
    return {
        "losses": losses.detach().to(torch.float64).numpy().copy(),
        "loss": loss.item(),
        "grad_chosen": _grad(pc),
        "grad_rejected": _grad(pr),
        "chosen_rewards": chosen_rewards.to(torch.float64).numpy().copy(),
        "rejected_rewards": rejected_rewards.to(torch.float64).numpy().copy(),
        "log_odds_ratio": log_odds_ratio.item(),
        "log_odds_chosen": log_odds_chosen.item(),
    }


def trl_orpo_nll(chosen_logits, rejected_logits, chosen_input_ids, rejected_input_ids, chosen_attention_mask,
                 rejected_attention_mask, prompt_lengths, *, beta=0.1, pad_token_id=0) -> dict:
    """The whole ORPO loss, NLL included, by TRL's `ORPOTrainer.get_batch_loss_metrics` (-> `concatenated_forward`,
    `concatenated_inputs`, `get_batch_logps`, `odds_ratio_loss`) on a fake model that returns the given logits.

    Rows are laid out as `ORPOTrainer.tokenize_row` + `DPODataCollatorWithPadding` build them: `[prompt tokens,
    completion tokens, right padding]`; `*_logits` (B, L, V) at position i predict token i + 1; `*_attention_mask` 1 on
    prompt + completion; `prompt_lengths` (B,) the prompt length of each pair (the labels are `input_ids` with the
    prompt and the padding set to -100). Chosen and rejected may have different L.

    Returns dict(loss = nll - mean(or losses), nll_loss, chosen_logps, rejected_logps (mean completion log-probs),
    grad_chosen_logits, grad_rejected_logits, metrics (TRL's, without prefix)).
    """
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    cl = np.asarray(chosen_logits, dtype=np.float64)
    rl = np.asarray(rejected_logits, dtype=np.float64)
    if cl.ndim != 3 or rl.ndim != 3 or cl.shape[0] != rl.shape[0] or cl.shape[2] != rl.shape[2]:
        raise ValueError("trl_reference: logits must be (B, L, V) with the same B and V")
    B = cl.shape[0]
    prompt_lengths = _check_1d("prompt_lengths", prompt_lengths, B)

    def side(ids, am, L, name):
        ids = torch.tensor(_check_2d(f"{name}_input_ids", ids, (B, L)).astype(np.int64))
        am = _mask(_check_2d(f"{name}_attention_mask", am, (B, L)))
        labels = torch.where(am.bool(), ids, -100)
        for b, p in enumerate(prompt_lengths):
            labels[b, : int(p)] = -100
        return ids, am, labels

    c_ids, c_am, c_lab = side(chosen_input_ids, chosen_attention_mask, cl.shape[1], "chosen")
    r_ids, r_am, r_lab = side(rejected_input_ids, rejected_attention_mask, rl.shape[1], "rejected")
    batch = {
        "chosen_input_ids": c_ids, "chosen_attention_mask": c_am, "chosen_labels": c_lab,
        "rejected_input_ids": r_ids, "rejected_attention_mask": r_am, "rejected_labels": r_lab,
    }
    chosen_t = _t(cl, requires_grad=True)
    rejected_t = _t(rl, requires_grad=True)
    L = max(cl.shape[1], rl.shape[1])

    def pad_len(x):  # positions beyond a row's length are padding (label -100, attention 0)
        return torch.cat([x, torch.zeros((B, L - x.shape[1], x.shape[2]), dtype=x.dtype)], dim=1)

    all_logits = torch.cat([pad_len(chosen_t), pad_len(rejected_t)], dim=0)

    class _Model:
        training = True

        def __call__(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
            if kwargs:
                raise ValueError(f"trl_reference: unsupported model kwargs {sorted(kwargs)}")
            if tuple(input_ids.shape) != tuple(all_logits.shape[:2]):
                raise AssertionError("trl_reference: unexpected concatenated input shape")
            return types.SimpleNamespace(logits=all_logits)

    fake = _fake_self(
        ORPOTrainer,
        "ORPOTrainer",
        methods=("concatenated_forward", "concatenated_inputs", "get_batch_logps", "odds_ratio_loss"),
        beta=beta,
        is_encoder_decoder=False,
        padding_value=pad_token_id,
        aux_loss_enabled=False,
    )
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(fake, _Model(), batch, train_eval="train")
    # chosen/rejected mean completion log-probs, recomputed by TRL's own static method for the report
    with torch.no_grad():
        logps = ORPOTrainer.get_batch_logps(all_logits, torch.cat([_pad_labels(c_lab, L), _pad_labels(r_lab, L)]),
                                            average_log_prob=True)
    loss.backward()
    return {
        "loss": loss.item(),
        "nll_loss": metrics["nll_loss"],
        "chosen_logps": logps[:B].numpy().copy(),
        "rejected_logps": logps[B:].numpy().copy(),
        "grad_chosen_logits": _grad(chosen_t),
        "grad_rejected_logits": _grad(rejected_t),
        "metrics": metrics,
    }


def _pad_labels(labels, L):
    return torch.cat([labels, torch.full((labels.shape[0], L - labels.shape[1]), -100, dtype=labels.dtype)], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Smoke run
# ----------------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    np.set_printoptions(precision=5, suppress=True, linewidth=120)
    rng = np.random.default_rng(0)
    B, T = 4, 5
    lengths = np.array([5, 3, 4, 2])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    logp = -rng.uniform(0.1, 2.0, size=(B, T))
    old = logp + rng.normal(0, 0.3, size=(B, T))
    ref = logp + rng.normal(0, 0.3, size=(B, T))
    samp = old + rng.normal(0, 0.1, size=(B, T))
    adv = rng.normal(size=B)

    def finite(d):
        for k, v in d.items():
            if k == "metrics" or v is None:
                continue
            assert np.all(np.isfinite(v)), (k, v)

    def show(name, d):
        finite(d)
        print(f"{name}: loss={d['loss']:.10f}")
        for k, v in d.items():
            if k not in ("loss", "metrics"):
                print(f"  {k} = {v}")
        if d.get("metrics"):
            print(f"  metrics = { {k: round(v, 6) if isinstance(v, float) else v for k, v in d['metrics'].items()} }")

    # GRPO, every loss type
    for lt in sorted(_GRPO_LOSS_TYPES):
        kw = {"importance_sampling_level": "sequence"} if lt == "luspo" else {}
        show(f"grpo[{lt}]", trl_grpo_loss(logp, old, adv, mask, loss_type=lt, beta=0.04, ref_per_token_logps=ref,
                                          epsilon_high=5.0 if lt == "cispo" else 0.28, **kw))
    show("grpo[dapo, vLLM IS token_truncate, OPSM, delta]",
         trl_grpo_loss(logp, old, adv, mask, sampling_per_token_logps=samp, vllm_importance_sampling_mode="token_truncate",
                       off_policy_mask_threshold=0.05, delta=1.5))
    show("grpo[vespo, vLLM IS token_mask]",
         trl_grpo_loss(logp, old, adv, mask, loss_type="vespo", sampling_per_token_logps=samp,
                       vllm_importance_sampling_mode="token_mask"))
    show("grpo[grpo, sequence_mask IS]", trl_grpo_loss(logp, old, adv, mask, loss_type="grpo",
                                                       sampling_per_token_logps=samp))
    # Sanity: dapo with old == new is -sum(A * mask) / sum(mask); gradient -A / sum(mask) on unmasked tokens
    r = trl_grpo_loss(logp, logp, adv, mask, loss_type="dapo")
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    assert abs(r["loss"] - expected) < 1e-12, (r["loss"], expected)
    np.testing.assert_allclose(r["grad"], -adv[:, None] * mask / mask.sum(), atol=1e-15)
    r2 = trl_grpo_loss(logp, None, adv, mask, loss_type="dapo")
    assert abs(r2["loss"] - expected) < 1e-12
    print(f"sanity grpo dapo old==new: loss {r['loss']:.12f} == -token-mean(A) {expected:.12f}; grad ok")
    try:
        trl_grpo_loss(logp, old, adv, mask, loss_type="ppo")
    except ValueError as e:
        print("clear error:", e)

    show("rloo", trl_rloo_loss(logp, (old * mask).sum(1), adv, mask, epsilon_high=0.28))

    rewards_per_func = rng.normal(size=(B, 2))
    rewards_per_func[3, :] = np.nan
    for agg in ("sum_then_normalize", "normalize_then_sum"):
        for sr in ("group", "batch", "none"):
            a = trl_grpo_advantages(rewards_per_func, 2, reward_weights=[1.0, 0.5], scale_rewards=sr,
                                    multi_objective_aggregation=agg)
            assert np.all(np.isfinite(a["advantages"]))
            print(f"grpo advantages [{agg}, {sr}]: {a['advantages']}")
    print("rloo advantages:", trl_rloo_advantages(rewards_per_func[:, 0], 2))
    print("rloo advantages (normalized, beta):", trl_rloo_advantages(
        rewards_per_func[:, 0], 2, normalize_advantages=True, beta=0.1, old_per_token_logps=old,
        ref_per_token_logps=ref, completion_mask=mask))

    # DPO
    Tr = 4
    rej_len = np.array([2, 4, 1, 3])
    mask_r = (np.arange(Tr)[None, :] < rej_len[:, None]).astype(np.int64)
    pc, pr = logp, -rng.uniform(0.1, 2.0, size=(B, Tr))
    rc, rr = pc + rng.normal(0, 0.2, size=(B, T)), pr + rng.normal(0, 0.2, size=(B, Tr))
    for lt in sorted(_DPO_LOSS_TYPES):
        show(f"dpo[{lt}]", trl_dpo_loss(pc, pr, rc, rr, mask, mask_r, loss_type=lt,
                                         label_smoothing=1e-3 if lt == "exo_pair" else 0.0))
    show("dpo[sigmoid+sft weighted 1:0.5, ld_alpha=0.5]",
         trl_dpo_loss(pc, pr, rc, rr, mask, mask_r, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                      ld_alpha=0.5))
    show("dpo[sigmoid, WPO]",
         trl_dpo_loss(pc, pr, rc, rr, mask, mask_r, use_weighting=True,
                      chosen_log_sum_sq_probs=-rng.uniform(0.5, 2, (B, T)),
                      rejected_log_sum_sq_probs=-rng.uniform(0.5, 2, (B, Tr))))
    for fd in ("forward_kl", "js_divergence", "alpha_divergence"):
        show(f"dpo[sigmoid, {fd}]", trl_dpo_loss(pc, pr, rc, rr, mask, mask_r, f_divergence_type=fd))
    r = trl_dpo_loss(pc, pr, pc, pr, mask, mask_r)
    assert abs(r["loss"] - math.log(2)) < 1e-12, r["loss"]
    np.testing.assert_allclose(r["grad_chosen"], -0.5 * 0.1 / B * mask, atol=1e-15)
    print(f"sanity dpo sigmoid zero log-ratio: loss {r['loss']:.12f} == log 2 {math.log(2):.12f}; grad ok")

    # CPO / ORPO
    mean_c, mean_r = (pc * mask).sum(1) / mask.sum(1), (pr * mask_r).sum(1) / mask_r.sum(1)
    for lt in ("sigmoid", "hinge", "ipo", "simpo", "alphapo"):
        use_mean = lt in ("ipo", "simpo", "alphapo")
        c, rj = (mean_c, mean_r) if use_mean else ((pc * mask).sum(1), (pr * mask_r).sum(1))
        show(f"cpo[{lt}]", trl_cpo_loss(c, rj, loss_type=lt, alpha=0.3 if lt == "alphapo" else 0.0))
    show("orpo", trl_orpo_loss(mean_c, mean_r, beta=0.1))

    V, P = 7, 2
    Lc, Lr = P + T, P + Tr
    c_ids = rng.integers(3, V, size=(B, Lc))
    r_ids = rng.integers(3, V, size=(B, Lr))
    c_am = (np.arange(Lc)[None, :] < (P + lengths)[:, None]).astype(np.int64)
    r_am = (np.arange(Lr)[None, :] < (P + rej_len)[:, None]).astype(np.int64)
    c_ids, r_ids = np.where(c_am == 1, c_ids, 0), np.where(r_am == 1, r_ids, 0)
    c_logits, r_logits = rng.normal(size=(B, Lc, V)), rng.normal(size=(B, Lr, V))
    o = trl_orpo_nll(c_logits, r_logits, c_ids, r_ids, c_am, r_am, np.full(B, P), beta=0.1)
    # cross-checks: NLL = token mean over chosen rows of -log p(label) (prompt included, first token excluded);
    # the OR part equals trl_orpo_loss on the returned mean log-probs
    lsm = c_logits - np.log(np.exp(c_logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(lsm[:, :-1], c_ids[:, 1:, None], -1)[..., 0]
    nll = -(tok * c_am[:, 1:]).sum() / c_am[:, 1:].sum()
    assert abs(o["nll_loss"] - nll) < 1e-12, (o["nll_loss"], nll)
    orl = trl_orpo_loss(o["chosen_logps"], o["rejected_logps"], beta=0.1)
    assert abs(o["loss"] - (nll + orl["loss"])) < 1e-6
    print(f"orpo from logits: loss={o['loss']:.10f} nll={o['nll_loss']:.10f} (== numpy token mean {nll:.10f}); "
          f"grad_chosen_logits norm={np.linalg.norm(o['grad_chosen_logits']):.6f}; metrics={ {k: round(v, 6) for k, v in o['metrics'].items()} }")
    print("all smoke checks passed")
