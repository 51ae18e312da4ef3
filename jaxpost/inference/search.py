"""Test-time scaling methods: best-of-N and voting over samples, token-level beam search, step-level search guided
by a process reward model (beam search and DVTS), and budget forcing.

Every method takes a batch of prompts (token id lists) and returns a `SearchResult`: per prompt the chosen
completion's tokens (and text when a tokenizer is given) and its score, plus the compute it spent: `tokens`, the new
tokens sampled (every candidate included, forced cue tokens excluded), and `flops`, the forward FLOPs of the
generator (prompts, sampled and forced tokens, `jaxpost.inference.flops`) and of the scorer, so methods compare at
equal compute. All candidates of all prompts go through one compiled call per step (`jaxpost.inference.decode`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.inference import select
from jaxpost.inference.decode import EOS, LENGTH, STOP_SEQUENCE, Decoder, DecodeState, feed, gather_rows, pending
from jaxpost.inference.flops import decode_flops, forward_flops
from jaxpost.rollout.sampler import Sampler, SamplingConfig

__all__ = ["SearchResult", "beam_search", "budget_forcing", "sample_and_select", "step_search"]

Scorer = Callable[[Sequence[np.ndarray], Sequence[Sequence[np.ndarray]]], list]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Per prompt: `completions` (int32 token arrays), `scores` (float64 [P], the chosen candidate's score under the
    method's objective; NaN where it has none), `texts` (with a tokenizer); `tokens` and `flops` (see the module
    docstring); `candidates`: per prompt, the (tokens, score) of every finished candidate the selection chose from;
    `info`: method-specific extras."""

    completions: list[np.ndarray]
    scores: np.ndarray
    tokens: int
    flops: float
    texts: list[str] | None = None
    candidates: list[list[tuple[np.ndarray, float]]] | None = None
    info: dict = dataclasses.field(default_factory=dict)


def _texts(tokenizer, completions):
    if tokenizer is None:
        return None
    from jaxpost.tokenizers.base import decode_completion
    return [decode_completion(tokenizer, c) for c in completions]


def _prompts(prompts) -> list[np.ndarray]:
    out = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not out or min(len(p) for p in out) < 1:
        raise ValueError("need at least one prompt, each of at least one token")
    return out


def _score_steps(scorer: Scorer, prompts, steps, agg: str) -> tuple[np.ndarray, float]:
    """(aggregated scores [R], the scorer's FLOPs) of candidates given as step lists."""
    if not prompts:
        return np.zeros(0), 0.0
    per_step = scorer(prompts, steps)
    flops = float(scorer.flops(prompts, steps)) if hasattr(scorer, "flops") else 0.0
    return select.aggregate_ragged([np.asarray(s, np.float64) for s in per_step], agg), flops


# ------------------------------------------------------------------------------------------------ sampling + select


def _select_best(answers, scores):
    return None, select.best_of_n(scores)


SELECTIONS: dict[str, Callable] = {
    "best_of_n": _select_best,
    "weighted_best_of_n": select.weighted_best_of_n,
    "majority_vote": lambda answers, scores: select.majority_vote(answers),
}


def sample_and_select(sampler: Sampler, params, prompts, cfg: SamplingConfig, *, method: str = "best_of_n",
                      scorer: Scorer | None = None, answer_fn: Callable[[np.ndarray], Hashable | None] | None = None,
                      delimiter_id: int | Sequence[int] | None = None, agg: str = "last", seed: int = 0, tokenizer=None
                      ) -> SearchResult:
    """Samples N = cfg.n_samples completions of every prompt in one `Sampler.generate` call and picks one per prompt:

        best_of_n            the highest scorer score (aggregated over steps with `agg`; Cobbe et al. 2021)
        weighted_best_of_n   the answer with the largest summed score (`select.weighted_best_of_n`)
        majority_vote        the most frequent answer (self-consistency; no scorer needed)

    Completions are split into steps at `delimiter_id` for a step scorer (None: one step per completion).
    `answer_fn(tokens) -> answer` (None if unparseable) for the answer-based methods; the returned completion is
    the best-scoring (weighted) or first (vote) candidate with the chosen answer. Scores: the chosen candidate's
    aggregated score (best_of_n), the winning answer's summed score (weighted) or vote count (majority)."""
    if method not in SELECTIONS:
        raise ValueError(f"sample_and_select: method must be one of {sorted(SELECTIONS)}, got {method!r}")
    if method != "majority_vote" and scorer is None:
        raise ValueError(f"sample_and_select: {method} needs a scorer")
    if method != "best_of_n" and answer_fn is None:
        raise ValueError(f"sample_and_select: {method} needs answer_fn")
    prompts = _prompts(prompts)
    P, G = len(prompts), cfg.n_samples
    ro = sampler.generate(params, prompts, cfg, seed=seed)
    comps = ro.completions()
    lm_cfg = sampler.lm.cfg
    flops = sum(decode_flops(lm_cfg, 0, len(p) - 1, logits=False) for p in prompts)
    flops += sum(decode_flops(lm_cfg, len(prompts[r // G]) - 1, len(c)) for r, c in enumerate(comps))
    rows_prompts = [prompts[r // G] for r in range(P * G)]
    if scorer is not None:
        steps = [select.split_steps(c, delimiter_id) if delimiter_id is not None else ([c] if len(c) else [])
                 for c in comps]
        scores_R, s_flops = _score_steps(scorer, rows_prompts, steps, agg)
        flops += s_flops
    else:
        scores_R = np.ones(P * G)
    scores_PG = scores_R.reshape(P, G)
    answers = [[answer_fn(comps[p * G + g]) for g in range(G)] for p in range(P)] if answer_fn else None
    chosen_answers, index_P = SELECTIONS[method](answers, scores_PG)
    if method == "best_of_n":
        score_P = scores_PG[np.arange(P), index_P]
    else:
        w_PG = scores_PG if method == "weighted_best_of_n" else np.ones_like(scores_PG)
        score_P = np.array([sum(w for a, w in zip(answers[p], w_PG[p]) if a is not None and a == chosen_answers[p])
                            if chosen_answers[p] is not None else np.nan for p in range(P)])
    completions = [comps[p * G + int(index_P[p])] for p in range(P)]
    candidates = [[(comps[p * G + g], float(scores_PG[p, g])) for g in range(G)] for p in range(P)]
    info = {"answers": chosen_answers} if answers is not None else {}
    return SearchResult(completions=completions, scores=np.asarray(score_P, np.float64), tokens=int(ro.lengths.sum()),
                        flops=flops, texts=_texts(tokenizer, completions), candidates=candidates, info=info)


# ------------------------------------------------------------------------------------------------ beam search


def _beam_program(lm, logits_fn, params, state: DecodeState, *, W: int, N: int, alpha: float, stop_ids, pad_id):
    """Token-level beam search over groups of W consecutive rows (one group per prompt) for N steps."""
    R = state.rows
    Pb = R // W
    head0, len0_R = state.head, state.len_R
    real_R = ~state.finished_R
    raw_R = jnp.where(jnp.arange(R) % W == 0, 0.0, -jnp.inf).astype(jnp.float32)
    gen_R = jnp.zeros((R,), jnp.int32)
    stop_arr = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

    def norm(raw, gen):
        return raw / jnp.maximum(gen, 1).astype(jnp.float32) ** alpha

    def cond(carry):
        t, st, raw_R, gen_R, fin_R, work = carry
        return (t < N) & ~jnp.all(fin_R)

    def body(carry):
        t, st, raw_R, gen_R, fin_R, work = carry
        alive_R = ~fin_R
        now = st._replace(len_R=len0_R + t, head=head0 + t)  # alive rows: t tokens generated, pending at head0 + t
        h_RCD, cache = feed(lm, params, now, pending(now)[:, None])
        logp_RV = jax.nn.log_softmax(logits_fn(params, h_RCD[:, 0]), axis=-1)
        V = logp_RV.shape[-1]
        cand_RV = jnp.where(alive_R[:, None], (raw_R[:, None] + logp_RV) / jnp.float32(t + 1) ** alpha, -jnp.inf)
        stay_R = jnp.where(fin_R, norm(raw_R, gen_R), -jnp.inf)  # a finished beam's one candidate: itself
        cand_RV = cand_RV.at[:, 0].set(jnp.where(fin_R, stay_R, cand_RV[:, 0]))
        _, idx_PW = jax.lax.top_k(cand_RV.reshape(Pb, W * V), W)  # ties: the lowest index
        parent_R = (jnp.arange(Pb)[:, None] * W + idx_PW // V).reshape(R)
        tok_R = (idx_PW % V).reshape(R).astype(jnp.int32)
        was_fin_R = fin_R[parent_R]
        st = gather_rows(st._replace(cache=cache), parent_R)
        new_logp_R = jnp.where(was_fin_R, 0.0, logp_RV[parent_R, tok_R])
        raw_R = raw_R[parent_R] + new_logp_R
        gen_R = gen_R[parent_R] + (~was_fin_R).astype(jnp.int32)
        tok_R = jnp.where(was_fin_R, pad_id, tok_R)
        col_R = jax.lax.dynamic_index_in_dim(st.tokens_RS, head0 + t + 1, axis=1, keepdims=False)
        col_R = jnp.where(was_fin_R, col_R, tok_R)
        st = st._replace(tokens_RS=jax.lax.dynamic_update_slice_in_dim(st.tokens_RS, col_R[:, None], head0 + t + 1,
                                                                       axis=1))
        fin_R = was_fin_R if stop_arr is None else was_fin_R | jnp.isin(tok_R, stop_arr)
        fed_R = alive_R & real_R
        work = (work[0] + jnp.sum(fed_R), work[1] + jnp.sum(jnp.where(fed_R, len0_R + t, 0)))
        return t + 1, st, raw_R, gen_R, fin_R, work

    zero = jnp.zeros((), jnp.int32)
    _, st, raw_R, gen_R, fin_R, work = jax.lax.while_loop(
        cond, body, (jnp.int32(0), state, raw_R, gen_R, state.finished_R, (zero, zero)))
    return {"tokens_RS": st.tokens_RS, "gen_R": gen_R, "score_R": norm(raw_R, gen_R), "raw_R": raw_R,
            "work": work}


def beam_search(decoder: Decoder, params, prompts, *, width: int, max_new_tokens: int, alpha: float = 1.0,
                stop_ids: Sequence[int] = (), tokenizer=None) -> SearchResult:
    """Token-level beam search on the KV cache: `width` beams per prompt, all prompts' beams one batch, the whole
    search one compiled `lax.while_loop` (each step: forward every beam's last token, top-`width` candidates per
    prompt, fork = gather of the parents' cache rows).

    Objective: score(y) = sum_t log p(y_t | y_<t) / |y|^alpha (alpha = 0: the plain sum, alpha = 1: the per-token
    average; GNMT (Wu et al. 2016) divides by ((5 + |y|) / 6)^alpha instead). A beam ends at a stop id (kept) or at
    `max_new_tokens`. Each step ranks, per prompt, every extension of every live beam together with the finished
    beams (a finished beam's only candidate is itself, with its final score) and keeps the best `width`; the search
    ends when all of a prompt's beams are finished. With width 1 this is greedy decoding (the top extension of the
    only beam is the argmax token), token for token. A wider beam usually, but not provably, scores at least as
    high as a narrower one. Returns the best beam per prompt (ties: the lowest beam); `scores` are its objective,
    `info["logp"]` its summed log-prob."""
    if width < 1 or max_new_tokens < 1:
        raise ValueError(f"beam_search: width and max_new_tokens must be >= 1, got {width}, {max_new_tokens}")
    if width > decoder.lm.cfg.vocab_size:
        raise ValueError(f"beam_search: width {width} exceeds the vocabulary")
    prompts = _prompts(prompts)
    P = len(prompts)
    state = decoder.prefill(params, prompts, max_new_tokens=max_new_tokens + 1)
    Pb = state.rows
    # Pb (the prefill's row bucket) is a multiple of the data-parallel devices, so Pb * width rows split evenly.
    state = decoder.fork(state, np.repeat(np.arange(Pb), width), np.repeat(np.arange(Pb) >= P, width))
    static = dict(W=width, N=int(max_new_tokens), alpha=float(alpha), stop_ids=tuple(int(t) for t in stop_ids))
    fn = functools.partial(_beam_program, decoder.lm, decoder._logits, pad_id=decoder.pad_id, **static)
    out = decoder._run("beam", tuple(sorted(static.items())), fn, params, state)
    out = jax.device_get(out)
    head0 = int(state.head)
    completions, scores, logps = [], [], []
    for p in range(P):
        rows = np.arange(p * width, (p + 1) * width)
        best = rows[int(np.argmax(out["score_R"][rows]))]
        n = int(out["gen_R"][best])
        completions.append(np.asarray(out["tokens_RS"][best, head0 + 1:head0 + 1 + n], np.int32))
        scores.append(float(out["score_R"][best]))
        logps.append(float(out["raw_R"][best]))
    cfg = decoder.lm.cfg
    fed, keys = (int(x) for x in out["work"])
    flops = sum(decode_flops(cfg, 0, len(p) - 1, logits=False) for p in prompts)
    flops += forward_flops(cfg, fed, keys / max(fed, 1))
    return SearchResult(completions=completions, scores=np.asarray(scores), tokens=fed, flops=flops,
                        texts=_texts(tokenizer, completions), info={"logp": np.asarray(logps)})


# ------------------------------------------------------------------------------------------------ step search


def step_search(decoder: Decoder, params, prompts, scorer: Scorer, *, method: str = "beam", n: int = 16,
                m: int = 4, delimiter_id: int | Sequence[int], end_ids: Sequence[int] = (), max_steps: int = 16,
                max_step_tokens: int = 32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                agg: str = "last", seed: int = 0, tokenizer=None) -> SearchResult:
    """Search over reasoning steps guided by a step scorer (a PRM): search-and-learn (Beeching et al. 2024; Snell et
    al. 2024, "Scaling LLM Test-Time Compute Optimally").

    A step is sampled up to and including a delimiter (`delimiter_id`: one id or several; or an end id, or
    `max_step_tokens`, which ends the candidate: it has no delimiter to continue from). Every round, every live
    candidate samples one step (all candidates of all prompts in one compiled call), the scorer scores the new
    prefixes and `agg` aggregates the step scores ("last": the newest step's score, search-and-learn's choice).
    Then:

        beam   n candidates per prompt; those that finished go to the prompt's pool; the n / m best live ones
               survive and each is forked m times (fewer survivors are repeated in turn to refill n rows).
        dvts   diverse verifier tree search: n / m independent subtrees of m candidates; each subtree keeps its
               best candidate and forks it m times, or, if that candidate finished, puts it in the pool and ends
               (a finished candidate wins a tie with an unfinished one; other finished candidates are dropped).

    After `max_steps` rounds the live candidates join the pool unfinished. The answer is the pool's best candidate
    (ties: the first to enter). `candidates` lists the pool; `info["rounds"]`: the rounds run; `info["ended"]`: per
    prompt, (tokens, score) of every candidate that finished in any round, selected or not."""
    if method not in ("beam", "dvts"):
        raise ValueError(f"step_search: method must be 'beam' or 'dvts', got {method!r}")
    if n < 1 or m < 1 or n % m:
        raise ValueError(f"step_search: need n, m >= 1 with m dividing n, got n={n}, m={m}")
    prompts = _prompts(prompts)
    P = len(prompts)
    cfg = decoder.lm.cfg
    delims = tuple(int(t) for t in np.asarray(delimiter_id).reshape(-1))
    state = decoder.prefill(params, prompts, max_new_tokens=max_steps * max_step_tokens + 1)
    R = decoder.rows_bucket(P * n)
    parents = np.concatenate([np.repeat(np.arange(P), n), np.zeros(R - P * n, np.int64)])
    live = np.arange(R) < P * n
    state = decoder.fork(state, parents, ~live)
    steps: list[list[np.ndarray]] = [[] for _ in range(R)]
    pool: list[list[tuple[np.ndarray, float]]] = [[] for _ in range(P)]
    ended_log: list[list[tuple[np.ndarray, float]]] = [[] for _ in range(P)]
    tokens = 0
    flops = sum(decode_flops(cfg, 0, len(p) - 1, logits=False) for p in prompts)
    group = n if method == "beam" else m
    keep = n // m if method == "beam" else 1
    rounds = 0
    base_key = jax.random.PRNGKey(seed)
    for it in range(max_steps):
        if not live.any():
            break
        rounds += 1
        len_R = np.asarray(state.len_R)
        state, ext = decoder.extend_until(params, state, jax.random.fold_in(base_key, it), max_tokens=max_step_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          stop_ids=delims, end_ids=end_ids, active_R=live)
        ext = jax.device_get(ext)
        finished_R = np.asarray(state.finished_R)
        rows = np.nonzero(live)[0]
        for r in rows:
            k = int(ext.n_R[r])
            tokens += k
            flops += decode_flops(cfg, int(len_R[r]) - 1, k)
            if k:
                steps[r] = steps[r] + [ext.tokens_RM[r, :k].copy()]
        # A candidate ends at an end id, at a step that hit the step budget, or in the last round.
        ended = {int(r) for r in rows if finished_R[r] or ext.reason_R[r] != EOS or ext.n_R[r] == 0
                 or it == max_steps - 1}
        scores, s_flops = _score_steps(scorer, [prompts[r // n] for r in rows], [steps[r] for r in rows], agg)
        flops += s_flops
        score_of = dict(zip((int(r) for r in rows), scores))
        parents = np.arange(R)
        new_live = np.zeros(R, bool)
        for g0 in range(0, P * n, group):
            members = [r for r in range(g0, g0 + group) if live[r]]
            if not members:
                continue
            p = g0 // n
            ended_log[p].extend((_joined(steps[r]), score_of[r]) for r in members if r in ended)
            if method == "beam":
                for r in members:
                    if r in ended:
                        pool[p].append((_joined(steps[r]), score_of[r]))
                alive = [r for r in members if r not in ended]
                alive.sort(key=lambda r: -score_of[r])  # stable: ties keep the lower row first
                survivors = alive[:keep]
            else:
                best = max(members, key=lambda r: (score_of[r], r in ended, -r))
                if best in ended:
                    pool[p].append((_joined(steps[best]), score_of[best]))
                    survivors = []
                else:
                    survivors = [best]
            if survivors:
                for i, r in enumerate(range(g0, g0 + group)):
                    parents[r] = survivors[(i // m) % len(survivors)] if method == "beam" else survivors[0]
                    new_live[r] = True
        steps = [list(steps[parents[r]]) for r in range(R)]
        live = new_live
        if live.any():
            state = decoder.fork(state, parents, ~live)
    completions, chosen = [], []
    for p in range(P):
        if not pool[p]:
            completions.append(np.zeros(0, np.int32))
            chosen.append(np.nan)
            continue
        i = int(select.best_of_n(np.array([[s for _, s in pool[p]]]))[0])
        completions.append(pool[p][i][0])
        chosen.append(pool[p][i][1])
    return SearchResult(completions=completions, scores=np.asarray(chosen, np.float64), tokens=tokens, flops=flops,
                        texts=_texts(tokenizer, completions), candidates=pool,
                        info={"rounds": rounds, "ended": ended_log})


def _joined(steps: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(steps).astype(np.int32) if steps else np.zeros(0, np.int32)


# ------------------------------------------------------------------------------------------------ budget forcing


def budget_forcing(decoder: Decoder, params, prompts, *, budget: int, answer_cue: Sequence[int],
                   end_think_ids: Sequence[int] = (), end_think_sequences: Sequence[Sequence[int]] = (),
                   continue_cue: Sequence[int] = (), extensions: int = 0, max_answer_tokens: int = 16,
                   answer_stop_ids: Sequence[int] = (), temperature: float = 0.0, seed: int = 0,
                   tokenizer=None) -> SearchResult:
    """Budget forcing (s1, Muennighoff et al. 2025): control how long the model thinks.

    Thinking = every token between the prompt and the answer cue (sampled tokens and forced continuation cues). The
    model thinks until it emits the end-of-thinking marker (`end_think_ids` or `end_think_sequences`) or the
    thinking reaches `budget` tokens:

    - capped: the thinking is exactly `budget` tokens; `answer_cue` (e.g. the ids of "\\nAnswer:") is appended and
      the model writes the answer;
    - marker, `extensions` not used up and room for the cue plus one token: the marker is suppressed (its tokens
      dropped from the row and the cache) and `continue_cue` (e.g. "\\nWait") is appended: the model thinks on;
    - marker otherwise: the thinking ends naturally (the marker stays; in the reasoning lab the marker is the answer
      cue itself) and the model writes the answer.

    The answer is sampled up to `max_answer_tokens` or an `answer_stop_ids` token. `info`: `thinking` [P] (thinking
    tokens, marker excluded), `extensions` [P], `capped` [P] bool."""
    if budget < 1 or extensions < 0 or not answer_cue:
        raise ValueError("budget_forcing: need budget >= 1, extensions >= 0 and a non-empty answer_cue")
    if extensions and not continue_cue:
        raise ValueError("budget_forcing: extensions need a continue_cue")
    if not end_think_ids and not end_think_sequences:
        raise ValueError("budget_forcing: give the end-of-thinking marker (end_think_ids or end_think_sequences)")
    prompts = _prompts(prompts)
    P = len(prompts)
    cfg = decoder.lm.cfg
    cue, answer_cue = list(continue_cue), list(answer_cue)
    # Rows think for different lengths and all write into the slot of the longest: twice the budget (see
    # `Decoder.extend_until`), then the answer cue and the answer.
    room = 2 * budget + len(answer_cue) + max_answer_tokens + 2
    state = decoder.prefill(params, prompts, max_new_tokens=room)
    R = state.rows
    real = np.arange(R) < P
    thinking = np.zeros(R, np.int64)
    n_ext = np.zeros(R, np.int64)
    capped = np.zeros(R, bool)
    thinking_live = real.copy()
    tokens, key, rnd = 0, jax.random.PRNGKey(seed), 0
    flops = sum(decode_flops(cfg, 0, len(p) - 1, logits=False) for p in prompts)
    while thinking_live.any():
        len_R = np.asarray(state.len_R)
        state, ext = decoder.extend_until(params, state, jax.random.fold_in(key, rnd), max_tokens=budget,
                                          temperature=temperature, stop_ids=end_think_ids,
                                          stop_sequences=end_think_sequences, limit_R=budget - thinking,
                                          active_R=thinking_live)
        rnd += 1
        ext = jax.device_get(ext)
        finished = np.asarray(state.finished_R)
        drop = np.zeros(R, np.int32)
        add = np.zeros(R, np.int32)
        for r in np.nonzero(thinking_live)[0]:
            k = int(ext.n_R[r])
            tokens += k
            flops += decode_flops(cfg, int(len_R[r]) - 1, k)
            marker = ext.reason_R[r] in (EOS, STOP_SEQUENCE)
            if marker:
                body = thinking[r] + k - int(ext.stop_len_R[r])
                if n_ext[r] < extensions and body + len(cue) < budget and not finished[r]:
                    drop[r], add[r] = int(ext.stop_len_R[r]), len(cue)
                    thinking[r] = body + len(cue)
                    n_ext[r] += 1
                else:
                    thinking[r] = body
                    thinking_live[r] = False
            else:
                thinking[r] += k
                assert ext.reason_R[r] == LENGTH
                capped[r] = thinking[r] >= budget
                thinking_live[r] = False
        if add.any():
            len_R = np.asarray(state.len_R)
            flops += sum(decode_flops(cfg, int(len_R[r] - drop[r]) - 1, int(add[r]) + 1, logits=False)
                         for r in np.nonzero(add)[0])
            state = decoder.append(params, state, np.tile(np.asarray(cue, np.int32), (R, 1)), add, drop)
    if capped.any():
        len_R = np.asarray(state.len_R)
        flops += sum(decode_flops(cfg, int(len_R[r]) - 1, len(answer_cue) + 1, logits=False)
                     for r in np.nonzero(capped)[0])
        state = decoder.append(params, state, np.tile(np.asarray(answer_cue, np.int32), (R, 1)),
                               np.where(capped, len(answer_cue), 0))
    len_R = np.asarray(state.len_R)
    state, ext = decoder.extend_until(params, state, jax.random.fold_in(key, rnd), max_tokens=max_answer_tokens,
                                      temperature=temperature, stop_ids=answer_stop_ids, active_R=real)
    ext = jax.device_get(ext)
    for r in range(P):
        tokens += int(ext.n_R[r])
        flops += decode_flops(cfg, int(len_R[r]) - 1, int(ext.n_R[r]))
    completions = Decoder.row_tokens(state, P)
    return SearchResult(completions=completions, scores=np.asarray(state.logp_R)[:P].astype(np.float64),
                        tokens=tokens, flops=flops, texts=_texts(tokenizer, completions),
                        info={"thinking": thinking[:P].copy(), "extensions": n_ext[:P].copy(),
                              "capped": capped[:P].copy()})
