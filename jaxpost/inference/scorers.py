"""Scorers: what guides a search or reranks samples.

A scorer is a callable `scorer(prompts, steps) -> scores`: `prompts` a list of R token arrays, `steps` a list of R
candidates, each a list of step token arrays (a step is a line ending with the delimiter; the last one may be
unfinished or end with the end-of-sequence token), and `scores` a list of R float arrays, one score per step (an
outcome scorer returns one score, for the last step). It may carry `flops(prompts, steps) -> float`, the forward
FLOPs of one call (`jaxpost.inference.flops`); a host function costs none.

- `prm_step_scorer`: a process reward model (`ScalarHeadLM`), sigmoid of its value at each step's last token (the
  delimiter, or the last token of an unfinished final step), all rows in one jitted call.
- `orm_scorer`: an outcome reward model, sigmoid of its value at the last token.
- `likelihood_step_scorer`: a language model's own probabilities as a training-free step verifier (the least
  likely token of each step, or the step's geometric-mean token probability).
- `verifier_scorer`: a host reward function on decoded text (e.g. the task's checker): an oracle, for upper bounds
  and best-of-N with a verifier only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxpost.inference.flops import decode_flops
from jaxpost.sharding import ACTIVATION_RULES, logical_to_spec

Steps = Sequence[Sequence[np.ndarray]]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class _RowScorer:
    """Rows of prompt + steps, right-padded to a power-of-two length bucket (>= `min_len`), the batch to a power of
    two (>= the data-parallel devices of `mesh`), through one jitted `_score(params, tokens, positions, segments)`
    -> per-token values [R, T] per bucket; subclasses turn the values into per-step scores (`_per_step`)."""

    def __init__(self, model, params, *, mesh=None, pad_id: int = 0, min_len: int = 16):
        self.model, self.params, self.mesh = model, params, mesh
        self.pad_id, self.min_len = int(pad_id), int(min_len)
        self.traces = 0

    @property
    def _dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _put(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), ACTIVATION_RULES, self.mesh, x.shape)
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _values(self, prompts, steps) -> np.ndarray:
        """float64 [R, T] values of the rows (prompt + steps from position 0; padding after)."""
        lens = [len(p) + sum(len(s) for s in st) for p, st in zip(prompts, steps)]
        R = max(_pow2_at_least(len(prompts)), self._dp)
        R = -(-R // self._dp) * self._dp
        T = _pow2_at_least(max(max(lens), self.min_len))
        tokens_RT = np.full((R, T), self.pad_id, np.int32)
        segment_RT = np.zeros((R, T), np.int32)
        for r, (p, st) in enumerate(zip(prompts, steps)):
            row = np.concatenate([np.asarray(p, np.int32).reshape(-1)] + [np.asarray(s, np.int32) for s in st])
            tokens_RT[r, :len(row)] = row
            segment_RT[r, :len(row)] = 1
        positions_RT = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T)).copy()
        args = [self._put(a) for a in (tokens_RT, positions_RT, segment_RT)]
        if self.mesh is None:
            return np.asarray(self._jitted(self.params, *args), np.float64)
        with jax.set_mesh(self.mesh):
            return np.asarray(self._jitted(self.params, *args), np.float64)

    def __call__(self, prompts: Sequence[np.ndarray], steps: Steps) -> list[np.ndarray]:
        if len(prompts) == 0:
            return []
        v_RT = self._values(prompts, steps)
        out = []
        for r, (p, st) in enumerate(zip(prompts, steps)):
            bounds = len(p) + np.concatenate([[0], np.cumsum([len(s) for s in st])]).astype(np.int64)
            out.append(self._per_step(v_RT[r], bounds) if st else np.zeros(0))
        return out

    def flops(self, prompts: Sequence[np.ndarray], steps: Steps) -> float:
        """Forward FLOPs of scoring these rows: every token of prompt + steps once, without logits."""
        cfg = self.model.cfg
        return sum(decode_flops(cfg, 0, len(p) + sum(len(s) for s in st), logits=False)
                   for p, st in zip(prompts, steps))


class HeadScorer(_RowScorer):
    """Sigmoid (or raw) values of a `ScalarHeadLM` at the last token of every step (`per_step=True`: a PRM) or at
    the last token only (an ORM); one compiled program per bucket."""

    def __init__(self, model, params, *, per_step: bool, mesh=None, pad_id: int = 0, sigmoid: bool = True,
                 min_len: int = 16):
        super().__init__(model, params, mesh=mesh, pad_id=pad_id, min_len=min_len)
        self.per_step, self.sigmoid = per_step, bool(sigmoid)

        def run(params, tokens_RT, positions_RT, segment_RT):
            self.traces += 1
            v_RT = model.values(params, tokens_RT, positions_RT, segment_RT)
            return jax.nn.sigmoid(v_RT) if sigmoid else v_RT

        self._jitted = jax.jit(run)

    def _per_step(self, v_T, bounds):
        ends = bounds[1:] - 1  # each step's last token
        return v_T[ends] if self.per_step else v_T[ends[-1:]]


class LikelihoodScorer(_RowScorer):
    """A language model as a training-free step verifier: a step's score is the probability the model gives the
    step's least likely token ("min"; a wrong digit in a worked line is one unlikely token) or its geometric-mean
    token probability ("mean"), each token scored given everything before it (`lm.token_logprobs`)."""

    def __init__(self, lm, params, *, how: str = "min", mesh=None, pad_id: int = 0, min_len: int = 16):
        if how not in ("min", "mean"):
            raise ValueError(f"LikelihoodScorer: how must be 'min' or 'mean', got {how!r}")
        super().__init__(lm, params, mesh=mesh, pad_id=pad_id, min_len=min_len)
        self.how = how

        def run(params, tokens_RT, positions_RT, segment_RT):
            self.traces += 1
            h_RTD = lm.hidden(params, tokens_RT, positions_RT, segment_RT)
            targets_RT = jnp.concatenate([tokens_RT[:, 1:], tokens_RT[:, -1:]], axis=1)
            logp_RT = lm.token_logprobs(params, h_RTD, targets_RT).logp  # [r, t]: log p(token t + 1 | ..t)
            return jnp.concatenate([jnp.zeros_like(logp_RT[:, :1]), logp_RT[:, :-1]], axis=1)  # [r, t]: token t

        self._jitted = jax.jit(run)

    def _per_step(self, logp_T, bounds):
        parts = [logp_T[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return np.exp([p.min() if self.how == "min" else p.mean() for p in parts])


def prm_step_scorer(model, params, delimiter_id: int | None = None, *, mesh=None, pad_id: int = 0,
                    sigmoid: bool = True) -> HeadScorer:
    """A process reward model as a step scorer: sigmoid(value) at each step's last token, i.e. at its delimiter,
    or at the last token of an unfinished final step. `delimiter_id` is documentation of the steps' convention
    (the caller splits completions with `split_steps(tokens, delimiter_id)`); scores are probabilities that the
    solution is still correct after the step (Lightman et al. 2023; Wang et al. 2024, Math-Shepherd)."""
    del delimiter_id
    return HeadScorer(model, params, per_step=True, mesh=mesh, pad_id=pad_id, sigmoid=sigmoid)


def orm_scorer(model, params, *, mesh=None, pad_id: int = 0, sigmoid: bool = True) -> HeadScorer:
    """An outcome reward model (Bradley-Terry, `jaxpost.losses.reward`): sigmoid(value) at the last token, one score
    per candidate (sigmoid keeps the ranking and makes the scores usable as weights)."""
    return HeadScorer(model, params, per_step=False, mesh=mesh, pad_id=pad_id, sigmoid=sigmoid)


def likelihood_step_scorer(lm, params, *, how: str = "min", mesh=None, pad_id: int = 0) -> LikelihoodScorer:
    """A language model (`LM`, e.g. a larger sibling of the policy) as a step scorer: each step scores the
    probability of its least likely token (`how="min"`) or its geometric-mean token probability ("mean")."""
    return LikelihoodScorer(lm, params, how=how, mesh=mesh, pad_id=pad_id)


def verifier_scorer(fn: Callable[[str, str], float], decode: Callable[[np.ndarray], str]):
    """A host reward function on text as a scorer: one score per candidate, fn(decode(prompt), decode(completion)).
    E.g. `lambda p, c: float(task.check(c, answer_of[p]))`: an oracle (it knows the answer)."""

    def score(prompts: Sequence[np.ndarray], steps: Steps) -> list[np.ndarray]:
        out = []
        for p, st in zip(prompts, steps):
            completion = np.concatenate([np.asarray(s, np.int32) for s in st]) if st else np.zeros(0, np.int32)
            out.append(np.array([float(fn(decode(np.asarray(p)), decode(completion)))]))
        return out

    return score
