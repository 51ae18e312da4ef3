"""Pure, model-free losses on arrays. Each returns an unreduced sum and its denominator, or per-example values."""

from jaxpost.losses.preference import (
    BATCH_LEVEL_DPO_LOSSES,
    DPO_LOSSES,
    REFERENCE_FREE_LOSSES,
    UNPAIRED_LOSSES,
    apo_zero_unpaired,
    bco_update_delta,
    dpo_aot,
    dpo_aot_unpaired,
    dpo_apo_down,
    dpo_apo_zero,
    dpo_bco_pair,
    dpo_discopop,
    dpo_exo_pair,
    dpo_hinge,
    dpo_ipo,
    dpo_nca_pair,
    dpo_robust,
    dpo_sigmoid,
    dpo_sigmoid_norm,
    dpo_sppo_hard,
    get_dpo_loss,
    get_reference_free_loss,
    get_unpaired_loss,
    kto,
    kto_kl_baseline,
    kto_kl_sums,
    orpo,
    simpo,
)
from jaxpost.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    SEQUENCE_LEVEL_ESTIMATORS,
    TOKEN_LEVEL_ESTIMATORS,
    broadcast_to_tokens,
    dr_grpo,
    dynamic_sampling_keep,
    gae,
    get_advantage_estimator,
    grpo,
    masked_whiten,
    overlong_penalty,
    reinforce_pp,
    rloo,
    sequence_to_token_rewards,
)
from jaxpost.losses.kl import (
    KL_ESTIMATORS,
    get_kl_estimator,
    k1,
    k2,
    k3,
    kl_loss,
    kl_penalty_sequence_rewards,
    kl_penalty_token_rewards,
)
from jaxpost.losses.policy import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate_loss,
    entropy_bonus,
    get_loss_aggregation,
    get_policy_loss,
    gspo,
    gspo_seq,
    loss_denominator,
    metric_means,
    ppo_clip,
    reinforce,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
    value_loss,
)
from jaxpost.losses.reward import REWARD_LOSSES, bradley_terry, get_reward_loss
from jaxpost.losses.sft import sft_nll

__all__ = [
    "sft_nll",
    # preference optimisation
    "DPO_LOSSES", "BATCH_LEVEL_DPO_LOSSES", "get_dpo_loss",
    "dpo_sigmoid", "dpo_robust", "dpo_hinge", "dpo_ipo", "dpo_sigmoid_norm", "dpo_exo_pair", "dpo_nca_pair",
    "dpo_bco_pair", "bco_update_delta", "dpo_sppo_hard", "dpo_aot", "dpo_aot_unpaired", "dpo_apo_zero",
    "dpo_apo_down", "dpo_discopop",
    "REFERENCE_FREE_LOSSES", "get_reference_free_loss", "simpo", "orpo",
    "UNPAIRED_LOSSES", "get_unpaired_loss", "kto", "apo_zero_unpaired", "kto_kl_sums", "kto_kl_baseline",
    # reward models
    "REWARD_LOSSES", "get_reward_loss", "bradley_terry",
    # policy-gradient RL: advantages, reward shaping
    "ADVANTAGE_ESTIMATORS", "SEQUENCE_LEVEL_ESTIMATORS", "TOKEN_LEVEL_ESTIMATORS", "get_advantage_estimator",
    "grpo", "dr_grpo", "rloo", "reinforce_pp", "gae", "masked_whiten", "broadcast_to_tokens",
    "sequence_to_token_rewards", "overlong_penalty", "dynamic_sampling_keep",
    # policy-gradient RL: losses and their aggregation
    "POLICY_LOSSES", "get_policy_loss", "ppo_clip", "gspo", "gspo_seq", "reinforce", "value_loss", "entropy_bonus",
    "LOSS_AGGREGATIONS", "get_loss_aggregation", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
    "loss_denominator", "aggregate_loss", "metric_means",
    # KL to the reference
    "KL_ESTIMATORS", "get_kl_estimator", "k1", "k2", "k3", "kl_loss", "kl_penalty_token_rewards",
    "kl_penalty_sequence_rewards",
]
