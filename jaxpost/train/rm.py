"""The reward-model train step: a decoder with a scalar head (`ScalarHeadLM`) scored on the last completion token of
each sequence, trained with a pairwise loss (Bradley-Terry by default) on interleaved chosen/rejected rows (the
batches of `jaxpost.data.preference`, like the DPO step). The loss is sum over real pairs / pairs in the whole
batch: exact under any micro-batch or device split.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxpost.losses import get_reward_loss
from jaxpost.models.heads import last_token_index
from jaxpost.sharding import replicated
from jaxpost.train.dpo import ROW_KEYS, preference_batch_shardings, rows_sharding, split_pairs
from jaxpost.train.state import TrainState, accumulate_microbatches, jit_step


def sequence_rewards(model, params, mb: dict):
    """Score [R] of each row: the head's value at the row's last completion position."""
    v_RT = model.values(params, mb["inputs"], mb["positions"], mb["segment_ids"])
    idx_R = last_token_index(mb["loss_mask"])
    return jnp.take_along_axis(v_RT, idx_R[:, None], axis=1)[:, 0]


def reward_step_fn(model, tx: optax.GradientTransformation, schedule: optax.Schedule, *, loss: str = "bradley_terry",
                   loss_kwargs: dict | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step `step(state, batch)`; batch: ROW_KEYS [A, 2b, T] and pair_mask [A, b]."""
    loss_fn = get_reward_loss(loss)
    kwargs = dict(loss_kwargs or {})

    def pair_terms(params, mb, n_pairs):
        rc_B, rr_B = split_pairs(sequence_rewards(model, params, mb))
        loss_B, metrics = loss_fn(rc_B, rr_B, **kwargs)
        m_B = mb["pair_mask"].astype(jnp.float32)
        sums = {k: jnp.sum(v * m_B) for k, v in metrics.items() if jnp.ndim(v) == 1}
        return jnp.sum(loss_B * m_B) / n_pairs, sums

    def step(state: TrainState, batch: dict):
        n_pairs = jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)
        grads, loss, sums = accumulate_microbatches(lambda p, mb: pair_terms(p, mb, n_pairs), state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "pairs": n_pairs, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                   **{k: v / n_pairs for k, v in sums.items()}}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_reward_step(model, tx, schedule, mesh, state_shardings, *, grad_accum: int, pairs: int,
                     loss: str = "bradley_terry", loss_kwargs: dict | None = None):
    """`reward_step_fn` under `jax.jit` with explicit shardings and the state donated."""
    if pairs % grad_accum:
        raise ValueError(f"{pairs} pairs per batch do not split into grad_accum={grad_accum} micro-batches")
    fn = reward_step_fn(model, tx, schedule, loss=loss, loss_kwargs=loss_kwargs)
    batch_sh = preference_batch_shardings(mesh, pairs_per_micro=pairs // grad_accum, reference="none")
    return jit_step(fn, mesh, state_shardings, batch_sh)


def make_pairwise_eval(model, mesh, param_shardings, *, rows: int):
    """A jitted `f(params, batch) -> (rewards [rows], ...)` for held-out pairwise accuracy: rewards of one host
    batch of interleaved rows [rows, T]."""
    in_sh = {k: rows_sharding(mesh, rows, 2, rows_axis=0) for k in ROW_KEYS}
    jitted = jax.jit(lambda p, b: sequence_rewards(model, p, b), in_shardings=(param_shardings, in_sh),
                     out_shardings=replicated(mesh))

    def run(params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, {k: batch[k] for k in ROW_KEYS})

    return run
