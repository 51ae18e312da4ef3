"""The reward-model objective: a decoder with a scalar head (`ScalarHeadLM`) scored on the last completion token of
each sequence, trained with a pairwise loss (Bradley-Terry by default) on interleaved chosen/rejected rows (the
batches of `jaxpost.data.preference`, like the DPO step). The loss is sum over real pairs / pairs in the whole
batch: exact under any micro-batch or device split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS, rows_sharding
from jaxpost.losses import get_reward_loss
from jaxpost.models.heads import last_token_index
from jaxpost.sharding import replicated
from jaxpost.train.dpo import masked_sums, split_pairs
from jaxpost.train.step import Context, Objective, row_layout


def sequence_rewards(model, params, mb: dict):
    """Score [R] of each row: the head's value at the row's last completion position."""
    v_RT = model.values(params, mb["inputs"], mb["positions"], mb["segment_ids"])
    idx_R = last_token_index(mb["loss_mask"])
    return jnp.take_along_axis(v_RT, idx_R[:, None], axis=1)[:, 0]


class PairwiseReward(Objective):
    """A pairwise reward-model loss (`loss`: a `REWARD_LOSSES` name, hyperparameters `loss_kwargs`) of a
    `ScalarHeadLM`'s scores. batch: ROW_KEYS [A, 2b, T] (interleaved chosen/rejected rows) and pair_mask [A, b]."""

    unit = "pair"

    def __init__(self, model, *, loss: str = "bradley_terry", loss_kwargs: dict | None = None):
        self.model, self.loss_fn, self.kwargs = model, get_reward_loss(loss), dict(loss_kwargs or {})

    def layout(self):
        return {**row_layout(ROW_KEYS, rows_per_unit=2), "pair_mask": (1, 2)}

    def denominator(self, batch):
        return jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)

    def loss(self, params, mb, ctx: Context):
        rc_B, rr_B = split_pairs(sequence_rewards(self.model, params, mb))
        loss_B, metrics = self.loss_fn(rc_B, rr_B, **self.kwargs)
        m_B = mb["pair_mask"].astype(jnp.float32)
        return jnp.sum(loss_B * m_B) / ctx.denom, masked_sums(metrics, m_B)

    def metrics(self, loss, sums, ctx: Context):
        return {"loss": loss, "pairs": ctx.denom, **{k: v / ctx.denom for k, v in sums.items()}}


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
