"""A stateful decode over the KV cache for searches: prefill once, then extend, force, fork and rewind rows without
ever re-encoding a prefix.

`DecodeState` (a pytree of device arrays, rows R over the mesh's (data, fsdp) axes, kv heads over tensor):

    cache       KVCache [L, R, K, S, hd]  keys/values of every row's tokens except its last ("pending") one
    tokens_RS   int32 [R, S]   every row's tokens, right-aligned: row r occupies slots [head - len_r + 1, head]
    len_R       int32 [R]      tokens in the row (prompt + generated + forced), the pending token included
    prompt_R    int32 [R]      prompt tokens in the row
    head        int32 []       the slot of every row's pending token (the next cache write)
    finished_R  bool  [R]      rows that emitted an end id (or filler rows of a bucket): later calls skip them
    logp_R      float32 [R]    sum of the log-probs of the row's sampled tokens (forced tokens excluded)

Layout. As in `jaxpost.rollout.sampler`, all rows write their next token into one shared cache slot (`lm.extend`
takes one slot for the batch), so rows are kept *right-aligned*: every row's pending token sits at slot `head`,
its earlier tokens to the left of it, its RoPE positions slot - (head - len_r + 1), i.e. 0 at the first prompt
token (the training forward's positions). The pending token's keys/values are not yet in the cache: the next
`extend_until` or `append` feeds it first, which makes a rewind (drop the last d tokens) free and a fork a plain
gather.

Operations (each one compiled program per shape bucket: rows R, cache length S and the static options):

- `prefill(prompts)`: left-pads the prompts to the prompt bucket P and runs them through the cache in one chunk.
- `extend_until(state, key, max_tokens=, stop_ids=, stop_sequences=, end_ids=, limit_R=, active_R=)`: each active
  row samples until it emits a stop id / stop sequence, reaches its limit, or `max_tokens`; rows advance together
  in one `lax.while_loop` (row j's new token goes to slot head + j), finished or stopped rows idle (their
  computation is wasted, their cache untouched where it matters). Afterwards the rows have grown by different
  counts n_r, so every row is rolled right by max_r'(len_r') - len_r along the slot axis (a per-row gather along S):
  they are right-aligned again and the new head is max(len) - 1, so the cache never holds gaps.
- `append(state, tokens_RC, n_R, drop_R=)`: drops the last drop_r tokens of each row (a rewind: just a shorter
  length and a roll), then forces n_r given tokens through the cache (one chunk of C tokens, e.g. a continuation
  cue "\\nWait" or an answer cue): its first position re-feeds the (kept) pending token.
- `fork(state, parents_R)`: the new row r is a copy of row parents_R[r]: a gather of cache rows (and of the small
  per-row arrays). The number of rows may change (e.g. 4 prompts -> 4 x 16 candidates).

Cost. A fork or a roll moves the whole cache once: 2 x L x R x K x S x hd elements read and written, with no
FLOPs. Re-encoding the prefix instead costs ~2 x n_params x T FLOPs per row for a prefix of T tokens, plus attention
(`jaxpost.inference.flops`). A decode step reads the whole cache too, so a gather costs about as much memory traffic
as one decode step over the same cache: a search that forks once per reasoning step (tens of tokens) adds roughly one
decode step's traffic per step, where re-encoding would redo the whole prefix. On a mesh the roll is local to each
row's device; a fork that moves rows between devices is a collective over the (data, fsdp) axes.

Sampling matches `Sampler.generate` (`sample_logits`: temperature, top-k, top-p; temperature 0 is greedy), with
per-row keys fold_in(fold_in(key, row), step): results do not depend on the batch bucket or the mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jaxtyping import Array, Bool, Float, Int

from jaxpost.models.transformer import KVCache
from jaxpost.rollout.sampler import EOS, LENGTH, STOP_SEQUENCE, _stop_table, sample_logits
from jaxpost.sharding import ACTIVATION_RULES, logical_to_spec, shard

__all__ = ["DecodeState", "Decoder", "Extension", "EOS", "LENGTH", "STOP_SEQUENCE"]


class DecodeState(NamedTuple):
    """See the module docstring."""

    cache: KVCache
    tokens_RS: Int[Array, "R S"]
    len_R: Int[Array, "R"]
    prompt_R: Int[Array, "R"]
    head: Int[Array, ""]
    finished_R: Bool[Array, "R"]
    logp_R: Float[Array, "R"]

    @property
    def rows(self) -> int:
        return self.tokens_RS.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens_RS.shape[1]


class Extension(NamedTuple):
    """What one `extend_until` generated, device arrays: new tokens [R, M] (pad after n_R), counts n_R, finish
    reason_R (EOS: a stop id or end id, STOP_SEQUENCE, LENGTH: limit or max_tokens; rows that were inactive have
    n_R = 0 and LENGTH), the length of the stop that ended a row (stop_len_R: 1 for an id, the sequence's length,
    0 otherwise) and the sum of the new tokens' log-probs logp_R."""

    tokens_RM: Int[Array, "R M"]
    n_R: Int[Array, "R"]
    reason_R: Int[Array, "R"]
    stop_len_R: Int[Array, "R"]
    logp_R: Float[Array, "R"]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _constrain(state: DecodeState) -> DecodeState:
    return DecodeState(cache=state.cache.sharded(), tokens_RS=shard(state.tokens_RS, ("batch", None)),
                       len_R=shard(state.len_R, ("batch",)), prompt_R=shard(state.prompt_R, ("batch",)),
                       head=state.head, finished_R=shard(state.finished_R, ("batch",)),
                       logp_R=shard(state.logp_R, ("batch",)))


def roll_rows(state: DecodeState, shift_R: Int[Array, "R"], new_head) -> DecodeState:
    """Every row rolled right by shift_R[r] slots along S (negative: left), the head set to `new_head`: a per-row
    gather new[s] = old[(s - shift) mod S] of the cache and the token slots."""
    S = state.capacity
    idx_RS = jnp.mod(jnp.arange(S, dtype=jnp.int32)[None, :] - shift_R[:, None], S)
    idx = idx_RS[None, :, None, :, None]
    cache = KVCache(k=jnp.take_along_axis(state.cache.k, idx, axis=3),
                    v=jnp.take_along_axis(state.cache.v, idx, axis=3))
    tokens_RS = jnp.take_along_axis(state.tokens_RS, idx_RS, axis=1)
    return state._replace(cache=cache, tokens_RS=tokens_RS, head=jnp.asarray(new_head, jnp.int32))


def gather_rows(state: DecodeState, parents_R: Int[Array, "R"]) -> DecodeState:
    """Row r of the result is row parents_R[r] of `state` (cache rows included): the fork."""
    return state._replace(
        cache=KVCache(k=jnp.take(state.cache.k, parents_R, axis=1), v=jnp.take(state.cache.v, parents_R, axis=1)),
        tokens_RS=jnp.take(state.tokens_RS, parents_R, axis=0), len_R=jnp.take(state.len_R, parents_R),
        prompt_R=jnp.take(state.prompt_R, parents_R), finished_R=jnp.take(state.finished_R, parents_R),
        logp_R=jnp.take(state.logp_R, parents_R))


def pending(state: DecodeState) -> Int[Array, "R"]:
    """Every row's last (pending) token, at slot `head`."""
    return jax.lax.dynamic_index_in_dim(state.tokens_RS, state.head, axis=1, keepdims=False)


def feed(lm, params, state: DecodeState, tokens_RC: Int[Array, "R C"]):
    """Forward C tokens per row at slots [head, head + C) (positions len_r - 1 + i, i.e. tokens_RC[:, 0] must be
    the pending token); returns (final hidden states [R, C, D], the cache with their keys/values). Lengths and head
    are left to the caller."""
    C = tokens_RC.shape[1]
    kv_start_R = state.head - state.len_R + 1
    positions_RC = (state.len_R - 1)[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    h_RCD, cache = lm.extend(params, tokens_RC, positions_RC, state.cache, slot=state.head, kv_start_B=kv_start_R)
    return h_RCD, cache


class Decoder:
    """Compiled `DecodeState` operations for one `LM` on one mesh (or the params' device without one).

    Row buckets: a state's row count is a power of two, at least (and a multiple of) the number of data-parallel
    devices (`rows_bucket`), so rows split evenly over (data, fsdp); filler rows are `finished`. Cache buckets: the
    prompt bucket P (a power of two >= max(longest prompt, `min_prompt_bucket`)) plus the requested room for new
    tokens (at least `min_room`) rounded up to a power of two. `traces` counts the tracings (one per program and
    shape bucket).
    """

    def __init__(self, lm, mesh=None, *, pad_id: int = 0, min_prompt_bucket: int = 16, min_room: int = 0):
        if min_prompt_bucket <= 0 or min_room < 0:
            raise ValueError(f"Decoder: min_prompt_bucket must be > 0 and min_room >= 0, got {min_prompt_bucket}, "
                             f"{min_room}")
        self.min_room = int(min_room)
        self.lm = lm
        self.mesh = mesh
        self.pad_id = int(pad_id)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.traces = 0
        self._programs: dict = {}

    # -- shapes and placement ---------------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def rows_bucket(self, n: int) -> int:
        B = max(_pow2_at_least(n), self.dp)
        return -(-B // self.dp) * self.dp

    def _put(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), ACTIVATION_RULES, self.mesh, x.shape)
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _run(self, name: str, static: tuple, fn, *args):
        key = (name, static, tuple(getattr(a, "shape", None) for a in jax.tree.leaves(args)))
        if key not in self._programs:
            def traced(*a):
                self.traces += 1
                return fn(*a)
            self._programs[key] = jax.jit(traced)
        if self.mesh is None:
            return self._programs[key](*args)
        with jax.set_mesh(self.mesh):
            return self._programs[key](*args)

    def _logits(self, params, h_RD):
        w_DV = self.lm.unembedding(params)
        return shard(jnp.dot(h_RD, w_DV, preferred_element_type=jnp.float32), ("batch", "vocab"))

    # -- prefill ----------------------------------------------------------------------------------------------
    def prefill(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int) -> DecodeState:
        """The prompts (token id lists, each >= 1 token) in the cache, room for `max_new_tokens` more tokens per
        row (generated and forced together). Rows beyond len(prompts) (the bucket's fillers) repeat prompt 0 and
        are finished."""
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        if not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("Decoder.prefill: need at least one prompt, each of at least one token")
        n = len(prompts)
        lens = np.array([len(p) for p in prompts])
        R = self.rows_bucket(n)
        P = _pow2_at_least(max(int(lens.max()), self.min_prompt_bucket))
        S = P + _pow2_at_least(max(max_new_tokens, self.min_room))
        if S > self.lm.cfg.max_seq_len:
            raise ValueError(f"Decoder.prefill: prompt bucket {P} + room {S - P} exceeds "
                             f"the model's max_seq_len={self.lm.cfg.max_seq_len}")
        tokens_RP = np.full((R, P), self.pad_id, np.int32)
        len_R = np.zeros((R,), np.int32)
        for r in range(R):
            p = prompts[r] if r < n else prompts[0]
            tokens_RP[r, P - len(p):] = p
            len_R[r] = len(p)
        finished_R = np.arange(R) >= n
        return self._run("prefill", (S,), functools.partial(self._prefill, S=S), params, self._put(tokens_RP),
                         self._put(len_R), self._put(finished_R))

    def _prefill(self, params, tokens_RP, len_R, finished_R, *, S: int) -> DecodeState:
        R, P = tokens_RP.shape
        kv_start_R = P - len_R
        positions_RP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - kv_start_R[:, None], 0)
        cache = self.lm.init_cache(R, S)
        _, cache = self.lm.extend(params, tokens_RP, positions_RP, cache, slot=0, kv_start_B=kv_start_R,
                                  attend_len=P)
        tokens_RS = jnp.pad(tokens_RP, ((0, 0), (0, S - P)), constant_values=self.pad_id)
        # The last prompt token is the pending one: its keys/values (written by the prefill) are rewritten, with the
        # same values, by the next feed.
        return _constrain(DecodeState(cache=cache, tokens_RS=tokens_RS, len_R=len_R, prompt_R=len_R,
                                      head=jnp.int32(P - 1), finished_R=finished_R,
                                      logp_R=jnp.zeros((R,), jnp.float32)))

    # -- extend until a stop ----------------------------------------------------------------------------------
    def extend_until(self, params, state: DecodeState, key, *, max_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                     stop_sequences: Sequence[Sequence[int]] = (), end_ids: Sequence[int] = (),
                     limit_R=None, active_R=None) -> tuple[DecodeState, Extension]:
        """Sample up to `max_tokens` new tokens per active row (see the module docstring). A row stops after a stop
        id, a stop sequence (matched among this call's tokens; the stop is kept), an end id (which also marks it
        `finished` for good), or `limit_R[r]` tokens (default and at most max_tokens). The program is compiled for
        max_tokens rounded up to a power of two (M); `Extension.tokens_RM` has M columns. `active_R` (default: all
        unfinished rows) picks the rows that take part; the others keep their state. `key`: a PRNG key (one per
        call). Room: all rows write step j into slot head + j, so the cache needs head + max limit < capacity even
        where each row alone would fit (e.g. rows that alternate as the longest need up to twice their length)."""
        R = state.rows
        limit_R = np.full((R,), max_tokens, np.int32) if limit_R is None else np.asarray(limit_R, np.int32)
        limit_R = np.minimum(limit_R, max_tokens)
        active_R = np.ones((R,), bool) if active_R is None else np.asarray(active_R, bool)
        head, need = int(state.head), int(limit_R[active_R].max(initial=0))
        if head + need >= state.capacity:
            raise ValueError(f"Decoder.extend_until: {need} more tokens do not fit: head {head}, capacity "
                             f"{state.capacity} (prefill with a larger max_new_tokens)")
        static = dict(M=_pow2_at_least(max_tokens), temperature=float(temperature), top_k=int(top_k),
                      top_p=float(top_p),
                      stop_ids=tuple(int(t) for t in stop_ids), end_ids=tuple(int(t) for t in end_ids),
                      stop_sequences=tuple(tuple(int(t) for t in s) for s in stop_sequences))
        if any(len(s) == 0 for s in static["stop_sequences"]):
            raise ValueError("Decoder.extend_until: empty stop sequence")
        return self._run("extend", tuple(sorted(static.items())), functools.partial(self._extend, **static),
                         params, state, key, self._put(limit_R), self._put(active_R))

    def _extend(self, params, state: DecodeState, key, limit_R, active_R, *, M, temperature, top_k, top_p, stop_ids,
                end_ids, stop_sequences):
        lm, pad_id, R = self.lm, self.pad_id, state.rows
        head0, len0_R = state.head, state.len_R
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(R, dtype=jnp.uint32))
        stop_arr = jnp.asarray(stop_ids + end_ids, jnp.int32) if stop_ids + end_ids else None
        end_arr = jnp.asarray(end_ids, jnp.int32) if end_ids else None
        if stop_sequences:
            table_QL, valid_QL = (jnp.asarray(a) for a in _stop_table(stop_sequences))
            qlen_Q = jnp.asarray([len(s) for s in stop_sequences], jnp.int32)
            Lq = table_QL.shape[1]
        else:
            Lq = 0
        live_R = active_R & ~state.finished_R
        st = {
            "new": jnp.full((R, M), pad_id, jnp.int32), "n": jnp.zeros((R,), jnp.int32), "done": ~live_R,
            "reason": jnp.full((R,), LENGTH, jnp.int32), "stop_len": jnp.zeros((R,), jnp.int32),
            "logp": jnp.zeros((R,), jnp.float32), "pending": pending(state), "finished": state.finished_R,
            "tokens": state.tokens_RS,
        }
        if Lq:
            st["recent"] = jnp.full((R, Lq), -1, jnp.int32)

        def cond(carry):
            j, _, st = carry
            return (j < M) & ~jnp.all(st["done"])

        def body(carry):
            j, cache, st = carry
            # Active rows have n_r = j: their pending token goes to slot head0 + j at position len0_r + j - 1.
            now = state._replace(cache=cache, len_R=len0_R + st["n"], head=head0 + j)
            h_RCD, cache = feed(lm, params, now, st["pending"][:, None])
            z_RV = self._logits(params, h_RCD[:, 0])
            keys_R = jax.vmap(jax.random.fold_in, (0, None))(row_keys, j)
            tok_R, logp_R = sample_logits(z_RV, keys_R, temperature=temperature, top_k=top_k, top_p=top_p)
            act_R = ~st["done"]
            tok_R = jnp.where(act_R, tok_R, pad_id)
            st = dict(st)
            st["new"] = jax.lax.dynamic_update_slice_in_dim(st["new"], tok_R[:, None], j, axis=1)
            # Slot head0 + j + 1 < S: j stays below the largest limit of an active row (checked on the host).
            col_R = jax.lax.dynamic_index_in_dim(st["tokens"], head0 + j + 1, axis=1, keepdims=False)
            st["tokens"] = jax.lax.dynamic_update_slice_in_dim(st["tokens"], jnp.where(act_R, tok_R, col_R)[:, None],
                                                               head0 + j + 1, axis=1)
            st["n"] = st["n"] + act_R.astype(jnp.int32)
            st["logp"] = st["logp"] + jnp.where(act_R, logp_R, 0.0)
            st["pending"] = jnp.where(act_R, tok_R, st["pending"])
            stopped_R = jnp.zeros_like(act_R)
            if stop_arr is not None:
                eos_R = act_R & jnp.isin(tok_R, stop_arr)
                st["reason"] = jnp.where(eos_R, EOS, st["reason"])
                st["stop_len"] = jnp.where(eos_R, 1, st["stop_len"])
                stopped_R = eos_R
                if end_arr is not None:
                    st["finished"] = st["finished"] | (act_R & jnp.isin(tok_R, end_arr))
            if Lq:
                recent_RL = jnp.concatenate([st["recent"][:, 1:], tok_R[:, None]], axis=1)
                match_RQ = jnp.all((recent_RL[:, None, :] == table_QL[None]) | ~valid_QL[None], axis=-1)
                seq_R = act_R & ~stopped_R & jnp.any(match_RQ, axis=-1)
                st["reason"] = jnp.where(seq_R, STOP_SEQUENCE, st["reason"])
                first_Q = jnp.argmax(match_RQ, axis=-1)
                st["stop_len"] = jnp.where(seq_R, qlen_Q[first_Q], st["stop_len"])
                st["recent"] = recent_RL
                stopped_R = stopped_R | seq_R
            st["done"] = st["done"] | stopped_R | (st["n"] >= limit_R)
            return j + 1, cache, st

        _, cache, st = jax.lax.while_loop(cond, body, (jnp.int32(0), state.cache, st))
        # Row r now holds its old pending token and n_r - 1 new ones in slots [head0, head0 + n_r), its new pending
        # token at slot head0 + n_r; re-align every row's pending token to the new head max(len) - 1.
        tokens_RS = st["tokens"]
        len_R = len0_R + st["n"]
        new_head = jnp.max(len_R) - 1
        out = state._replace(cache=cache, tokens_RS=tokens_RS, len_R=len_R, finished_R=st["finished"],
                             logp_R=state.logp_R + st["logp"])
        out = roll_rows(out, new_head - (head0 + st["n"]), new_head)
        ext = Extension(tokens_RM=st["new"], n_R=st["n"], reason_R=st["reason"], stop_len_R=st["stop_len"],
                        logp_R=st["logp"])
        return _constrain(out), ext

    # -- forced tokens ----------------------------------------------------------------------------------------
    def append(self, params, state: DecodeState, tokens_RC, n_R=None, drop_R=None) -> DecodeState:
        """Drop the last drop_R[r] tokens of each row (default 0; a row keeps at least one token), then force the
        first n_R[r] of tokens_RC[r] (default all C) through the cache."""
        tokens_RC = np.asarray(tokens_RC, np.int32)
        R, C = tokens_RC.shape
        if R != state.rows or C < 1:
            raise ValueError(f"Decoder.append: tokens must be [{state.rows}, C >= 1], got {tokens_RC.shape}")
        n_R = np.full((R,), C, np.int32) if n_R is None else np.asarray(n_R, np.int32)
        drop_R = np.zeros((R,), np.int32) if drop_R is None else np.asarray(drop_R, np.int32)
        if int(state.head) + C >= state.capacity:
            raise ValueError(f"Decoder.append: {C} tokens do not fit: head {int(state.head)}, capacity "
                             f"{state.capacity}")
        return self._run("append", (), self._append, params, state, self._put(tokens_RC), self._put(n_R),
                         self._put(drop_R))

    def _append(self, params, state: DecodeState, tokens_RC, n_R, drop_R) -> DecodeState:
        C = tokens_RC.shape[1]
        drop_R = jnp.clip(drop_R, 0, state.len_R - 1)
        len_R = state.len_R - drop_R
        head = jnp.max(len_R) - 1
        state = roll_rows(state._replace(len_R=len_R), head - (state.head - drop_R), head)
        chunk_RC = jnp.concatenate([pending(state)[:, None], tokens_RC[:, :C - 1]], axis=1)
        _, cache = feed(self.lm, params, state, chunk_RC)
        tokens_RS = jax.lax.dynamic_update_slice_in_dim(state.tokens_RS, tokens_RC, head + 1, axis=1)
        len_R = len_R + n_R
        new_head = jnp.max(len_R) - 1
        state = state._replace(cache=cache, tokens_RS=tokens_RS, len_R=len_R)
        return _constrain(roll_rows(state, new_head - (head + n_R), new_head))

    # -- fork -------------------------------------------------------------------------------------------------
    def fork(self, state: DecodeState, parents, finished=None) -> DecodeState:
        """Row r of the new state is a copy of row parents[r] (len(parents) rows: use `rows_bucket`); `finished`
        (optional, [len(parents)]) overrides the copied finished flags (e.g. to retire rows)."""
        parents = np.asarray(parents, np.int32)
        if len(parents) % self.dp:
            raise ValueError(f"Decoder.fork: {len(parents)} rows do not split over {self.dp} devices")
        if finished is None:
            return self._run("fork", (), lambda s, p: _constrain(gather_rows(s, p)), state, self._put(parents))
        return self._run("fork_finished", (),
                         lambda s, p, f: _constrain(gather_rows(s, p)._replace(finished_R=f)),
                         state, self._put(parents), self._put(np.asarray(finished, bool)))

    # -- host views -------------------------------------------------------------------------------------------
    def logits(self, params, state: DecodeState) -> jax.Array:
        """Float32 [R, V] next-token logits of every row (feeds the pending tokens into a copy of the cache; for
        tests and inspection)."""
        def run(params, state):
            h_RCD, _ = feed(self.lm, params, state, pending(state)[:, None])
            return self._logits(params, h_RCD[:, 0])
        return self._run("logits", (), run, params, state)

    @staticmethod
    def row_tokens(state: DecodeState, rows: int | None = None, *, generated: bool = True) -> list[np.ndarray]:
        """Host copies of each row's tokens after its prompt (generated=True) or all of them, first `rows` rows."""
        tokens_RS = np.asarray(state.tokens_RS)
        len_R, prompt_R, head = np.asarray(state.len_R), np.asarray(state.prompt_R), int(state.head)
        n = tokens_RS.shape[0] if rows is None else rows
        out = []
        for r in range(n):
            start = head - int(len_R[r]) + 1 + (int(prompt_R[r]) if generated else 0)
            out.append(tokens_RS[r, start:head + 1].copy())
        return out
