"""Generation: decoding over the trainer's own (sharded) params."""

from jaxpost.rollout.greedy import greedy_generate

__all__ = ["greedy_generate"]
