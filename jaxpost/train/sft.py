"""The SFT train step: a pure function, jit-compiled with explicit shardings and state donation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpost.losses import sft_nll
from jaxpost.sharding import replicated
from jaxpost.train.state import TrainState, apply_gradients, jit_step, trainable_of, with_trainable

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def split_microbatches(batch: dict, grad_accum: int) -> dict:
    """[rows, T] host arrays -> [grad_accum, rows / grad_accum, T]: micro-batch i is rows i*b .. (i+1)*b - 1."""
    rows = batch["inputs"].shape[0]
    if rows % grad_accum:
        raise ValueError(f"batch of {rows} rows does not split into grad_accum={grad_accum} micro-batches")
    return {k: batch[k].reshape(grad_accum, rows // grad_accum, *batch[k].shape[1:]) for k in BATCH_KEYS}


def microbatch_sharding(mesh, rows_per_micro: int) -> NamedSharding:
    """[A, b, T] batches: rows over (data, fsdp) when they divide, else replicated."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    if not axes or rows_per_micro % dp:
        return replicated(mesh)
    return NamedSharding(mesh, P(None, axes if len(axes) > 1 else axes[0], None))


def sft_loss_sums(lm, params, mb: dict, *, logprobs_impl: str = "auto", dropout_key=None):
    """(summed token NLL, number of loss tokens) of one micro-batch. dropout_key: LoRA dropout (LoRA models)."""
    hidden_BTD = lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], dropout_key=dropout_key)
    logp_BT = lm.token_logprobs(params, hidden_BTD, mb["targets"], impl=logprobs_impl).logp
    return sft_nll(logp_BT, mb["loss_mask"])


def sft_step_fn(lm, tx: optax.GradientTransformation, schedule: optax.Schedule, *, logprobs_impl: str = "auto"
                ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step. `batch` holds [A, b, T] arrays (A micro-batches). The gradient is
    (sum over micro-batches of grad of summed NLL) / (total loss tokens): exactly the global token mean. Gradients
    and updates cover `trainable_of(lm, params)` (all params, or a LoRA model's adapters); a LoRA model with
    dropout draws its masks from the state's key, the step and the micro-batch index."""
    dropout = getattr(lm, "lora", None) is not None and lm.lora.dropout > 0

    def grads_of(params, mb, key):
        def loss(t):
            return sft_loss_sums(lm, with_trainable(lm, params, t), mb, logprobs_impl=logprobs_impl,
                                 dropout_key=key)
        (nll, n), g = jax.value_and_grad(loss, has_aux=True)(trainable_of(lm, params))
        return g, nll, n

    def step(state: TrainState, batch: dict):
        A = batch["inputs"].shape[0]
        step_key = jax.random.fold_in(state.rng, state.step) if dropout else None
        keys = jax.random.split(step_key, A) if dropout else None
        if A == 1:
            g_sum, nll, n = grads_of(state.params, jax.tree.map(lambda x: x[0], batch),
                                     keys[0] if dropout else None)
        else:
            def accumulate(carry, xs):
                mb, key = xs
                g_acc, nll_acc, n_acc = carry
                g, nll, n = grads_of(state.params, mb, key)
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, trainable_of(lm, state.params))
            (g_sum, nll, n), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (batch, keys))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, g_sum)
        params, opt_state = apply_gradients(lm, tx, state, grads)
        metrics = {"loss": nll / denom, "tokens": n, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_sft_step(lm, tx, schedule, mesh, state_shardings, *, grad_accum: int, rows: int,
                  logprobs_impl: str = "auto"):
    """`sft_step_fn` under `jax.jit` with explicit in/out shardings and the state donated. The returned callable
    takes and returns (state, batch) like the pure step and traces under `mesh`."""
    fn = sft_step_fn(lm, tx, schedule, logprobs_impl=logprobs_impl)
    batch_sh = {k: microbatch_sharding(mesh, rows // grad_accum) for k in BATCH_KEYS}
    return jit_step(fn, mesh, state_shardings, batch_sh)
