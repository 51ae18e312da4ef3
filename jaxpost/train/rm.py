"""The reward-model objective: a decoder with a scalar head (`ScalarHeadLM`) scored on the last completion token of
each sequence, trained with a pairwise loss (Bradley-Terry by default) on interleaved chosen/rejected rows (the
batches of `jaxpost.data.preference`, like the DPO step). The loss is sum over real pairs / pairs in the whole
batch: exact under any micro-batch or device split.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS
from jaxpost.losses import get_reward_loss
from jaxpost.models.heads import sequence_rewards
from jaxpost.train.dpo import masked_sums, split_pairs
from jaxpost.train.step import Context, Objective, row_layout


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
