"""The SFT objective: the token mean of the NLL of the loss-masked targets over the whole step's batch.

Batch: `ROW_KEYS` as [A, b, T] (packed rows of `jaxpost.data.build_sft_iterator`). The loss is
sum of masked NLL / (loss tokens in the whole batch): exactly the global token mean under any micro-batch or device
split. A LoRA model with dropout draws its masks from the state's key, the step and the micro-batch index.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS
from jaxpost.losses import sft_nll
from jaxpost.train.step import Context, Objective, row_layout


def sft_loss_sums(lm, params, mb: dict, *, logprobs_impl: str = "auto", dropout_key=None):
    """(summed token NLL, number of loss tokens) of one micro-batch. dropout_key: LoRA dropout (LoRA models)."""
    hidden_BTD = lm.hidden(params, mb["inputs"], mb["positions"], mb["segment_ids"], dropout_key=dropout_key)
    logp_BT = lm.token_logprobs(params, hidden_BTD, mb["targets"], impl=logprobs_impl).logp
    return sft_nll(logp_BT, mb["loss_mask"])


class SFT(Objective):
    """Next-token NLL on the loss-masked targets. Metrics: `loss` (the token mean), `tokens`."""

    unit = "row"

    def __init__(self, lm, *, logprobs_impl: str = "auto"):
        self.lm, self.logprobs_impl = lm, logprobs_impl

    @property
    def uses_dropout(self) -> bool:
        return getattr(self.lm, "lora", None) is not None and self.lm.lora.dropout > 0

    def layout(self):
        return row_layout(ROW_KEYS)

    def denominator(self, batch):
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def loss(self, params, mb, ctx: Context):
        nll, _ = sft_loss_sums(self.lm, params, mb, logprobs_impl=self.logprobs_impl, dropout_key=ctx.key)
        return nll / jnp.maximum(ctx.denom, 1.0), {}

    def metrics(self, loss, sums, ctx: Context):
        return {"loss": loss, "tokens": ctx.denom}
