"""Numerical cores shared by every loss: `token_logprobs` is the one entry to the log-prob/entropy computation."""

from jaxpost.ops.kl import KINDS, KL_IMPLS, default_kl_impl, token_kl, token_kl_loss, token_kl_topk
from jaxpost.ops.logprobs import IMPLS, TokenLogprobs, default_impl, token_log_sum_sq_probs, token_logprobs

__all__ = ["IMPLS", "KINDS", "KL_IMPLS", "TokenLogprobs", "default_impl", "default_kl_impl", "token_kl",
           "token_kl_loss", "token_kl_topk", "token_log_sum_sq_probs", "token_logprobs"]
