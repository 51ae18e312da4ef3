"""A decoder with a scalar head: the reward model (one score per sequence) and the value model (one per token).

`ScalarHeadLM` has the interface of `LM` that train states need (`abstract_params`, `logical_axes`,
`param_shardings`, `init`, `n_params`), with params `{"lm": <decoder params>, "head": {"w": [D], "b": [1]}}`.
The head reads the decoder's final hidden states (after the final norm): value = h @ w + b, in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS, rows_sharding
from jaxpost.config import ModelConfig
from jaxpost.models.lm import LM
from jaxpost.sharding import PARAM_RULES, logical_to_spec, replicated


class ScalarHeadLM:
    def __init__(self, cfg: ModelConfig, *, head_init_std: float = 0.0):
        """head_init_std: 0 starts every score at 0 (a reward model from an SFT start then ranks nothing yet)."""
        self.cfg = cfg
        self.lm = LM(cfg)
        self.head_init_std = head_init_std
        head = {"w": jax.ShapeDtypeStruct((cfg.d_model,), jnp.float32), "b": jax.ShapeDtypeStruct((1,), jnp.float32)}
        self.abstract_params = {"lm": self.lm.abstract_params, "head": head}
        self.logical_axes = {"lm": self.lm.logical_axes, "head": {"w": ("embed",), "b": ("norm",)}}

    def param_shardings(self, mesh):
        def sharding(axes, a):
            return jax.sharding.NamedSharding(mesh, logical_to_spec(axes, PARAM_RULES, mesh, a.shape))
        head = {k: sharding(self.logical_axes["head"][k], a) for k, a in self.abstract_params["head"].items()}
        return {"lm": self.lm.param_shardings(mesh), "head": head}

    def init_head(self, key):
        w = jax.random.normal(key, (self.cfg.d_model,), jnp.float32) * self.head_init_std
        return {"w": w, "b": jnp.zeros((1,), jnp.float32)}

    def init(self, key: jax.Array, mesh=None):
        k_lm, k_head = jax.random.split(key)
        head_sh = self.param_shardings(mesh)["head"] if mesh is not None else None
        return {"lm": self.lm.init(k_lm, mesh), "head": jax.jit(self.init_head, out_shardings=head_sh)(k_head)}

    def with_lm_params(self, lm_params, key):
        """Params of this model from decoder params (e.g. an SFT checkpoint) and a fresh head."""
        return {"lm": lm_params, "head": self.init_head(key)}

    def values(self, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
        """Float32 scores [B, T]: the head applied to the hidden state of every position."""
        h_BTD = self.lm.hidden(params["lm"], tokens_BT, positions_BT, segment_ids_BT)
        w_D = params["head"]["w"]
        return jnp.einsum("btd,d->bt", h_BTD.astype(jnp.float32), w_D) + params["head"]["b"][0]

    @functools.cached_property
    def n_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract_params))


def last_token_index(loss_mask_BT) -> jax.Array:
    """Index [B] of each row's last completion position (the last loss-mask position; 0 for an empty row)."""
    T = loss_mask_BT.shape[-1]
    pos_BT = jnp.where(loss_mask_BT > 0, jnp.arange(T)[None, :], -1)
    return jnp.maximum(jnp.max(pos_BT, axis=-1), 0)


def sequence_rewards(model: ScalarHeadLM, params, mb: dict):
    """Score [R] of each row [R, T]: the head's value at the row's last completion position (`last_token_index`)."""
    v_RT = model.values(params, mb["inputs"], mb["positions"], mb["segment_ids"])
    idx_R = last_token_index(mb["loss_mask"])
    return jnp.take_along_axis(v_RT, idx_R[:, None], axis=1)[:, 0]


def make_sequence_scorer(model: ScalarHeadLM, mesh, param_shardings, *, rows: int):
    """A jitted `score(params, batch) -> [rows]`: `sequence_rewards` of one host batch of ROW_KEYS [rows, T] (a
    reward model's held-out pairwise evaluation, or its scores of RL rollouts)."""
    in_sh = {k: rows_sharding(mesh, rows, 2, rows_axis=0) for k in ROW_KEYS}
    jitted = jax.jit(lambda p, b: sequence_rewards(model, p, b), in_shardings=(param_shardings, in_sh),
                     out_shardings=replicated(mesh))

    def run(params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, {k: batch[k] for k in ROW_KEYS})

    return run
