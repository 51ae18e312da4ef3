"""Process (and outcome) reward-model losses: pure functions on the logits a scalar head gives at step ends."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxpost.losses.registry import Registry


def step_bce(logits_BT: Float[Array, "B T"], labels_BT: Float[Array, "B T"], step_mask_BT: Float[Array, "B T"]
             ) -> tuple[jax.Array, jax.Array]:
    """Per-step binary cross-entropy of a reward head's logits: (summed loss, number of labelled steps).

        loss = sum_{b,t} m_bt * -[y_bt log sigma(z_bt) + (1 - y_bt) log sigma(-z_bt)],   denominator = sum_{b,t} m_bt

    z_bt is the head's logit at position t of row b, m_bt marks the positions that end a labelled step (the
    step-delimiter token) and y_bt in [0, 1] is that step's label: hard 0/1 (a human's verdict, Lightman et al. 2023,
    "Let's Verify Step by Step", arXiv:2305.20050; or Math-Shepherd's "some Monte-Carlo completion of this prefix
    reaches the right answer", Wang et al. 2024, arXiv:2312.08935) or soft (Math-Shepherd's fraction of completions
    that do). The summand is the cross-entropy of the Bernoulli(sigma(z)) prediction, so a zero logit costs log 2
    for any label, and its minimum over z for a soft label y is the entropy of Bernoulli(y), not 0.

    The outcome reward model (ORM) is the special case with one label per solution, its correctness, at the
    solution's last token (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168,
    whose verifier also reads that token at test time; they additionally train every token on the outcome label,
    which is this loss with m = 1 on every completion token).

    Log-sigmoids and the sums are float32. The caller divides the sum by the global number of labelled steps (summed
    over every micro-batch and device), so any split of the batch gives the global step mean.
    """
    z_BT = logits_BT.astype(jnp.float32)
    y_BT = labels_BT.astype(jnp.float32)
    m_BT = step_mask_BT.astype(jnp.float32)
    nll_BT = -(y_BT * jax.nn.log_sigmoid(z_BT) + (1.0 - y_BT) * jax.nn.log_sigmoid(-z_BT))
    return jnp.sum(jnp.where(m_BT > 0, nll_BT * m_BT, 0.0)), jnp.sum(m_BT)


PROCESS_REWARD_LOSSES = Registry("process reward loss", {"step_bce": step_bce})
"""Uniform call: ``f(logits_BT, labels_BT, step_mask_BT, **hyperparameters) -> (loss sum, labelled steps)``."""


def get_process_reward_loss(name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    return PROCESS_REWARD_LOSSES.get(name)
