"""Numerical cores shared by every loss: `token_logprobs` is the one entry to the log-prob/entropy computation."""

from jaxpost.ops.logprobs import IMPLS, TokenLogprobs, default_impl, token_log_sum_sq_probs, token_logprobs

__all__ = ["IMPLS", "TokenLogprobs", "default_impl", "token_log_sum_sq_probs", "token_logprobs"]
