"""Rollouts -> the batch layout of the train steps (that of `jaxpost.data.pipeline`'s SFT batches).

A sample with prompt p (length Lp) and completion c (length n) is the document x = p + c; like an SFT document it
becomes `inputs = x[:-1]`, `targets = x[1:]` (Lp + n - 1 positions) with `loss_mask` 1 exactly on the targets that
are completion tokens (positions Lp - 1 .. Lp + n - 2). The sampler's log-prob of completion token j lands on the
same position as its target, so `sample_logp` lines up with `token_logprobs(hidden, W, targets)` of the step.
"""

from __future__ import annotations

import numpy as np

from jaxpost.batch import ROW_KEYS
from jaxpost.rollout.sampler import Rollout

ROLLOUT_BATCH_KEYS = ROW_KEYS + ("sample_logp", "sample_index")


def rollout_batch(rollout: Rollout, *, seq_len: int, pad_id: int, pack: bool = False, rows: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Lays the rollout's samples out as [rows, seq_len] numpy arrays:

        inputs, targets  int32    tokens (pad_id on padding)
        loss_mask        float32  1.0 on targets that are completion tokens
        segment_ids      int32    1, 2, ... per sample within a row; 0 on padding
        positions        int32    0, 1, ... within each sample; 0 on padding
        sample_logp      float32  the sampler's log-prob of each target completion token; 0 elsewhere
        sample_index     int32    the rollout row each token belongs to (to broadcast per-sample advantages);
                                  -1 on padding

    pack=False: one sample per row (rows default to the number of samples). pack=True: samples are placed first-fit,
    in order, into rows of seq_len (several samples per row, kept apart by segment_ids); rows default to the number
    needed. Extra rows are empty (padding). A sample longer than seq_len raises ValueError (RL data is never
    truncated silently).
    """
    docs = []
    for r in range(len(rollout.lengths)):
        prompt = rollout.prompts[int(rollout.prompt_index[r])]
        n = int(rollout.lengths[r])
        x = np.concatenate([prompt, rollout.tokens[r, :n]]).astype(np.int32)
        if len(x) - 1 > seq_len:
            raise ValueError(f"rollout_batch: sample {r} has {len(x) - 1} positions > seq_len={seq_len}")
        docs.append((r, x, len(prompt), n))

    placement = []  # (row, offset) per document
    if pack:
        used: list[int] = []
        for _, x, _, _ in docs:
            need = len(x) - 1
            row = next((i for i, u in enumerate(used) if u + need <= seq_len), None)
            if row is None:
                row = len(used)
                used.append(0)
            placement.append((row, used[row]))
            used[row] += need
        n_rows = len(used)
    else:
        placement = [(i, 0) for i in range(len(docs))]
        n_rows = len(docs)
    if rows is not None:
        if rows < n_rows:
            raise ValueError(f"rollout_batch: the samples need {n_rows} rows > rows={rows}")
        n_rows = rows

    out = {
        "inputs": np.full((n_rows, seq_len), pad_id, np.int32),
        "targets": np.full((n_rows, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n_rows, seq_len), np.float32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "positions": np.zeros((n_rows, seq_len), np.int32),
        "sample_logp": np.zeros((n_rows, seq_len), np.float32),
        "sample_index": np.full((n_rows, seq_len), -1, np.int32),
    }
    next_segment = np.ones((n_rows,), np.int32)
    for (r, x, lp, n), (row, at) in zip(docs, placement):
        L = len(x) - 1
        sl = slice(at, at + L)
        out["inputs"][row, sl] = x[:-1]
        out["targets"][row, sl] = x[1:]
        out["loss_mask"][row, at + lp - 1:at + lp - 1 + n] = 1.0
        out["sample_logp"][row, at + lp - 1:at + lp - 1 + n] = rollout.logprobs[r, :n]
        out["segment_ids"][row, sl] = next_segment[row]
        out["positions"][row, sl] = np.arange(L, dtype=np.int32)
        out["sample_index"][row, sl] = r
        next_segment[row] += 1
    return out
