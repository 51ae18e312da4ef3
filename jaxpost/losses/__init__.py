"""Pure, model-free losses on arrays. Each returns an unreduced sum and its denominator, or per-example values."""

from jaxpost.losses.sft import sft_nll

__all__ = ["sft_nll"]
