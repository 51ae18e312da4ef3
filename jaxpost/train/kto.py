"""The KTO train step (unpaired desirable / undesirable completions; `jaxpost.losses.kto`, `apo_zero_unpaired`).

Batches come from `jaxpost.data.build_kto_iterator`: rows [b, T] with `label` (1 desirable) and `example_mask`,
plus the KL rows `kl_*` (prompt i with the completion of example i+1), on which KTO estimates its reference point
z0 = max(0, mean(pi(y'|x) - ref(y'|x))), detached.

z0 is a statistic of the whole step's batch. The step computes it first, in a forward-only pass of the policy and the
reference over every micro-batch's KL rows (a global sum / count, so every device and micro-batch sees the same
z0), then the gradient pass uses it: the loss sum(loss_B * mask) / (real examples in the batch) is then exactly the
full-batch loss under any micro-batch or device split. (TRL re-estimates z0 per micro-batch.)

Reference log-probs come from a frozen reference model held beside the policy (`reference="model"`) or are
precomputed (`reference="precomputed"`: the batch carries `ref_logps` [A, b] and `ref_kl_logps` [A, b]).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxpost.losses import get_unpaired_loss, kto_kl_baseline, kto_kl_sums
from jaxpost.sharding import replicated
from jaxpost.train.dpo import ROW_KEYS, rows_sharding, sequence_logps
from jaxpost.train.state import TrainState, accumulate_microbatches, jit_step

KL_KEYS = tuple("kl_" + k for k in ROW_KEYS)


def _kl_rows(mb: dict) -> dict:
    return {k: mb["kl_" + k] for k in ROW_KEYS}


def kto_step_fn(lm, tx: optax.GradientTransformation, schedule: optax.Schedule, *, loss: str = "kto",
                loss_kwargs: dict | None = None, reference: str = "model", logprobs_impl: str = "auto"
                ) -> Callable[[TrainState, object, dict], tuple[TrainState, dict]]:
    """The pure step `step(state, ref_params, batch)`; batch: ROW_KEYS and KL_KEYS [A, b, T], `label` and
    `example_mask` [A, b] (and `ref_logps`, `ref_kl_logps` [A, b] with reference="precomputed")."""
    if reference not in ("model", "precomputed"):
        raise ValueError(f"KTO needs reference log-probs: reference='model' or 'precomputed', got {reference!r}")
    loss_fn = get_unpaired_loss(loss)
    kwargs = dict(loss_kwargs or {})

    def ref_logps(ref_params, mb, rows_key):
        if reference == "precomputed":
            return mb["ref_logps" if rows_key == "rows" else "ref_kl_logps"]
        rows = {k: mb[k] for k in ROW_KEYS} if rows_key == "rows" else _kl_rows(mb)
        return sequence_logps(lm, ref_params, rows, logprobs_impl=logprobs_impl)[0]

    def kl_sums(params, ref_params, mb):
        pi_kl, _ = sequence_logps(lm, params, _kl_rows(mb), logprobs_impl=logprobs_impl)
        return kto_kl_sums(pi_kl, ref_logps(ref_params, mb, "kl"), mask_B=mb["example_mask"])

    def terms(params, ref_params, mb, z0, n):
        pi_B, _ = sequence_logps(lm, params, {k: mb[k] for k in ROW_KEYS}, logprobs_impl=logprobs_impl)
        ref_B = jax.lax.stop_gradient(ref_logps(ref_params, mb, "rows").astype(jnp.float32))
        loss_B, metrics = loss_fn(pi_B, ref_B, mb["label"] > 0, kl=z0, **kwargs)
        m_B = mb["example_mask"].astype(jnp.float32)
        sums = {k: jnp.sum(v * m_B) for k, v in metrics.items() if jnp.ndim(v) == 1}
        return jnp.sum(loss_B * m_B) / n, sums

    def step(state: TrainState, ref_params, batch: dict):
        n = jnp.maximum(jnp.sum(batch["example_mask"].astype(jnp.float32)), 1.0)
        params = jax.lax.stop_gradient(state.params)
        kl_sum, kl_count = jax.lax.map(lambda mb: kl_sums(params, ref_params, mb), batch)
        z0 = kto_kl_baseline(jnp.sum(kl_sum), jnp.sum(kl_count))
        grads, loss, sums = accumulate_microbatches(
            lambda p, mb: terms(p, ref_params, mb, z0, n), state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        n_des = jnp.maximum(sums.get("desirable", 0.0), 1.0)
        n_und = jnp.maximum(n - sums.get("desirable", 0.0), 1.0)
        metrics = {"loss": loss, "examples": n, "kl": z0, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step), "rewards": sums["rewards"] / n,
                   "chosen_rewards": sums["chosen_rewards"] / n_des,
                   "rejected_rewards": sums["rejected_rewards"] / n_und}
        metrics["margins"] = metrics["chosen_rewards"] - metrics["rejected_rewards"]
        return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state), metrics

    return step


def make_kto_step(lm, tx, schedule, mesh, state_shardings, *, grad_accum: int, examples: int, loss: str = "kto",
                  loss_kwargs: dict | None = None, reference: str = "model", logprobs_impl: str = "auto"):
    """`kto_step_fn` under `jax.jit` with explicit shardings; the state is donated, the reference params not."""
    if examples % grad_accum:
        raise ValueError(f"{examples} examples per batch do not split into grad_accum={grad_accum} micro-batches")
    fn = kto_step_fn(lm, tx, schedule, loss=loss, loss_kwargs=loss_kwargs, reference=reference,
                     logprobs_impl=logprobs_impl)
    b = examples // grad_accum
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    vec_keys = ("label", "example_mask") + (("ref_logps", "ref_kl_logps") if reference == "precomputed" else ())
    if b % dp:
        batch_sh = {k: replicated(mesh) for k in ROW_KEYS + KL_KEYS + vec_keys}
    else:
        batch_sh = {k: rows_sharding(mesh, b, 3) for k in ROW_KEYS + KL_KEYS}
        batch_sh.update({k: rows_sharding(mesh, b, 2) for k in vec_keys})
    ref_sh = state_shardings.params if reference == "model" else None
    return jit_step(fn, mesh, state_shardings, batch_sh, ref_shardings=ref_sh, with_ref=True)


def split_kto_microbatches(batch: dict, grad_accum: int) -> dict:
    """Host KTO batch ([b, T] rows and KL rows, [b] vectors) -> [grad_accum, b / grad_accum, ...]."""
    b = batch["label"].shape[0]
    if b % grad_accum:
        raise ValueError(f"batch of {b} examples does not split into grad_accum={grad_accum} micro-batches")
    keys = ROW_KEYS + KL_KEYS + ("label", "example_mask", "ref_logps", "ref_kl_logps")
    return {k: v.reshape(grad_accum, b // grad_accum, *v.shape[1:]) for k, v in batch.items() if k in keys}

