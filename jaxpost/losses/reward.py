"""Reward-model losses: pure functions on the scalar rewards a reward head assigns to chosen / rejected completions."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jaxtyping import Array, Float

from jaxpost.losses.preference import LossOutput, _f32
from jaxpost.losses.registry import Registry


def bradley_terry(rewards_chosen_B: Float[Array, "B"], rewards_rejected_B: Float[Array, "B"], *,
                  margin_B: Float[Array, "B"] | None = None,
                  center_rewards_coefficient: float | None = None) -> LossOutput:
    """Bradley-Terry pairwise loss: loss = -log sigma(r_c - r_r - m) + c (r_c + r_r)^2.

    The reward-model objective of Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155, Eq. 1) under the Bradley-Terry
    model (1952); the optional margin m per pair is Llama 2's (Touvron et al. 2023, arXiv:2307.09288, Eq. 2), the
    optional centring term c (r_c + r_r)^2 is TRL's ``RewardConfig.center_rewards_coefficient`` (Eisenstein et al.
    2023, arXiv:2312.09244; TRL suggests 1e-2), which pulls rewards towards zero mean since the BT term only sees
    differences. As in TRL's ``RewardTrainer.compute_loss``, whose scalar is exactly mean(loss_B). Equal rewards and
    no margin give log 2.
    Metrics (TRL's names): ``chosen_rewards``, ``rejected_rewards``, ``margins = r_c - r_r``, ``accuracies``
    (1[r_c > r_r]), and ``center_penalty`` when centring is on.
    """
    rc_B, rr_B = _f32(rewards_chosen_B), _f32(rewards_rejected_B)
    diff_B = rc_B - rr_B
    if margin_B is not None:
        diff_B = diff_B - _f32(margin_B)
    loss_B = -jax.nn.log_sigmoid(diff_B)
    metrics = {"chosen_rewards": rc_B, "rejected_rewards": rr_B, "margins": rc_B - rr_B,
               "accuracies": (rc_B > rr_B).astype(rc_B.dtype)}
    if center_rewards_coefficient is not None:
        penalty_B = center_rewards_coefficient * (rc_B + rr_B) ** 2
        loss_B = loss_B + penalty_B
        metrics["center_penalty"] = penalty_B
    return loss_B, jax.tree.map(jax.lax.stop_gradient, metrics)


REWARD_LOSSES = Registry("reward loss", {"bradley_terry": bradley_terry})
"""Uniform call: ``f(rewards_chosen_B, rewards_rejected_B, **hyperparameters)``."""


def get_reward_loss(name: str) -> Callable[..., LossOutput]:
    return REWARD_LOSSES.get(name)


