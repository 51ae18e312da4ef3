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


def trainable_of(model, params):
    """The part of `params` a step differentiates and the optimizer updates: `model.trainable(params)` (the LoRA
    adapters of a LoRA model), or all of `params` for a model without that notion."""
    return model.trainable(params) if hasattr(model, "trainable") else params


def with_trainable(model, params, trainable):
    """`params` with its trainable part replaced (the inverse of `trainable_of`)."""
    return model.with_trainable(params, trainable) if hasattr(model, "with_trainable") else trainable


def new_train_state(model, tx: optax.GradientTransformation, params, rng) -> TrainState:
    """A step-0 state: the optimizer state covers the trainable params only (the adapters of a LoRA model)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable_of(model, params)),
                      rng=rng)


def apply_gradients(model, tx: optax.GradientTransformation, state: TrainState, grads):
    """(params, opt_state) after one optimizer update from `grads` of the trainable params."""
    trainable = trainable_of(model, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    return with_trainable(model, state.params, optax.apply_updates(trainable, updates)), opt_state


def state_shardings(abstract_state: TrainState, param_shardings, tx: optax.GradientTransformation, mesh,
                    model=None):
    """Shardings of a TrainState: optimizer moments like their params, every other leaf replicated. `model` (with
    a `trainable` split, e.g. a LoRA LM) says which params the optimizer state covers (default: all)."""
    rep = replicated(mesh)
    opt_param_shardings = trainable_of(model, param_shardings) if model is not None else param_shardings
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state.opt_state, opt_param_shardings,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)


def abstract_train_state(lm, tx) -> TrainState:
    def make():
        params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), lm.abstract_params)
        return new_train_state(lm, tx, params, jax.random.PRNGKey(0))
    return jax.eval_shape(make)


def create_train_state(lm, tx, mesh, seed: int) -> tuple[TrainState, TrainState]:
    """A freshly initialised state, created directly sharded. Returns (state, its shardings)."""
    abstract = abstract_train_state(lm, tx)
    shardings = state_shardings(abstract, lm.param_shardings(mesh), tx, mesh, model=lm)

    def make(key):
        init_key, state_key = jax.random.split(key)
        return new_train_state(lm, tx, lm.init(init_key), state_key)

    state = jax.jit(make, out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: the restore target that makes Orbax reshard onto a new mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
