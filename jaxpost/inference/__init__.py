"""Test-time scaling: selection among samples (`select`), a forkable KV-cache decode state (`decode`), scorers
(`scorers`: PRM, ORM, verifier), the searches (`search`: best-of-N / voting, beam search, PRM-guided step search,
budget forcing) and their compute accounting (`flops`)."""

from jaxpost.inference.decode import DecodeState, Decoder, Extension
from jaxpost.inference.flops import decode_flops, forward_flops, non_embedding_params
from jaxpost.inference.scorers import (HeadScorer, LikelihoodScorer, likelihood_step_scorer, orm_scorer,
                                       prm_step_scorer, verifier_scorer)
from jaxpost.inference.search import SearchResult, beam_search, budget_forcing, sample_and_select, step_search
from jaxpost.inference.select import (AGGREGATIONS, aggregate_ragged, aggregate_steps, best_of_n, majority_vote,
                                      split_steps, weighted_best_of_n, weighted_majority)

__all__ = ["AGGREGATIONS", "DecodeState", "Decoder", "Extension", "HeadScorer", "LikelihoodScorer", "SearchResult",
           "aggregate_ragged", "aggregate_steps", "beam_search", "best_of_n", "budget_forcing", "decode_flops",
           "forward_flops", "likelihood_step_scorer", "majority_vote", "non_embedding_params", "orm_scorer",
           "prm_step_scorer", "sample_and_select", "split_steps", "step_search", "verifier_scorer",
           "weighted_best_of_n", "weighted_majority"]
