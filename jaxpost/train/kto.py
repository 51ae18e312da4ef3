"""The KTO objective (unpaired desirable / undesirable completions; `jaxpost.losses.kto`, `apo_zero_unpaired`).

Batches come from `jaxpost.data.build_kto_iterator`: rows [b, T] with `label` (1 desirable) and `example_mask`,
plus the KL rows `kl_*` (prompt i with the completion of example i+1), on which KTO estimates its reference point
z0 = max(0, mean(pi(y'|x) - ref(y'|x))), detached.

z0 is a statistic of the whole step's batch. The step computes it first, in a forward-only pass of the policy and the
reference over every micro-batch's KL rows (a global sum / count, so every device and micro-batch sees the same
z0), then the gradient pass uses it: the loss sum(loss_B * mask) / (real examples in the batch) is then exactly the
full-batch loss under any micro-batch or device split. (TRL re-estimates z0 per micro-batch.)

Reference log-probs come from a frozen reference model held beside the policy (`reference="model"`) or are
precomputed (`reference="precomputed"`: the batch carries `ref_logps` [A, b] and `ref_kl_logps` [A, b]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.batch import ROW_KEYS
from jaxpost.losses import get_unpaired_loss, kto_kl_baseline, kto_kl_sums
from jaxpost.train.dpo import masked_sums, reference_param_shardings, reference_sequence_logps, sequence_logps
from jaxpost.train.step import Context, Objective, row_layout

KL_KEYS = tuple("kl_" + k for k in ROW_KEYS)


def _rows(mb: dict, kl: bool) -> dict:
    """The example rows of a micro-batch, or its KL rows (prompt i with the completion of example i + 1)."""
    return {k: mb[("kl_" if kl else "") + k] for k in ROW_KEYS}


class Unpaired(Objective):
    """An unpaired loss (`loss`: an `UNPAIRED_LOSSES` name: kto, apo_zero_unpaired; hyperparameters `loss_kwargs`).
    The step is `step(state, ref_params, batch)`; batch: ROW_KEYS and KL_KEYS [A, b, T], `label` and
    `example_mask` [A, b] (and `ref_logps`, `ref_kl_logps` [A, b] with reference="precomputed"). ref_params: the
    frozen reference params with reference="model"; for a LoRA model, None means its base model (adapters disabled).
    Metrics: `loss`, `examples`, `kl` (z0), `rewards`, `chosen_rewards`, `rejected_rewards`, `margins`."""

    unit = "example"
    with_reference = True

    def __init__(self, lm, *, loss: str = "kto", loss_kwargs: dict | None = None, reference: str = "model",
                 logprobs_impl: str = "auto"):
        if reference not in ("model", "precomputed"):
            raise ValueError(f"KTO needs reference log-probs: reference='model' or 'precomputed', got {reference!r}")
        self.loss_fn = get_unpaired_loss(loss)
        self.lm, self.kwargs, self.reference, self.logprobs_impl = lm, dict(loss_kwargs or {}), reference, logprobs_impl

    def layout(self):
        vectors = ("label", "example_mask") + (("ref_logps", "ref_kl_logps") if self.reference == "precomputed"
                                               else ())
        return {**row_layout(ROW_KEYS + KL_KEYS), **{k: (1, 2) for k in vectors}}

    def reference_shardings(self, param_shardings):
        return reference_param_shardings(self.lm, self.reference, param_shardings)

    def denominator(self, batch):
        return jnp.maximum(jnp.sum(batch["example_mask"].astype(jnp.float32)), 1.0)

    def _logps(self, params, mb, kl: bool):
        return sequence_logps(self.lm, params, _rows(mb, kl), logprobs_impl=self.logprobs_impl)[0]

    def _ref_logps(self, params, ref_params, mb, kl: bool):
        if self.reference == "precomputed":
            return mb["ref_kl_logps" if kl else "ref_logps"]
        return reference_sequence_logps(self.lm, params, ref_params, _rows(mb, kl), logprobs_impl=self.logprobs_impl)

    def prepare(self, params, ref_params, batch):
        """z0 of the whole batch: a forward-only pass of the policy and the reference over every micro-batch's KL
        rows (a global sum / count, so every device and micro-batch sees the same z0)."""
        def kl_sums(mb):
            return kto_kl_sums(self._logps(params, mb, True), self._ref_logps(params, ref_params, mb, True),
                               mask_B=mb["example_mask"])

        kl_sum, kl_count = jax.lax.map(kl_sums, batch)
        return kto_kl_baseline(jnp.sum(kl_sum), jnp.sum(kl_count))

    def loss(self, params, mb, ctx: Context):
        pi_B = self._logps(params, mb, False)
        ref_B = jax.lax.stop_gradient(self._ref_logps(params, ctx.ref_params, mb, False).astype(jnp.float32))
        loss_B, metrics = self.loss_fn(pi_B, ref_B, mb["label"] > 0, kl=ctx.stats, **self.kwargs)
        m_B = mb["example_mask"].astype(jnp.float32)
        return jnp.sum(loss_B * m_B) / ctx.denom, masked_sums(metrics, m_B)

    def metrics(self, loss, sums, ctx: Context):
        n = ctx.denom
        n_des = jnp.maximum(sums.get("desirable", 0.0), 1.0)
        n_und = jnp.maximum(n - sums.get("desirable", 0.0), 1.0)
        out = {"loss": loss, "examples": n, "kl": ctx.stats, "rewards": sums["rewards"] / n,
               "chosen_rewards": sums["chosen_rewards"] / n_des, "rejected_rewards": sums["rejected_rewards"] / n_und}
        out["margins"] = out["chosen_rewards"] - out["rejected_rewards"]
        return out
