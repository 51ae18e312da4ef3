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
]
