"""Selection among sampled candidates: pure host functions on arrays and lists, no model.

Shapes: P prompts, N candidates per prompt, S steps per candidate.

- `aggregate_steps`: one score per candidate from a process reward model's per-step scores (last / min / prod /
  mean; Lightman et al. 2023 use the product, search-and-learn (Beeching et al. 2024) the last step's score).
- `best_of_n`: the candidate with the highest score (a verifier / reward model reranks N samples; Cobbe et al. 2021).
- `majority_vote`: the most frequent final answer (self-consistency, Wang et al. 2022).
- `weighted_majority` / `weighted_best_of_n`: answers grouped, their weights summed, the answer with the largest sum
  wins (Li et al. 2023, "Making Large Language Models Better Reasoners with Step-Aware Verifier"; search-and-learn's
  "weighted best-of-N" uses the reward model's scores as weights).

Conventions, the same in every function:
- Ties are broken deterministically by first occurrence: the lowest candidate index, or, between answers, the
  answer whose first occurrence comes first.
- A missing answer (None, e.g. no "Answer: N" line could be parsed) never wins unless every candidate's answer is
  missing; then the selected answer is None (and the index the best-scoring candidate, or 0 for a plain vote).
- NaN scores count as -inf.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

AGGREGATIONS: tuple[str, ...] = ("last", "min", "prod", "mean")


def aggregate_steps(step_scores_NS, step_mask_NS, how: str = "last") -> np.ndarray:
    """One float64 score [N] per candidate from per-step scores [N, S] (probabilities in [0, 1] for a PRM) and a
    mask [N, S] of the steps a candidate has (its steps need not be contiguous; "last" takes the last True one).

        last:  s_{N, last}                 the score after the final step (search-and-learn's default)
        min:   min_s s_{N, s}              a chain is as good as its weakest step (Wang et al. 2024, Math-Shepherd)
        prod:  prod_s s_{N, s}             the probability that every step is correct if the steps' correctness
                                           were independent (Lightman et al. 2023); computed as exp(sum_s log s)
                                           with s clipped to >= 1e-30, returned as the product (not its log)
        mean:  sum_s s_{N, s} / #steps

    A candidate with no steps gets -inf under every aggregation, so it never beats a scored one.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregate_steps: how must be one of {AGGREGATIONS}, got {how!r}")
    s_NS = np.asarray(step_scores_NS, np.float64)
    m_NS = np.asarray(step_mask_NS, bool)
    if s_NS.ndim != 2 or s_NS.shape != m_NS.shape:
        raise ValueError(f"aggregate_steps: scores and mask must both be [N, S], got {s_NS.shape}, {m_NS.shape}")
    s_NS = np.where(np.isnan(s_NS), -np.inf, s_NS)
    n_N = m_NS.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if how == "last":
            last_N = s_NS.shape[1] - 1 - np.argmax(m_NS[:, ::-1], axis=1)
            out_N = s_NS[np.arange(s_NS.shape[0]), last_N]
        elif how == "min":
            out_N = np.min(np.where(m_NS, s_NS, np.inf), axis=1, initial=np.inf)
        elif how == "prod":
            out_N = np.exp(np.sum(np.where(m_NS, np.log(np.maximum(s_NS, 1e-30)), 0.0), axis=1))
        else:
            out_N = np.sum(np.where(m_NS, s_NS, 0.0), axis=1) / np.maximum(n_N, 1)
    return np.where(n_N > 0, out_N, -np.inf)


def aggregate_ragged(step_scores: Sequence[Sequence[float]], how: str = "last") -> np.ndarray:
    """`aggregate_steps` of a list of per-candidate step-score lists of any lengths (empty lists give -inf)."""
    S = max([len(s) for s in step_scores] + [1])
    s_NS = np.zeros((len(step_scores), S))
    m_NS = np.zeros((len(step_scores), S), bool)
    for i, s in enumerate(step_scores):
        s_NS[i, :len(s)] = s
        m_NS[i, :len(s)] = True
    return aggregate_steps(s_NS, m_NS, how)


def best_of_n(scores_PN) -> np.ndarray:
    """Index [P] of the highest-scoring candidate of each prompt (ties: the lowest index; NaN counts as -inf)."""
    s_PN = np.asarray(scores_PN, np.float64)
    if s_PN.ndim != 2 or s_PN.shape[1] == 0:
        raise ValueError(f"best_of_n: scores must be [P, N] with N >= 1, got {s_PN.shape}")
    return np.argmax(np.where(np.isnan(s_PN), -np.inf, s_PN), axis=1)  # argmax returns the first maximum


def weighted_majority(answers_PN: Sequence[Sequence[Hashable | None]], weights_PN
                      ) -> tuple[list[Hashable | None], np.ndarray]:
    """(answer, index) per prompt (answers and weights [P][N]; N may differ between prompts): the answer whose
    candidates' weights sum highest, sum_n w_n [a_n = a], and the index of its highest-weighted candidate (ties: the
    lowest index). Ties between answers go to the answer that
    occurs first. Missing answers (None) never win unless all are missing (then None, and the index of the
    highest-weighted candidate). NaN weights count as -inf (an answer with one is never chosen over a finite one).
    """
    if len(answers_PN) != len(weights_PN):
        raise ValueError(f"weighted_majority: {len(answers_PN)} prompts of answers, {len(weights_PN)} of weights")
    chosen, index = [], np.zeros(len(answers_PN), np.int64)
    for p, answers in enumerate(answers_PN):
        w_N = np.asarray(weights_PN[p], np.float64).reshape(-1)
        w_N = np.where(np.isnan(w_N), -np.inf, w_N)
        if len(answers) != len(w_N) or not len(w_N):
            raise ValueError(f"weighted_majority: prompt {p} has {len(answers)} answers for {len(w_N)} weights")
        totals: dict = {}  # insertion order = order of first occurrence
        for a, w in zip(answers, w_N):
            if a is not None:
                totals[a] = totals.get(a, 0.0) + w
        if not totals:
            chosen.append(None)
            index[p] = int(np.argmax(w_N))
            continue
        best = max(totals.values())
        answer = next(a for a, t in totals.items() if t == best)
        members = [n for n, a in enumerate(answers) if a == answer]
        index[p] = members[int(np.argmax(w_N[members]))]
        chosen.append(answer)
    return chosen, index


def weighted_best_of_n(answers_PN: Sequence[Sequence[Hashable | None]], scores_PN
                       ) -> tuple[list[Hashable | None], np.ndarray]:
    """Weighted best-of-N (search-and-learn; Li et al. 2023): `weighted_majority` with the reward model's scores as
    weights, argmax_a sum_n score_n [a_n = a]; the index is the best-scoring candidate with that answer."""
    return weighted_majority(answers_PN, scores_PN)


def majority_vote(answers_PN: Sequence[Sequence[Hashable | None]]) -> tuple[list[Hashable | None], np.ndarray]:
    """Self-consistency (Wang et al. 2022): the most frequent non-missing answer per prompt (ties: the answer that
    occurs first) and the index of its first occurrence; (None, 0) when every answer is missing."""
    return weighted_majority(answers_PN, [np.ones(len(a)) for a in answers_PN])


def split_steps(tokens: Sequence[int], delimiter_id: int | Sequence[int]) -> list[np.ndarray]:
    """The steps of a completion: maximal runs of tokens each ending with a delimiter (`delimiter_id`: one id or
    several, e.g. every piece holding a newline; kept), the last run possibly without one (an unfinished or final
    step). An empty completion has no steps."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    ends = list(np.nonzero(np.isin(tokens, np.asarray(delimiter_id, np.int32).reshape(-1)))[0] + 1)
    if not ends or ends[-1] != len(tokens):
        ends.append(len(tokens))
    starts = [0] + ends[:-1]
    return [tokens[a:b] for a, b in zip(starts, ends) if b > a]
