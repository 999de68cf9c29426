"""Causal attention work counted in query-key pairs, and bounds that no document order beats.

A query at offset ``p`` of its document attends to ``p + 1`` keys (causal, document-masked), so
a document of ``d`` tokens costs ``d (d + 1) / 2`` pairs wherever it sits: the work that
``cp_data.inspect`` reports, the per-pair part of a step's cost, and what the llama3 ordering and
the work-aware packing balance.
"""

from __future__ import annotations

import numpy as np

__all__ = ["causal_pairs", "fill_work_bound", "busiest_rank_bound"]


def causal_pairs(x: np.ndarray | float) -> np.ndarray:
    """Query-key pairs that causal attention computes over the first ``x`` tokens of a document.

    A query at offset ``p`` of its document attends to ``p + 1`` keys, so ``x`` tokens make
    ``x (x + 1) / 2`` pairs (float64, elementwise): the work ``cp_data.inspect`` reports, and the
    per-pair part of a step's cost.
    """
    x = np.asarray(x, dtype=np.float64)
    return x * (x + 1.0) / 2.0


def fill_work_bound(other_lens: np.ndarray, max_tokens: int) -> np.ndarray:
    """``f[c]``: least work of ``c`` tokens taken from these documents, ``c = 0..max_tokens``.

    A rank's tokens from other documents are one contiguous piece per document, and a piece of
    ``x`` tokens costs at least ``x (x + 1) / 2``; the cost is convex, so spreading ``c`` over as
    many documents as possible (pieces of ``min(d, level)`` tokens) is the cheapest. More tokens
    than the documents hold cost nothing extra (the bound stays a bound).
    """
    d = np.sort(other_lens)
    level = np.arange(int(d[-1]) + 1 if d.size else 1)
    below = np.searchsorted(d, level, side="left")  # documents shorter than the level stay whole
    wider = d.size - below
    tokens = np.append(0, np.cumsum(d))[below] + level * wider
    work = np.append(0.0, np.cumsum(causal_pairs(d)))[below] + causal_pairs(level) * wider
    c = np.arange(max_tokens + 1)
    k = np.clip(np.searchsorted(tokens, c, side="right") - 1, 0, level.size - 1)
    return np.where(c <= tokens[-1], work[k] + (c - tokens[k]) * (level[k] + 1.0), work[-1])


def busiest_rank_bound(lens: np.ndarray, bounds: np.ndarray) -> float:
    """A cheap bound on the busiest llama3 rank's work that no document order beats.

    ``lens`` are the (positive) document lengths of a row, ``bounds`` its slice bounds
    ``[0, L, ..., W L]``.

    The larger of the mean and, over every start of the longest document, the least possible
    busiest rank among those it touches: its own part there plus the cheapest fill of the rest
    of each rank by the other documents (:func:`fill_work_bound`). Starts are scanned by their
    offset inside the first rank touched: only the last, partly filled rank differs from the rest.
    """
    local = int(bounds[1])
    total = int(lens.sum())
    mean = float(causal_pairs(lens).sum()) / (bounds.size - 1)
    longest_at = int(np.argmax(lens))
    length = int(lens[longest_at])
    fill = fill_work_bound(np.delete(lens, longest_at), local)
    full_ranks, last_room = divmod(total, local)
    offset = np.arange(local)[:, None]
    k = np.arange(-(-(local - 1 + length) // local))[None, :]
    lo = np.clip(k * local - offset, 0, length)
    hi = np.clip((k + 1) * local - offset, 0, length)
    held = hi - lo
    part = np.where(held > 0, causal_pairs(hi) - causal_pairs(lo) + fill[local - held], 0.0)
    span = (offset[:, 0] + length + local - 1) // local
    # Ending inside the full ranks; or in the partly filled last one, which has less room to fill.
    inside = np.where(span <= full_ranks, part.max(axis=1), np.inf)
    last = span - 1
    last_held = held[np.arange(local), last]
    ends_last = (last_room > 0) & (full_ranks - last >= 0) & (last_held <= last_room)
    ends_last &= (full_ranks - last) * local + offset[:, 0] + length <= total
    head = np.where(k < last[:, None], part, 0.0).max(axis=1)
    tail = causal_pairs(hi[np.arange(local), last]) - causal_pairs(lo[np.arange(local), last])
    tail = tail + fill[np.clip(last_room - last_held, 0, local)]
    at_end = np.where(ends_last, np.maximum(head, tail), np.inf)
    return max(mean, float(min(inside.min(), at_end.min())))
