"""The preference-optimisation objective (the DPO family, SimPO, ORPO) for `jaxpost.train.step.make_step`.

Batches hold chosen and rejected sequences in one array, interleaved: row 2i is pair i's chosen sequence and row 2i+1
its rejected one (`jaxpost.data.preference`), so one forward pass scores both and any split of rows into
micro-batches or devices keeps pairs together. Per-sequence log-probs are sums of `token_logprobs` over each row's
completion tokens (loss_mask).

The reference policy's log-probs come either from a frozen reference model held sharded beside the policy
(`reference="model"`: one extra forward per step, a second copy of the weights), or precomputed once in a pass over
the data (`reference="precomputed"`: the batch carries `ref_logps`, and the step needs neither the reference
weights nor their forward), or not at all for the reference-free losses (`reference="none"`: simpo, orpo).

Normalisation: the loss is sum over pairs of loss_B / (number of real pairs in the whole batch), so that gradient
accumulation over micro-batches and data parallelism give exactly the full-batch mean (except for the losses of
`BATCH_LEVEL_DPO_LOSSES`, which sort within each micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS, rows_sharding
from jaxpost.losses import DPO_LOSSES, REFERENCE_FREE_LOSSES
from jaxpost.sharding import replicated
from jaxpost.train.step import Context, Objective, row_layout

REFERENCES = ("model", "precomputed", "none")


def sequence_logps(lm, params, mb: dict, *, logprobs_impl: str = "auto", adapters: bool = True):
    """(summed completion log-probs [R], completion token counts [R]) of rows [R, T]."""
    hidden_RTD = lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], adapters=adapters)
    logp_RT = lm.token_logprobs(params, hidden_RTD, mb["targets"], impl=logprobs_impl).logp
    mask_RT = mb["loss_mask"].astype(jnp.float32)
    return jnp.sum(logp_RT * mask_RT, axis=-1), jnp.sum(mask_RT, axis=-1)


def reference_sequence_logps(lm, params, ref_params, rows: dict, *, logprobs_impl: str = "auto"):
    """Summed completion log-probs [R] of rows under the held reference: `ref_params`, or, when None, a LoRA
    model's own base (its adapters disabled on `params`: no second copy of the weights)."""
    if ref_params is not None:
        return sequence_logps(lm, ref_params, rows, logprobs_impl=logprobs_impl)[0]
    if getattr(lm, "lora", None) is None:
        raise ValueError("reference='model' needs ref_params (or a LoRA model: adapters disabled)")
    return sequence_logps(lm, params, rows, logprobs_impl=logprobs_impl, adapters=False)[0]


def reference_param_shardings(lm, reference: str, param_shardings):
    """In-shardings of a step's `ref_params`: the policy's with a held reference model, else None (precomputed, none,
    or a LoRA model's base)."""
    return param_shardings if reference == "model" and getattr(lm, "lora", None) is None else None


def split_pairs(x_R):
    """Interleaved rows [2B, ...] -> (chosen [B, ...], rejected [B, ...])."""
    x_B2 = x_R.reshape(x_R.shape[0] // 2, 2, *x_R.shape[1:])
    return x_B2[:, 0], x_B2[:, 1]


def get_preference_loss(name: str, reference: str) -> Callable:
    """The registered loss `name`, checked against the reference mode it needs."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if name in REFERENCE_FREE_LOSSES:
        if reference != "none":
            raise ValueError(f"loss {name!r} is reference-free: set reference='none', got {reference!r}")
        return REFERENCE_FREE_LOSSES[name]
    if name in DPO_LOSSES:
        if reference == "none":
            raise ValueError(f"loss {name!r} needs reference log-probs: reference='model' or 'precomputed'")
        return DPO_LOSSES[name]
    raise ValueError(f"unknown preference loss {name!r}; known: {sorted(DPO_LOSSES) + sorted(REFERENCE_FREE_LOSSES)}")


def masked_sums(metrics: dict, mask_B) -> dict:
    """Sums over the real units (mask_B) of a loss's per-unit [B] metrics (scalars are left out)."""
    return {k: jnp.sum(v * mask_B) for k, v in metrics.items() if jnp.ndim(v) == 1}


class Preference(Objective):
    """A pairwise preference loss (`loss`: a `DPO_LOSSES` or `REFERENCE_FREE_LOSSES` name, hyperparameters
    `loss_kwargs`) on interleaved chosen/rejected rows. The step is `step(state, ref_params, batch)`.

    batch: ROW_KEYS as [A, 2b, T] (A micro-batches of b interleaved pairs), `pair_mask` [A, b] (0 for padding pairs)
    and, with reference="precomputed", `ref_logps` [A, 2b]. ref_params: the frozen reference params with
    reference="model", else None; for a LoRA model with reference="model", None means the policy's own base model
    with its adapters disabled (no second copy of the weights). Metrics are means over the real pairs of the whole
    batch.
    """

    unit = "pair"
    with_reference = True

    def __init__(self, lm, *, loss: str, loss_kwargs: dict | None = None, reference: str = "model",
                 logprobs_impl: str = "auto"):
        self.loss_fn = get_preference_loss(loss, reference)
        self.lm, self.kwargs, self.reference, self.logprobs_impl = lm, dict(loss_kwargs or {}), reference, logprobs_impl

    def layout(self):
        out = {**row_layout(ROW_KEYS, rows_per_unit=2), "pair_mask": (1, 2)}
        if self.reference == "precomputed":
            out["ref_logps"] = (2, 2)
        return out

    def denominator(self, batch):
        return jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)

    def reference_shardings(self, param_shardings):
        return reference_param_shardings(self.lm, self.reference, param_shardings)

    def _reference_logps(self, params, ref_params, mb):
        if self.reference == "precomputed":
            return mb["ref_logps"]
        return reference_sequence_logps(self.lm, params, ref_params, mb, logprobs_impl=self.logprobs_impl)

    def loss(self, params, mb, ctx: Context):
        logps_R, tokens_R = sequence_logps(self.lm, params, mb, logprobs_impl=self.logprobs_impl)
        (c_B, r_B), (tc_B, tr_B) = split_pairs(logps_R), split_pairs(tokens_R)
        if self.reference == "none":
            loss_B, metrics = self.loss_fn(c_B, r_B, chosen_tokens_B=tc_B, rejected_tokens_B=tr_B, **self.kwargs)
        else:
            ref_R = jax.lax.stop_gradient(self._reference_logps(params, ctx.ref_params, mb).astype(jnp.float32))
            rc_B, rr_B = split_pairs(ref_R)
            loss_B, metrics = self.loss_fn(c_B, r_B, rc_B, rr_B, chosen_tokens_B=tc_B, rejected_tokens_B=tr_B,
                                           **self.kwargs)
        m_B = mb["pair_mask"].astype(jnp.float32)
        sums = masked_sums(metrics, m_B)
        sums["chosen_tokens"] = jnp.sum(tc_B * m_B)
        sums["rejected_tokens"] = jnp.sum(tr_B * m_B)
        return jnp.sum(loss_B * m_B) / ctx.denom, sums

    def metrics(self, loss, sums, ctx: Context):
        return {"loss": loss, "pairs": ctx.denom, **{k: v / ctx.denom for k, v in sums.items()}}


def make_reference_logps(lm, mesh, param_shardings, *, rows: int, logprobs_impl: str = "auto"):
    """A jitted `f(params, batch) -> logps [rows]` over one host batch of ROW_KEYS [rows, T]: the pass that
    precomputes the reference log-probs (reference="precomputed")."""
    in_sh = {k: rows_sharding(mesh, rows, 2, rows_axis=0) for k in ROW_KEYS}

    def f(params, batch):
        return sequence_logps(lm, params, {k: batch[k] for k in ROW_KEYS}, logprobs_impl=logprobs_impl)[0]

    jitted = jax.jit(f, in_shardings=(param_shardings, in_sh), out_shardings=replicated(mesh))

    def run(params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, {k: batch[k] for k in ROW_KEYS})

    return run
