"""The process reward-model objective: a decoder with a scalar head (`ScalarHeadLM`) whose logit at the end of each
step of a solution predicts whether the step is right (Lightman et al. 2023; Math-Shepherd, Wang et al. 2024), and
the outcome reward model as its special case (one label per solution, at its last token; Cobbe et al. 2021).

Batch: `jaxpost.data.prm.STEP_KEYS` [A, b, T] rows of packed solutions (inputs, positions, segment_ids), 1 in
`step_mask` at each labelled step end and the label in `labels`. The loss is `jaxpost.losses.step_bce`'s sum over the
whole batch's labelled steps: exact under any micro-batch or device split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.batch import rows_sharding
from jaxpost.data.prm import STEP_KEYS
from jaxpost.losses import get_process_reward_loss
from jaxpost.sharding import replicated
from jaxpost.train.step import Context, Objective, row_layout


class ProcessReward(Objective):
    """Per-step binary cross-entropy (`loss`: a `PROCESS_REWARD_LOSSES` name) of a `ScalarHeadLM`'s logits at the
    labelled step ends. Metrics: `loss` (mean over labelled steps), `step_accuracy` (1[sigma(z) > 0.5] ==
    1[label > 0.5]), `mean_score` (mean sigma(z)), `mean_label`, `steps` (labelled steps in the batch)."""

    unit = "row"

    def __init__(self, model, *, loss: str = "step_bce", loss_kwargs: dict | None = None):
        self.model, self.loss_fn, self.kwargs = model, get_process_reward_loss(loss), dict(loss_kwargs or {})

    def layout(self):
        return row_layout(STEP_KEYS)

    def denominator(self, batch):
        return jnp.maximum(jnp.sum(batch["step_mask"].astype(jnp.float32)), 1.0)

    def loss(self, params, mb, ctx: Context):
        z_BT = self.model.values(params, mb["inputs"], mb["positions"], mb["segment_ids"])
        loss_sum, _ = self.loss_fn(z_BT, mb["labels"], mb["step_mask"], **self.kwargs)
        m_BT = mb["step_mask"].astype(jnp.float32)
        y_BT = mb["labels"].astype(jnp.float32)
        z_BT = jax.lax.stop_gradient(z_BT)
        hit_BT = ((z_BT > 0) == (y_BT > 0.5)).astype(jnp.float32)
        sums = {"step_accuracy": jnp.sum(hit_BT * m_BT), "mean_score": jnp.sum(jax.nn.sigmoid(z_BT) * m_BT),
                "mean_label": jnp.sum(y_BT * m_BT)}
        return loss_sum / ctx.denom, sums

    def metrics(self, loss, sums, ctx: Context):
        return {"loss": loss, "steps": ctx.denom, **{k: v / ctx.denom for k, v in sums.items()}}


def make_value_scorer(model, mesh, param_shardings, *, rows: int):
    """A jitted `score(params, batch) -> [rows, T]` float32 logits of the head at every position of one host batch
    of `STEP_KEYS` rows [rows, T] (the step labels are not read)."""
    keys = ("inputs", "positions", "segment_ids")
    in_sh = {k: rows_sharding(mesh, rows, 2, rows_axis=0) for k in keys}
    jitted = jax.jit(lambda p, b: model.values(p, b["inputs"], b["positions"], b["segment_ids"]),
                     in_shardings=(param_shardings, in_sh), out_shardings=replicated(mesh))

    def run(params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, {k: batch[k] for k in keys})

    return run
