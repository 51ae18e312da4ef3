"""The sampler: prefill + decode over a preallocated KV cache, one compiled program per shape bucket.

It runs the trainer's own model on the trainer's own (sharded) params: nothing is copied or synced. One call of
`Sampler.generate` is one compiled program:

    left-pad the prompts to the prompt bucket P         (host; the batch is padded to the batch bucket B)
    prefill: the prompt in chunks of C tokens           every chunk writes its keys/values into the cache
    logits of the last prompt token, repeated G times   (n samples per prompt share one prefill)
    sample token 0; then a `lax.while_loop`:            forward the previous token at cache slot P + j - 1,
                                                        sample token j, check stop tokens / stop sequences;
                                                        exit at max_new_tokens or when every row has stopped

Layout. Prompts are left-padded, so every row writes its j-th new token into the same cache slot P + j (one
`dynamic_update_slice` for the whole batch); row b's tokens start at slot P - len_b and its RoPE positions are
slot - (P - len_b), i.e. 0 at the first prompt token, exactly the positions of the training forward. The cache is
[layers, B * G, kv_heads, P + max_new_tokens, head_dim], batch over (data, fsdp) and kv heads over tensor
(`jaxpost.models.CACHE_AXES`).

Sampling. Logits are float32 (`h @ W` with float32 accumulation). With temperature T > 0 the distribution is
softmax(logits / T), optionally truncated to the top-k tokens and then to the smallest prefix of them (by
probability, renormalised) whose mass reaches top_p (nucleus), and renormalised; temperature 0 is greedy (argmax).
Each row draws from its own key, `fold_in(fold_in(PRNGKey(seed), row), step)`: a seed reproduces a run, and a row's
samples do not depend on the batch bucket or on the mesh.

Reported log-probs. `Rollout.logprobs[r, j]` is log softmax(logits / T)[token] under the temperature-scaled
distribution *before* top-k / top-p truncation (temperature 1 for greedy decoding). This is what the trainer
recomputes with `jaxpost.ops.token_logprobs(h, W, targets, temperature=T)`, so PPO/GRPO importance ratios are exact
at the first step. When truncation is on, the distribution actually sampled from is the truncated one; its
log-prob differs from the reported one by the log of the kept mass, log Z_kept (the same for every kept token of a
step). The untruncated convention is the one vLLM and most RL trainers use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jaxtyping import Array, Float, Int

from jaxpost.models.transformer import KVCache
from jaxpost.sharding import ACTIVATION_RULES, logical_to_spec, shard

FINISH_REASONS: tuple[str, ...] = ("eos", "stop_sequence", "length")
EOS, STOP_SEQUENCE, LENGTH = 0, 1, 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """What to sample. Every field is part of the compiled program's key (changing one compiles a new program).

    temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0: all). top_p: then keep the smallest most-likely prefix whose
    probability mass reaches top_p (1.0: all). n_samples: completions per prompt (the GRPO group), rows
    p * n_samples + g. stop_ids: tokens that end a row (finish reason "eos"; the token is kept in the completion).
    stop_sequences: token sequences that end a row once its completion ends with one (finish reason
    "stop_sequence"; the sequence is kept). A row that reaches max_new_tokens stops with "length".
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n_samples: int = 1
    stop_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
        if self.max_new_tokens <= 0 or self.n_samples <= 0:
            raise ValueError(f"SamplingConfig: max_new_tokens and n_samples must be > 0, got {self}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("SamplingConfig.stop_sequences must not contain an empty sequence")
        if any(t < 0 for t in self.stop_ids) or any(t < 0 for s in self.stop_sequences for t in s):
            raise ValueError("SamplingConfig: stop ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Completions of R = n_prompts * n_samples rows (row r continues prompt `prompt_index[r]`), host numpy.

    tokens     int32   [R, N]  sampled tokens (stop token / sequence included), `pad_id` after a row's end
    mask       bool    [R, N]  True on a row's completion tokens (its first `lengths[r]` entries)
    logprobs   float32 [R, N]  log-prob of each sampled token (see the module docstring); 0 where mask is False
    lengths    int32   [R]     completion lengths
    finish     int32   [R]     index into FINISH_REASONS ("eos", "stop_sequence", "length")
    prompt_index int32 [R]     which prompt each row continues
    prompts    list of int32 arrays, the prompts as given
    steps      token positions the decode loop generated (< N when every row stopped early)
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish: np.ndarray
    prompt_index: np.ndarray
    prompts: list[np.ndarray]
    steps: int

    @property
    def finish_reasons(self) -> list[str]:
        return [FINISH_REASONS[int(f)] for f in self.finish]

    def completions(self) -> list[np.ndarray]:
        return [self.tokens[r, :n] for r, n in enumerate(self.lengths)]


# ------------------------------------------------------------------------------------------------ pure pieces


def sample_logits(z_RV: Float[Array, "R V"], keys_R, *, temperature: float, top_k: int = 0, top_p: float = 1.0
                  ) -> tuple[Int[Array, "R"], Float[Array, "R"]]:
    """(token [R], log-prob [R]) from float32 logits, one key per row. Greedy when temperature == 0.

    The log-prob is log softmax(z / T)[token] before truncation (T = 1 when greedy); see the module docstring.
    """
    z_RV = z_RV.astype(jnp.float32)
    if temperature == 0.0:
        zt_RV = z_RV
        tok_R = jnp.argmax(z_RV, axis=-1).astype(jnp.int32)
    else:
        zt_RV = z_RV if temperature == 1.0 else z_RV * (1.0 / temperature)
        V = z_RV.shape[-1]
        k = min(top_k, V) if top_k else (V if top_p < 1.0 else 0)
        if k:
            vals_RK, idx_RK = jax.lax.top_k(zt_RV, k)  # sorted, most likely first
            if top_p < 1.0:
                p_RK = jax.nn.softmax(vals_RK, axis=-1)
                before_RK = jnp.cumsum(p_RK, axis=-1) - p_RK  # mass of the more likely tokens
                vals_RK = jnp.where(before_RK < top_p, vals_RK, -jnp.inf)  # the first token is always kept
            choice_R = jax.vmap(jax.random.categorical)(keys_R, vals_RK)
            tok_R = jnp.take_along_axis(idx_RK, choice_R[:, None], axis=-1)[:, 0].astype(jnp.int32)
        else:
            tok_R = jax.vmap(jax.random.categorical)(keys_R, zt_RV).astype(jnp.int32)
    logp_R = jnp.take_along_axis(zt_RV, tok_R[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(zt_RV, axis=-1)
    return tok_R, logp_R


def _stop_table(stop_sequences: tuple[tuple[int, ...], ...]):
    """Right-aligned stop sequences [Q, L] and their validity mask (entries before a shorter sequence's start)."""
    L = max(len(s) for s in stop_sequences)
    table = np.full((len(stop_sequences), L), -1, np.int32)
    valid = np.zeros((len(stop_sequences), L), bool)
    for q, s in enumerate(stop_sequences):
        table[q, L - len(s):] = s
        valid[q, L - len(s):] = True
    return table, valid


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ------------------------------------------------------------------------------------------------ the sampler


class Sampler:
    """Compiled, sharded sampling and scoring for one `LM` on one mesh.

    `generate(params, prompts, cfg, seed=)` pads the batch to a batch bucket (a power of two, at least the number of
    data-parallel devices, so rows split evenly) and the longest prompt to a prompt bucket (the power of two >=
    max(longest prompt, `min_prompt_bucket`), rounded up to a multiple of `prefill_chunk`), and runs the program
    compiled for (batch bucket, prompt bucket, cfg): it is traced and compiled once and reused by every later call
    that falls in the same bucket (`traces` counts the tracings). `prefill_chunk` > 0 prefills long prompts in
    chunks of that many tokens: one compiled chunk in a `fori_loop` (compile time does not grow with the prompt),
    each chunk attending to the prompt bucket's cache under the causal mask; activations are [B, chunk] and attention
    temporaries [chunk x prompt bucket] instead of [prompt x prompt].

    Params are used as given: the trainer's params, sharded on the same mesh (`LM.param_shardings`), are read in
    place, never copied or gathered up front. Without a mesh the program runs on the params' device. Results come
    back to the host (`Rollout`); with several processes every process gets all rows.
    """

    def __init__(self, lm, mesh=None, *, pad_id: int = 0, prefill_chunk: int = 0, min_prompt_bucket: int = 16):
        if prefill_chunk < 0 or min_prompt_bucket <= 0:
            raise ValueError(f"Sampler: prefill_chunk must be >= 0 and min_prompt_bucket > 0, got {prefill_chunk}, "
                             f"{min_prompt_bucket}")
        self.lm = lm
        self.mesh = mesh
        self.pad_id = int(pad_id)
        self.prefill_chunk = int(prefill_chunk)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.traces = 0
        self._programs: dict = {}
        self._score = jax.jit(score_logprobs, static_argnames=("lm", "temperature", "impl"))

    # -- shapes -------------------------------------------------------------------------------------------------
    @property
    def _dp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def buckets(self, n_prompts: int, max_prompt_len: int) -> tuple[int, int]:
        """(batch bucket, prompt bucket) of a call."""
        B = max(_pow2_at_least(n_prompts), self._dp)
        B = -(-B // self._dp) * self._dp
        P = _pow2_at_least(max(max_prompt_len, self.min_prompt_bucket))
        if self.prefill_chunk:
            P = -(-P // self.prefill_chunk) * self.prefill_chunk
        return B, P

    def _batch_sharding(self, shape):
        return NamedSharding(self.mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), ACTIVATION_RULES,
                                                        self.mesh, shape))

    # -- the compiled program ------------------------------------------------------------------------------------
    def _program(self, B: int, P: int, cfg: SamplingConfig):
        key = (B, P, cfg)
        if key not in self._programs:
            self._programs[key] = jax.jit(functools.partial(self._generate, P=P, cfg=cfg))
        return self._programs[key]

    def _generate(self, params, prompt_BP, lengths_B, key, *, P: int, cfg: SamplingConfig):
        """The traced program: left-padded prompts [B, P] -> tokens, log-probs [B*G, N], lengths, finish [B*G]."""
        self.traces += 1
        lm, pad_id = self.lm, self.pad_id
        B = prompt_BP.shape[0]
        G, N = cfg.n_samples, cfg.max_new_tokens
        R, S = B * G, P + N
        C = self.prefill_chunk or P
        w_DV = lm.unembedding(params)

        def logits(h_RD):
            return shard(jnp.dot(h_RD, w_DV, preferred_element_type=jnp.float32), ("batch", "vocab"))

        # Prefill: the whole prompt bucket at once, or in chunks of C tokens.
        lengths_B = lengths_B.astype(jnp.int32)
        kv_start_B = P - lengths_B
        positions_BP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - kv_start_B[:, None], 0)
        cache = lm.init_cache(B, P)
        if C == P:
            h_BCD, cache = lm.extend(params, prompt_BP, positions_BP, cache, slot=0, kv_start_B=kv_start_B)
            h_BD = h_BCD[:, -1]
        else:  # one compiled chunk, looped: chunk c fills slots [cC, (c+1)C) and attends causally over the prefix
            def chunk(c, carry):
                cache, _ = carry
                tokens_BC = jax.lax.dynamic_slice_in_dim(prompt_BP, c * C, C, axis=1)
                positions_BC = jax.lax.dynamic_slice_in_dim(positions_BP, c * C, C, axis=1)
                h_BCD, cache = lm.extend(params, tokens_BC, positions_BC, cache, slot=c * C, kv_start_B=kv_start_B)
                return cache, h_BCD[:, -1]

            h0_BD = jnp.zeros((B, lm.cfg.d_model), jnp.dtype(lm.cfg.dtype))
            cache, h_BD = jax.lax.fori_loop(0, P // C, chunk, (cache, h0_BD))
        z_BV = logits(h_BD)

        # G samples per prompt share its prefill: rows p * G + g.
        def rep(x, axis=0):
            return jnp.repeat(x, G, axis=axis) if G > 1 else x

        grow = ((0, 0), (0, 0), (0, 0), (0, N), (0, 0))
        cache = KVCache(k=jnp.pad(rep(cache.k, 1), grow), v=jnp.pad(rep(cache.v, 1), grow)).sharded()
        z_RV, lengths_R, kv_start_R = rep(z_BV), rep(lengths_B), rep(kv_start_B)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(R, dtype=jnp.uint32))

        stop_ids = jnp.asarray(cfg.stop_ids, jnp.int32) if cfg.stop_ids else None
        if cfg.stop_sequences:
            table_QL, valid_QL = (jnp.asarray(a) for a in _stop_table(cfg.stop_sequences))
            Lq = table_QL.shape[1]
        else:
            Lq = 0

        def record(j, z_RV, st):
            keys_R = jax.vmap(jax.random.fold_in, (0, None))(row_keys, j)
            tok_R, logp_R = sample_logits(z_RV, keys_R, temperature=cfg.temperature, top_k=cfg.top_k,
                                          top_p=cfg.top_p)
            active_R = ~st["done"]
            tok_R = jnp.where(active_R, tok_R, pad_id)
            st = dict(st)
            st["tokens"] = jax.lax.dynamic_update_slice_in_dim(st["tokens"], tok_R[:, None], j, axis=1)
            st["logp"] = jax.lax.dynamic_update_slice_in_dim(
                st["logp"], jnp.where(active_R, logp_R, 0.0)[:, None], j, axis=1)
            st["n"] = st["n"] + active_R.astype(jnp.int32)
            st["last"] = tok_R
            stopped_R = jnp.zeros_like(active_R)
            if stop_ids is not None:
                eos_R = active_R & jnp.isin(tok_R, stop_ids)
                st["finish"] = jnp.where(eos_R, EOS, st["finish"])
                stopped_R = stopped_R | eos_R
            if Lq:
                recent_RL = jnp.concatenate([st["recent"][:, 1:], tok_R[:, None]], axis=1)
                match_RQ = jnp.all((recent_RL[:, None, :] == table_QL[None]) | ~valid_QL[None], axis=-1)
                seq_R = active_R & ~stopped_R & jnp.any(match_RQ, axis=-1)
                st["finish"] = jnp.where(seq_R, STOP_SEQUENCE, st["finish"])
                st["recent"] = recent_RL
                stopped_R = stopped_R | seq_R
            st["done"] = st["done"] | stopped_R
            return st

        st = {
            "tokens": jnp.full((R, N), pad_id, jnp.int32),
            "logp": jnp.zeros((R, N), jnp.float32),
            "n": jnp.zeros((R,), jnp.int32),
            "done": jnp.zeros((R,), bool),
            "finish": jnp.full((R,), LENGTH, jnp.int32),
            "last": jnp.zeros((R,), jnp.int32),
        }
        if Lq:
            st["recent"] = jnp.full((R, Lq), -1, jnp.int32)
        st = record(0, z_RV, st)

        def cond(carry):
            j, _, st = carry
            return (j < N) & ~jnp.all(st["done"])

        def body(carry):
            j, cache, st = carry
            h_RCD, cache = lm.extend(params, st["last"][:, None], (lengths_R + j - 1)[:, None], cache,
                                     slot=P + j - 1, kv_start_B=kv_start_R)
            return j + 1, cache, record(j, logits(h_RCD[:, 0]), st)

        steps, _, st = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, st))
        return {"tokens": st["tokens"], "logp": st["logp"], "n": st["n"], "finish": st["finish"], "steps": steps}

    # -- host API -----------------------------------------------------------------------------------------------
    def generate(self, params, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, seed: int = 0) -> Rollout:
        """Samples `cfg.n_samples` completions of every prompt (token id lists of any lengths >= 1)."""
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        if not prompts:
            raise ValueError("Sampler.generate: no prompts")
        lens = np.array([len(p) for p in prompts], np.int32)
        if lens.min() < 1:
            raise ValueError("Sampler.generate: every prompt needs at least one token (e.g. bos)")
        max_len = self.lm.cfg.max_seq_len
        if lens.max() + cfg.max_new_tokens > max_len:
            raise ValueError(f"Sampler.generate: prompt of {lens.max()} tokens + max_new_tokens="
                             f"{cfg.max_new_tokens} exceeds the model's max_seq_len={max_len}")
        n = len(prompts)
        B, P = self.buckets(n, int(lens.max()))
        tokens_BP = np.full((B, P), self.pad_id, np.int32)
        lengths_B = np.full((B,), lens[0], np.int32)  # filler rows repeat prompt 0
        for b in range(B):
            p = prompts[b] if b < n else prompts[0]
            tokens_BP[b, P - len(p):] = p
            lengths_B[b] = len(p)
        program = self._program(B, P, cfg)
        key = jax.random.PRNGKey(seed)
        if self.mesh is not None:
            tokens_BP = jax.device_put(tokens_BP, self._batch_sharding(tokens_BP.shape))
            lengths_B = jax.device_put(lengths_B, self._batch_sharding(lengths_B.shape))
            with jax.set_mesh(self.mesh):
                out = program(params, tokens_BP, lengths_B, key)
        else:
            out = program(params, tokens_BP, lengths_B, key)
        steps = int(out.pop("steps"))
        out = {k: _to_host(v)[:n * cfg.n_samples] for k, v in out.items()}
        N = cfg.max_new_tokens
        mask = np.arange(N)[None, :] < out["n"][:, None]
        return Rollout(tokens=out["tokens"], mask=mask, logprobs=np.where(mask, out["logp"], 0.0).astype(np.float32),
                       lengths=out["n"].astype(np.int32), finish=out["finish"].astype(np.int32),
                       prompt_index=np.repeat(np.arange(n, dtype=np.int32), cfg.n_samples), prompts=prompts,
                       steps=steps)

    def score(self, params, batch: dict, *, temperature: float = 1.0, impl: str = "auto") -> jax.Array:
        """Per-token log-probs [B, T] of `batch["targets"]` (a batch in the SFT/RL layout, see `rollout_batch`)
        under the model at `temperature`: the trainer's own computation (`score_logprobs`), jit-compiled."""
        arrays = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "positions", "segment_ids")}
        if self.mesh is None:
            return self._score(self.lm, params, arrays, temperature=float(temperature), impl=impl)
        arrays = {k: jax.device_put(v, self._batch_sharding(v.shape)) for k, v in arrays.items()}
        with jax.set_mesh(self.mesh):
            return self._score(self.lm, params, arrays, temperature=float(temperature), impl=impl)


def score_logprobs(lm, params, batch: dict, *, temperature: float = 1.0, impl: str = "auto"
                   ) -> Float[Array, "B T"]:
    """log softmax(h W / temperature)[targets] [B, T] of a batch with inputs/targets/positions/segment_ids: the
    training forward (`lm.hidden`) and the training log-prob core (`jaxpost.ops.token_logprobs`), for reference and
    old-policy log-probs of given completions."""
    h_BTD = lm.hidden(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    return lm.token_logprobs(params, h_BTD, batch["targets"], temperature=temperature, impl=impl).logp


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
