"""The preference-optimisation train step (the DPO family, SimPO, ORPO): pure, jit-compiled, sharded.

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
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpost.losses import DPO_LOSSES, REFERENCE_FREE_LOSSES
from jaxpost.sharding import replicated
from jaxpost.train.state import TrainState, accumulate_microbatches, apply_gradients, jit_step

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
REFERENCES = ("model", "precomputed", "none")


def sequence_logps(lm, params, mb: dict, *, logprobs_impl: str = "auto", adapters: bool = True):
    """(summed completion log-probs [R], completion token counts [R]) of rows [R, T]."""
    hidden_RTD = lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], adapters=adapters)
    logp_RT = lm.token_logprobs(params, hidden_RTD, mb["targets"], impl=logprobs_impl).logp
    mask_RT = mb["loss_mask"].astype(jnp.float32)
    return jnp.sum(logp_RT * mask_RT, axis=-1), jnp.sum(mask_RT, axis=-1)


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


def preference_step_fn(lm, tx: optax.GradientTransformation, schedule: optax.Schedule, *, loss: str,
                       loss_kwargs: dict | None = None, reference: str = "model", logprobs_impl: str = "auto"
                       ) -> Callable[[TrainState, object, dict], tuple[TrainState, dict]]:
    """The pure step `step(state, ref_params, batch) -> (state, metrics)`.

    batch: ROW_KEYS as [A, 2b, T] (A micro-batches of b interleaved pairs), `pair_mask` [A, b] (0 for padding pairs)
    and, with reference="precomputed", `ref_logps` [A, 2b]. ref_params: the frozen reference params with
    reference="model", else None; for a LoRA model with reference="model", None means the policy's own base model
    with its adapters disabled (no second copy of the weights). Gradients and updates cover the trainable params
    (`trainable_of`). Metrics are means over the real pairs of the whole batch.
    """
    loss_fn = get_preference_loss(loss, reference)
    kwargs = dict(loss_kwargs or {})

    def pair_terms(params, ref_params, mb, n_pairs):
        logps_R, tokens_R = sequence_logps(lm, params, mb, logprobs_impl=logprobs_impl)
        (c_B, r_B), (tc_B, tr_B) = split_pairs(logps_R), split_pairs(tokens_R)
        if reference == "none":
            loss_B, metrics = loss_fn(c_B, r_B, chosen_tokens_B=tc_B, rejected_tokens_B=tr_B, **kwargs)
        else:
            if reference == "model" and ref_params is None:
                if getattr(lm, "lora", None) is None:
                    raise ValueError("reference='model' needs ref_params (or a LoRA model: adapters disabled)")
                ref_R, _ = sequence_logps(lm, params, mb, logprobs_impl=logprobs_impl, adapters=False)
            elif reference == "model":
                ref_R, _ = sequence_logps(lm, ref_params, mb, logprobs_impl=logprobs_impl)
            else:
                ref_R = mb["ref_logps"]
            rc_B, rr_B = split_pairs(jax.lax.stop_gradient(ref_R.astype(jnp.float32)))
            loss_B, metrics = loss_fn(c_B, r_B, rc_B, rr_B, chosen_tokens_B=tc_B, rejected_tokens_B=tr_B, **kwargs)
        m_B = mb["pair_mask"].astype(jnp.float32)
        sums = {k: jnp.sum(v * m_B) for k, v in metrics.items() if jnp.ndim(v) == 1}
        sums["chosen_tokens"] = jnp.sum(tc_B * m_B)
        sums["rejected_tokens"] = jnp.sum(tr_B * m_B)
        return jnp.sum(loss_B * m_B) / n_pairs, sums

    def step(state: TrainState, ref_params, batch: dict):
        n_pairs = jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)
        grads, loss, sums = accumulate_microbatches(
            lambda p, mb: pair_terms(p, ref_params, mb, n_pairs), state.params, batch, model=lm)
        params, opt_state = apply_gradients(lm, tx, state, grads)
        metrics = {"loss": loss, "pairs": n_pairs, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                   **{k: v / n_pairs for k, v in sums.items()}}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def rows_sharding(mesh, rows: int, ndim: int, *, rows_axis: int = 1) -> NamedSharding:
    """Arrays whose dimension `rows_axis` holds `rows` rows ([A, rows, ...] micro-batches by default, [rows, ...]
    with rows_axis=0): rows over (data, fsdp) when they divide, else replicated."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    if not axes or rows % dp:
        return replicated(mesh)
    spec = [None] * ndim
    spec[rows_axis] = axes if len(axes) > 1 else axes[0]
    return NamedSharding(mesh, P(*spec))


def preference_batch_shardings(mesh, *, pairs_per_micro: int, reference: str) -> dict:
    """Shardings of a step's batch; pairs stay whole on a device (rows split only when pairs split evenly)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    keys = ROW_KEYS + ("pair_mask",) + (("ref_logps",) if reference == "precomputed" else ())
    if pairs_per_micro % dp:  # keep every pair on one device
        return {k: replicated(mesh) for k in keys}
    out = {k: rows_sharding(mesh, 2 * pairs_per_micro, 3) for k in ROW_KEYS}
    out["pair_mask"] = rows_sharding(mesh, pairs_per_micro, 2)
    if reference == "precomputed":
        out["ref_logps"] = rows_sharding(mesh, 2 * pairs_per_micro, 2)
    return out


def make_preference_step(lm, tx, schedule, mesh, state_shardings, *, grad_accum: int, pairs: int, loss: str,
                         loss_kwargs: dict | None = None, reference: str = "model", logprobs_impl: str = "auto"):
    """`preference_step_fn` under `jax.jit` with explicit shardings; the state is donated, the reference params
    (sharded like the policy's, `state_shardings.params`) are not. Returns run(state, ref_params, batch)."""
    if pairs % grad_accum:
        raise ValueError(f"{pairs} pairs per batch do not split into grad_accum={grad_accum} micro-batches")
    fn = preference_step_fn(lm, tx, schedule, loss=loss, loss_kwargs=loss_kwargs, reference=reference,
                            logprobs_impl=logprobs_impl)
    batch_sh = preference_batch_shardings(mesh, pairs_per_micro=pairs // grad_accum, reference=reference)
    lora_reference = reference == "model" and getattr(lm, "lora", None) is not None  # adapters off: no ref params
    ref_sh = state_shardings.params if reference == "model" and not lora_reference else None
    return jit_step(fn, mesh, state_shardings, batch_sh, ref_shardings=ref_sh, with_ref=True)


def split_preference_microbatches(batch: dict, grad_accum: int) -> dict:
    """Host batch ([2B, T] rows, [B] pair_mask, [2B] ref_logps) -> [grad_accum, ...] micro-batches of whole pairs."""
    pairs = batch["pair_mask"].shape[0]
    if pairs % grad_accum:
        raise ValueError(f"batch of {pairs} pairs does not split into grad_accum={grad_accum} micro-batches")
    out = {}
    for k, v in batch.items():
        if k in ROW_KEYS or k in ("pair_mask", "ref_logps"):
            out[k] = v.reshape(grad_accum, v.shape[0] // grad_accum, *v.shape[1:])
    return out


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
