"""The train state pytree and its sharded creation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxpost.sharding import replicated


@struct.dataclass
class TrainState:
    """Everything a step reads and writes. `rng` is a raw uint32[2] key (Orbax stores it as a plain array)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def state_shardings(abstract_state: TrainState, param_shardings, tx: optax.GradientTransformation, mesh):
    """Shardings of a TrainState: optimizer moments like their params, every other leaf replicated."""
    rep = replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)


def abstract_train_state(lm, tx) -> TrainState:
    def make():
        params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), lm.abstract_params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(0))
    return jax.eval_shape(make)


def create_train_state(lm, tx, mesh, seed: int) -> tuple[TrainState, TrainState]:
    """A freshly initialised state, created directly sharded. Returns (state, its shardings)."""
    abstract = abstract_train_state(lm, tx)
    shardings = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh)

    def make(key):
        init_key, state_key = jax.random.split(key)
        params = lm.init(init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_key)

    state = jax.jit(make, out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target that makes Orbax reshard onto a new mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def jit_step(fn, mesh, state_shardings, batch_shardings: dict, *, ref_shardings=None, with_ref: bool = False):
    """`fn(state, batch)` (or `fn(state, ref_params, batch)` with `with_ref`) under `jax.jit` with explicit in/out
    shardings, the state donated (the reference params are not), traced and run under `mesh`. The returned callable
    has the pure step's signature; `.jitted` and `.batch_shardings` are exposed for tests and input placement."""
    in_sh = (state_shardings, ref_shardings, batch_shardings) if with_ref else (state_shardings, batch_shardings)
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))

    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    run.jitted = jitted
    run.batch_shardings = batch_shardings
    return run


def accumulate_microbatches(loss_fn, params, batch):
    """(grads, loss, sums) of `loss_fn(params, mb) -> (loss, sums)` summed over the leading micro-batch axis of
    `batch` (a `lax.scan`; one direct call when there is a single micro-batch). `loss_fn` must already divide by the
    global normaliser, so that the sum over micro-batches is the full-batch value."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], batch)
    if jax.tree.leaves(batch)[0].shape[0] == 1:
        (loss, sums), grads = grad_fn(params, first)
        return grads, loss, sums

    def accumulate(carry, mb):
        g_acc, loss_acc, sums_acc = carry
        (loss, sums), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, jax.tree.map(jnp.add, sums_acc, sums)), None

    sums_shape = jax.eval_shape(lambda: loss_fn(params, first)[1])
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums_shape))
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, batch)
    return grads, loss, sums
