"""Generation over the trainer's own (sharded) params: the compiled KV-cache sampler, the RL batch layout of its
rollouts, and greedy decoding by full recomputation (the reference the sampler is tested against)."""

from jaxpost.rollout.batch import ROLLOUT_BATCH_KEYS, rollout_batch
from jaxpost.rollout.greedy import greedy_generate
from jaxpost.rollout.sampler import (FINISH_REASONS, Rollout, Sampler, SamplingConfig, sample_logits,
                                     score_logprobs)

__all__ = ["FINISH_REASONS", "ROLLOUT_BATCH_KEYS", "Rollout", "Sampler", "SamplingConfig", "greedy_generate",
           "rollout_batch", "sample_logits", "score_logprobs"]
