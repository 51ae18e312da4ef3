"""The distillation objective: a student (the trained LM) matches a frozen teacher's next-token distributions.

Loss per step: sum over the loss tokens of the global batch of kd_weight s D(p_teacher || q_student) + nll_weight
NLL_student, divided by the number of loss tokens in the whole step's batch (exact under any micro-batch or device
split), where D is a `jaxpost.losses.DISTILL_LOSSES` divergence computed by `jaxpost.ops.token_kl` over the full
vocabulary without a [tokens x vocab] array, and s = T^2 with `scale_by_t2` (Hinton et al. 2015) or 1 (TRL's GKD).
With kd_weight = alpha, nll_weight = 1 - alpha, scale_by_t2 = True this is Hinton's `kd_mix`.

The teacher is its own `LM` (any width, depth, attention layout or tied/untied head; the same vocabulary) whose params
are the step's `ref_params`, sharded with the teacher's own logical-axis shardings (`reference_shardings`), never
updated and never differentiated. With "topk_forward_kl" there is no teacher model in the step: the batch carries the
teacher's top-k log-probs and ids (`teacher_topk_logp`, `teacher_topk_ids` [A, b, T, K], e.g. from an offline pass,
`teacher_topk`) and ref_params is None.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
arXiv:2306.13649, Algorithm 1) is this objective with loss="jsd" (beta) on a mix of rows: with probability lambda
(the student-data fraction) a step's rows are the student's own completions of the batch's prompts, sampled at the
distillation temperature by `jaxpost.rollout` from the current params (loss_mask on the completion tokens), otherwise
the fixed dataset's rows (`jaxpost.data` SFT rows); `seq_kd` (TRL) would replace the fixed completions by the
teacher's samples. TRL's `GKDTrainer` draws the coin once per step (`random.random() <= lmbda`). Nothing in the
loss depends on where the rows came from, so the lambda mixing, the sampling and the coin live in a recipe, which
hands this objective's step rows of either kind. On-policy distillation with the sampled-token reward (Thinking
Machines 2025, Qwen3) is instead a policy-gradient objective with `jaxpost.losses.on_policy_distill_advantages`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS
from jaxpost.losses import DISTILL_LOSSES, distill_token_loss, kd_scale, sft_nll
from jaxpost.ops import default_kl_impl, token_kl, token_kl_loss, token_kl_topk
from jaxpost.train.step import Context, Objective, row_layout

TOPK_KEYS = ("teacher_topk_logp", "teacher_topk_ids")


class Distill(Objective):
    """Logit distillation of `lm` (the student) from `teacher` (module docstring). The step is
    `step(state, teacher_params, batch)`.

    loss: a `DISTILL_LOSSES` name ("forward_kl", "reverse_kl", "jsd", "topk_forward_kl"); loss_kwargs: its
    hyperparameters (`temperature`, and `beta` for jsd). kd_weight, nll_weight: the weights of the divergence and of
    the student's NLL of the targets (at temperature 1) on the same loss tokens; scale_by_t2: multiply the divergence
    by T^2. kl_impl / chunk_budget_bytes: `token_kl`'s impl and memory budget, or "fused_loss": `token_kl_loss`
    (the masked sum's gradient formed in the forward pass, naive's flops), which "auto" picks where `token_kl`'s
    default is the chunked XLA path (CPU); logprobs_impl: the NLL's.

    batch: ROW_KEYS as [A, b, T] (plus TOPK_KEYS [A, b, T, K] for "topk_forward_kl"). A LoRA student draws dropout
    masks like SFT's. Metrics: `loss`, `kl` (the token mean of the divergence, unweighted and unscaled), `nll` (the
    student's token-mean NLL), `tokens` (loss tokens in the step's batch).
    """

    unit = "row"
    with_reference = True

    def __init__(self, lm, teacher=None, *, loss: str = "forward_kl", loss_kwargs: dict | None = None,
                 kd_weight: float = 1.0, nll_weight: float = 0.0, scale_by_t2: bool = False,
                 kl_impl: str = "auto", chunk_budget_bytes: int | None = None, logprobs_impl: str = "auto"):
        self.divergence = DISTILL_LOSSES.get(loss)(**dict(loss_kwargs or {}))
        self.topk = self.divergence.kind == "topk"
        if self.topk and teacher is not None:
            raise ValueError("loss='topk_forward_kl' reads the teacher's top-k from the batch (teacher_topk_logp, "
                             "teacher_topk_ids; see teacher_topk): pass teacher=None")
        if not self.topk and teacher is None:
            raise ValueError(f"loss={loss!r} needs a teacher LM (its params are the step's ref_params)")
        if teacher is not None and teacher.cfg.vocab_size != lm.cfg.vocab_size:
            raise ValueError(f"distillation needs one vocabulary: the student's has {lm.cfg.vocab_size} tokens, the "
                             f"teacher's {teacher.cfg.vocab_size}")
        if kd_weight < 0 or nll_weight < 0:
            raise ValueError(f"kd_weight and nll_weight must be >= 0, got {kd_weight} and {nll_weight}")
        self.lm, self.teacher = lm, teacher
        self.kd_weight = float(kd_weight) * kd_scale(self.divergence.temperature, scale_by_t2=scale_by_t2)
        self.nll_weight = float(nll_weight)
        self.kl_impl, self.chunk_budget_bytes, self.logprobs_impl = kl_impl, chunk_budget_bytes, logprobs_impl

    @property
    def uses_dropout(self) -> bool:
        return getattr(self.lm, "lora", None) is not None and self.lm.lora.dropout > 0

    def layout(self):
        out = row_layout(ROW_KEYS)
        if self.topk:
            out.update({k: (1, 4) for k in TOPK_KEYS})
        return out

    def denominator(self, batch):
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def reference_shardings(self, param_shardings):
        """The teacher's params laid out by the teacher's own logical axes on the student's mesh."""
        if self.teacher is None:
            return None
        mesh = jax.tree.leaves(param_shardings)[0].mesh
        return self.teacher.param_shardings(mesh)

    def divergence_sum(self, params, teacher_params, mb: dict, *, dropout_key=None):
        """(sum of the divergence over the loss tokens, the student's hidden states [b, T, D]) by `token_kl_loss`."""
        d = self.divergence
        hs_BTD = self.lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], dropout_key=dropout_key)
        ws, ws_vocab_major = self.lm.output_layer(params)
        teacher_params = jax.lax.stop_gradient(teacher_params)
        ht_BTD = self.teacher.hidden(teacher_params, mb["inputs"], mb["positions"], mb["segment_ids"])
        wt, wt_vocab_major = self.teacher.output_layer(teacher_params)
        mask_BT = (mb["loss_mask"] > 0).astype(jnp.float32)
        kl_sum = token_kl_loss(hs_BTD, ws, ht_BTD, wt, mask_BT, kind=d.kind, beta=d.beta, temperature=d.temperature,
                               student_vocab_major=ws_vocab_major, teacher_vocab_major=wt_vocab_major,
                               chunk_budget_bytes=self.chunk_budget_bytes)
        return kl_sum, hs_BTD

    def token_divergence(self, params, teacher_params, mb: dict, *, dropout_key=None):
        """(per-token divergence [b, T] (0 off the loss mask), the student's hidden states [b, T, D])."""
        d = self.divergence
        hs_BTD = self.lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], dropout_key=dropout_key)
        ws, ws_vocab_major = self.lm.output_layer(params)
        mask_BT = mb["loss_mask"]
        if self.topk:
            kl_BT = token_kl_topk(hs_BTD, ws, mb["teacher_topk_logp"], mb["teacher_topk_ids"], mask_BT,
                                  temperature=d.temperature, student_vocab_major=ws_vocab_major, impl=self.kl_impl,
                                  chunk_budget_bytes=self.chunk_budget_bytes)
            return kl_BT, hs_BTD
        teacher_params = jax.lax.stop_gradient(teacher_params)
        ht_BTD = self.teacher.hidden(teacher_params, mb["inputs"], mb["positions"], mb["segment_ids"])
        wt, wt_vocab_major = self.teacher.output_layer(teacher_params)
        kl_BT = token_kl(hs_BTD, ws, ht_BTD, wt, mask_BT, kind=d.kind, beta=d.beta, temperature=d.temperature,
                         student_vocab_major=ws_vocab_major, teacher_vocab_major=wt_vocab_major, impl=self.kl_impl,
                         chunk_budget_bytes=self.chunk_budget_bytes)
        return kl_BT, hs_BTD

    @property
    def fused_loss(self) -> bool:
        """The full-vocabulary divergence summed by `token_kl_loss` (one pass, gradient in the forward pass)."""
        return not self.topk and (self.kl_impl == "fused_loss"
                                  or (self.kl_impl == "auto" and default_kl_impl() == "chunked"))

    def loss(self, params, mb, ctx: Context):
        if self.fused_loss:
            kl_sum, hs_BTD = self.divergence_sum(params, ctx.ref_params, mb, dropout_key=ctx.key)
        else:
            kl_BT, hs_BTD = self.token_divergence(params, ctx.ref_params, mb, dropout_key=ctx.key)
            kl_sum, _ = distill_token_loss(kl_BT, mb["loss_mask"])
        if not self.nll_weight:  # the NLL is a metric only: no gradient through it
            hs_BTD = jax.lax.stop_gradient(hs_BTD)
        logp_BT = self.lm.token_logprobs(params, hs_BTD, mb["targets"], impl=self.logprobs_impl).logp
        nll_sum, _ = sft_nll(logp_BT, mb["loss_mask"])
        total = self.kd_weight * kl_sum + self.nll_weight * nll_sum
        sums = {"kl": jax.lax.stop_gradient(kl_sum), "nll": jax.lax.stop_gradient(nll_sum)}
        return total / jnp.maximum(ctx.denom, 1.0), sums

    def metrics(self, loss, sums, ctx: Context):
        n = jnp.maximum(ctx.denom, 1.0)
        return {"loss": loss, "kl": sums["kl"] / n, "nll": sums["nll"] / n, "tokens": ctx.denom}


def teacher_topk(teacher, params, rows: dict, *, k: int):
    """(teacher_topk_logp, teacher_topk_ids) [R, T, k] of rows [R, T]: the teacher's k most likely next tokens and
    their full-softmax log-probs at temperature 1, the batch arrays of loss="topk_forward_kl". It forms the
    [R, T, V] logits (`LM.logits`): an offline pass for moderate vocabularies, run over a few rows at a time."""
    logits_RTV = teacher.logits(params, rows["inputs"], rows["positions"], rows["segment_ids"])
    logp_RTK, ids_RTK = jax.lax.top_k(jax.nn.log_softmax(logits_RTV, axis=-1), k)
    return logp_RTK, ids_RTK.astype(jnp.int32)
