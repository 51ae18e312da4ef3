"""Forward FLOPs of the decoder, so that test-time scaling methods compare at equal compute.

Per processed token of a decoder with L layers, H query heads of size hd (d_attn = H * hd), D model width and V
vocabulary (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1, forward pass only):

    2 * N_ne                      the matmuls of every non-embedding parameter (N_ne: attention, MLP, norms)
    + 2 * 2 * L * d_attn * c      attention scores QK^T and the weighted sum PV against c keys
    + 2 * D * V                   the output logits (generators only; a scalar head costs 2 * D, ignored)

where c is the number of keys the token attends to (its position + 1 under a KV cache). Sums over tokens are
exact given the total number of keys attended (`decode_flops`: n tokens at positions start .. start + n - 1 attend
n * start + n (n + 1) / 2 keys). Only useful tokens are counted: padding rows, finished rows that idle in a batch
and recomputed pending tokens are not, so the figures do not depend on batch buckets.
"""

from __future__ import annotations

from jaxpost.config import ModelConfig


def non_embedding_params(cfg: ModelConfig) -> int:
    """N_ne: every parameter except the embedding table and the output matrix."""
    return cfg.n_params - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def forward_flops(cfg: ModelConfig, n_tokens: float, context: float, *, logits: bool = True) -> float:
    """FLOPs of the forward pass of `n_tokens` tokens that attend to `context` keys each on average:
    n_tokens * (2 N_ne + 4 L d_attn context + [logits] 2 D V)."""
    per_token = 2.0 * non_embedding_params(cfg) + (2.0 * cfg.d_model * cfg.vocab_size if logits else 0.0)
    attention = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
    return float(n_tokens) * (per_token + attention)


def decode_flops(cfg: ModelConfig, start: int, n: int, *, logits: bool = True) -> float:
    """FLOPs of forwarding n tokens at positions start, ..., start + n - 1 (a prefill: start = 0; the n-th new
    token of a decode from a context of c tokens is produced by forwarding the token at position c + n - 2)."""
    if n <= 0:
        return 0.0
    keys = n * start + n * (n + 1) / 2
    return forward_flops(cfg, n, keys / n, logits=logits)
