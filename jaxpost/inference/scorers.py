"""Scorers: what guides a search or reranks samples.

A scorer is a callable `scorer(prompts, steps) -> scores`: `prompts` a list of R token arrays, `steps` a list of R
candidates, each a list of step token arrays (a step is a line ending with the delimiter; the last one may be
unfinished or end with the end-of-sequence token), and `scores` a list of R float arrays, one score per step (an
outcome scorer returns one score, for the last step). It may carry `flops(prompts, steps) -> float`, the forward
FLOPs of one call (`jaxpost.inference.flops`); a host function costs none.

- `prm_step_scorer`: a process reward model (`ScalarHeadLM`), sigmoid of its value at each step's last token (the
  delimiter, or the last token of an unfinished final step), all rows in one jitted call.
- `orm_scorer`: an outcome reward model, sigmoid of its value at the last token.
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


class HeadScorer:
    """Sigmoid (or raw) values of a `ScalarHeadLM` at the last token of every step (`per_step=True`: a PRM) or at
    the last token only (an ORM). Rows are right-padded to a power-of-two length bucket (>= `min_len`), the batch to
    a power of two (>= the data-parallel devices of `mesh`); one compiled program per bucket."""

    def __init__(self, model, params, *, per_step: bool, mesh=None, pad_id: int = 0, sigmoid: bool = True,
                 min_len: int = 16):
        self.model, self.params, self.per_step, self.mesh = model, params, per_step, mesh
        self.pad_id, self.sigmoid, self.min_len = int(pad_id), bool(sigmoid), int(min_len)
        self.traces = 0

        def run(params, tokens_RT, positions_RT, segment_RT, idx_RS):
            self.traces += 1
            v_RT = model.values(params, tokens_RT, positions_RT, segment_RT)
            v_RS = jnp.take_along_axis(v_RT, idx_RS, axis=1)
            return jax.nn.sigmoid(v_RS) if sigmoid else v_RS

        self._jitted = jax.jit(run)

    @property
    def _dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _put(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), ACTIVATION_RULES, self.mesh, x.shape)
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def __call__(self, prompts: Sequence[np.ndarray], steps: Steps) -> list[np.ndarray]:
        n = len(prompts)
        if n == 0:
            return []
        lens = [len(p) + sum(len(s) for s in st) for p, st in zip(prompts, steps)]
        n_steps = [max(len(st), 1) if self.per_step else 1 for st in steps]
        R = max(_pow2_at_least(n), self._dp)
        R = -(-R // self._dp) * self._dp
        T = _pow2_at_least(max(max(lens), self.min_len))
        S = _pow2_at_least(max(n_steps))
        tokens_RT = np.full((R, T), self.pad_id, np.int32)
        segment_RT = np.zeros((R, T), np.int32)
        idx_RS = np.zeros((R, S), np.int32)
        for r, (p, st) in enumerate(zip(prompts, steps)):
            row = np.concatenate([np.asarray(p, np.int32).reshape(-1)] + [np.asarray(s, np.int32) for s in st])
            tokens_RT[r, :len(row)] = row
            segment_RT[r, :len(row)] = 1
            ends = np.cumsum([len(s) for s in st]) + len(p) - 1 if st else np.array([len(p) - 1])
            idx_RS[r, :n_steps[r]] = ends if self.per_step else ends[-1:]
        positions_RT = np.broadcast_to(np.arange(T, dtype=np.int32), (R, T)).copy()
        args = [self._put(a) for a in (tokens_RT, positions_RT, segment_RT, idx_RS)]
        if self.mesh is None:
            v_RS = self._jitted(self.params, *args)
        else:
            with jax.set_mesh(self.mesh):
                v_RS = self._jitted(self.params, *args)
        v_RS = np.asarray(v_RS, np.float64)
        return [v_RS[r, :len(steps[r]) if self.per_step else 1] if steps[r] else v_RS[r, :0] for r in range(n)]

    def flops(self, prompts: Sequence[np.ndarray], steps: Steps) -> float:
        """Forward FLOPs of scoring these rows: every token of prompt + steps once, without logits."""
        cfg = self.model.cfg
        return sum(decode_flops(cfg, 0, len(p) + sum(len(s) for s in st), logits=False)
                   for p, st in zip(prompts, steps))


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
