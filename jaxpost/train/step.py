"""One step builder for every objective: `make_step(model, tx, schedule, objective, ...)`.

The step owns what every objective shares: splitting the gradient over micro-batches, the trainable part of the
params (a LoRA model's adapters), the optimizer update, the step counter, the learning-rate and gradient-norm
metrics, and jit with explicit shardings. An objective (`Objective`) owns only what is its own:

    layout()                      the batch arrays and how many rows each holds per unit (token row, pair, example)
    denominator(batch)            the global normaliser(s) of the whole step's batch [A, n, ...], computed once
    prepare(params, ref, batch)   forward-only statistics of the whole batch before the gradient pass (KTO's z0)
    loss(params, mb, ctx)         (loss part, metric sums) of one micro-batch; the part is already divided by the
                                  global denominator, so the step's loss is the sum of the parts
    metrics(loss, sums, ctx)      the step's metrics from the summed loss and sums

One convention: a micro-batch returns its numerator over the global denominator, never a local mean, so the loss
and the gradient are the full-batch ones however the batch is split into micro-batches and devices (nanodo averages
micro-batch means instead).

Adding an objective is one file: a subclass of `Objective` (see `jaxpost.train.sft` for the shortest one).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpost.batch import ROW_KEYS, microbatch_shardings
from jaxpost.sharding import replicated
from jaxpost.train.state import TrainState, apply_gradients, trainable_of, with_trainable


class Context(NamedTuple):
    """What a micro-batch's loss sees besides its params and rows."""

    denom: Any  # `Objective.denominator` of the whole step's batch
    ref_params: Any  # the reference params (objectives with `with_reference`), else None
    stats: Any  # `Objective.prepare` of the whole step's batch (None by default)
    key: Any  # this micro-batch's PRNG key (objectives with `uses_dropout`), else None


class Objective(abc.ABC):
    """What a train step optimises (module docstring). Subclasses set `unit` (what `make_step`'s `units` count) and
    implement `layout`, `denominator` and `loss`."""

    unit: ClassVar[str] = "row"
    #: The step takes reference params: `step(state, ref_params, batch)` instead of `step(state, batch)`.
    with_reference: ClassVar[bool] = False

    @property
    def uses_dropout(self) -> bool:
        """Draw a PRNG key per micro-batch from the state's key and step (`Context.key`)."""
        return False

    @abc.abstractmethod
    def layout(self) -> dict[str, tuple[int, int]]:
        """{batch key: (rows per unit, ndim of the [A, n, ...] array)}."""

    @abc.abstractmethod
    def denominator(self, batch: dict) -> Any:
        """The global normaliser of the step's whole batch (a scalar, or any pytree the loss understands)."""

    def prepare(self, params, ref_params, batch: dict) -> Any:
        """Statistics of the whole batch computed before the gradient pass, without gradient."""
        return None

    @abc.abstractmethod
    def loss(self, params, mb: dict, ctx: Context) -> tuple[jax.Array, Any]:
        """(this micro-batch's part of the loss: its numerator / ctx.denom, a pytree of metric sums)."""

    def metrics(self, loss, sums, ctx: Context) -> dict:
        return {"loss": loss, **sums}

    def reference_shardings(self, param_shardings):
        """In-shardings of the step's `ref_params` argument (None: it holds no arrays)."""
        return None


def accumulate(loss_fn: Callable, params, batch: dict, keys=None):
    """(grads, loss, sums) of `loss_fn(params, mb, key) -> (loss, sums)` summed over the leading micro-batch axis
    of `batch`: one direct call for a single micro-batch, else a `lax.scan` (one micro-batch's activations alive at
    a time)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    A = jax.tree.leaves(batch)[0].shape[0]
    if A == 1:
        (loss, sums), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch),
                                      None if keys is None else keys[0])
        return grads, loss, sums

    def body(carry, xs):
        g_acc, loss_acc, sums_acc = carry
        mb, key = xs
        (loss, sums), g = grad_fn(params, mb, key)
        return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, jax.tree.map(jnp.add, sums_acc, sums)), None

    first = jax.tree.map(lambda x: x[0], batch)
    sums_shape = jax.eval_shape(lambda: loss_fn(params, first, None if keys is None else keys[0])[1])
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums_shape))
    (grads, loss, sums), _ = jax.lax.scan(body, init, (batch, keys))
    return grads, loss, sums


def step_fn(model, tx: optax.GradientTransformation, schedule: optax.Schedule, objective: Objective
            ) -> Callable[..., tuple[TrainState, dict]]:
    """The pure step `step(state, batch)` (or `step(state, ref_params, batch)` for objectives `with_reference`) on
    [A, n, ...] micro-batches: gradients of the trainable params (`trainable_of(model, params)`), one optimizer
    update, the step counter + 1. Metrics: the objective's, `grad_norm` (of the applied gradient, before clipping)
    and `lr` (the schedule at this step).

    A non-finite loss or gradient norm skips the update: params and optimizer state come out bit-identical to the
    input's (`skip_unless`), the metric `skipped` is 1 (else 0). The step counter still advances: it counts batches
    consumed, so a checkpoint's step and its data-iterator position stay in step (the learning-rate schedule moves
    on too). The host loop (`jaxpost.train.loop.train_loop`) logs skipped steps and stops after
    `TrainConfig.max_bad_steps` in a row."""

    def step(state: TrainState, *args):
        ref_params, batch = args if objective.with_reference else (None, args[0])
        denom = objective.denominator(batch)
        stats = objective.prepare(jax.lax.stop_gradient(state.params), ref_params, batch)
        keys = None
        if objective.uses_dropout:
            A = jax.tree.leaves(batch)[0].shape[0]
            keys = jax.random.split(jax.random.fold_in(state.rng, state.step), A)
        full = state.params

        def loss_fn(trainable, mb, key):
            return objective.loss(with_trainable(model, full, trainable), mb, Context(denom, ref_params, stats, key))

        grads, loss, sums = accumulate(loss_fn, trainable_of(model, full), batch, keys)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = skip_unless(ok, apply_gradients(model, tx, state, grads), state, model)
        metrics = {**objective.metrics(loss, sums, Context(denom, ref_params, stats, None)),
                   "grad_norm": grad_norm, "lr": schedule(state.step), "skipped": 1.0 - ok.astype(jnp.float32)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def skip_unless(ok, updated: tuple, state: TrainState, model) -> tuple:
    """(params, opt_state): `updated` where `ok`, else the state's own, bit for bit. Only the trainable part and the
    optimizer state are selected (a LoRA model's frozen base is passed through untouched). One select inside the
    jitted step: no host sync, no recompilation."""
    params, opt_state = updated
    keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
    trainable = jax.tree.map(keep, trainable_of(model, params), trainable_of(model, state.params))
    return with_trainable(model, state.params, trainable), jax.tree.map(keep, opt_state, state.opt_state)


def jit_step(fn, mesh, state_shardings, batch_shardings: Mapping, *, ref_shardings=None, with_ref: bool = False):
    """`fn(state, batch)` (or `fn(state, ref_params, batch)` with `with_ref`) under `jax.jit` with explicit in/out
    shardings, the state donated (the reference params are not), traced and run under `mesh`. The returned callable
    has the pure step's signature; `.jitted` and `.batch_shardings` are exposed for tests and input placement."""
    in_sh = (state_shardings, ref_shardings, dict(batch_shardings)) if with_ref else (state_shardings,
                                                                                      dict(batch_shardings))
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))

    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    run.jitted = jitted
    run.batch_shardings = dict(batch_shardings)
    return run


def make_step(model, tx, schedule, objective: Objective, *, mesh, state_shardings, units: int,
              grad_accum: int = 1):
    """`step_fn` under `jax.jit` with explicit shardings and the state donated. `units` counts the objective's
    units (rows, pairs, examples) per optimizer step, split into `grad_accum` micro-batches; a step's batch is
    `split_microbatches` of host arrays placed by `.batch_shardings` (`jaxpost.batch.device_put_batch`)."""
    if units % grad_accum:
        raise ValueError(f"{units} {objective.unit}s per batch do not split into grad_accum={grad_accum} "
                         f"micro-batches")
    batch_sh = microbatch_shardings(mesh, objective.layout(), units // grad_accum)
    ref_sh = objective.reference_shardings(state_shardings.params) if objective.with_reference else None
    return jit_step(step_fn(model, tx, schedule, objective), mesh, state_shardings, batch_sh,
                    ref_shardings=ref_sh, with_ref=objective.with_reference)


def row_layout(keys=ROW_KEYS, *, rows_per_unit: int = 1) -> dict[str, tuple[int, int]]:
    """The layout of [A, n, T] row arrays (`Objective.layout`)."""
    return {k: (rows_per_unit, 3) for k in keys}
