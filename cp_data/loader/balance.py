"""DP-balanced assignment: split a window of rows into steps x dp ranks x rows, evening out work.

:func:`balanced_assignment` is a pure function of the rows' work: every rank computes the same
assignment with no communication. Within a step, LPT with the cardinality constraint in rounds:
the rows, heaviest first, form ``rows_per_rank`` rounds of ``dp`` rows and each round gives its
heaviest row to the least loaded rank, one row per rank, so every rank ends with exactly
``rows_per_rank`` rows. Two kinds of swaps then lower the busiest rank: all pairs of a busy and
a light rank at once (the i-th busiest with the i-th lightest, the swap that brings both closest
to their mean), then single swaps out of the busiest rank. Over a lookahead window of several
steps the heaviest rows share steps (sorting the window and cutting it into steps minimises the
sum of the steps' maxima when each rank holds one row), so every step holds rows of similar work.

Loops run over rounds, steps and swap passes, never over rows; the work is numpy.
"""

from __future__ import annotations

import numpy as np

from cp_data.work import RowWork

__all__ = ["balanced_assignment", "strided_assignment", "window_objective"]

_MAX_PASSES = 8
"""Rounds of pairwise swaps per step at most (each pass swaps in every pair of ranks at once)."""
_MAX_SWAPS = 16
"""Swaps out of the busiest rank per step at most, after the passes (each lowers the maximum)."""


def strided_assignment(steps: int, dp: int, rows_per_rank: int) -> np.ndarray:
    """The unbalanced split: step ``s`` takes the next ``dp * rows_per_rank`` rows; rank ``r`` every
    ``dp``-th of them from the ``r``-th. Returns int64 [steps, dp, rows_per_rank] row numbers."""
    index = np.arange(steps * dp * rows_per_rank).reshape(steps, rows_per_rank, dp)
    return index.transpose(0, 2, 1)


def window_objective(assignment: np.ndarray, work: RowWork) -> float:
    """Sum over the steps of the busiest rank's step work: what the window costs end to end."""
    return float(work.step_work(assignment).max(axis=1).sum())


def _rounds(rows: np.ndarray, work: RowWork, dp: int) -> np.ndarray:
    """LPT in rounds: round ``j`` takes the next ``dp`` rows (heaviest first) and gives the heaviest
    to the least loaded rank, one row per rank. Returns the members [dp, rounds]."""
    rounds = rows.reshape(-1, dp)
    combine = np.add if work.combine == "sum" else np.maximum
    members = np.empty((dp, len(rounds)), dtype=np.int64)
    loads = np.zeros(dp)
    for j, round_rows in enumerate(rounds):
        lightest = np.argsort(loads, kind="stable")
        members[lightest, j] = round_rows
        loads[lightest] = combine(loads[lightest], work.work[round_rows])
    return members


def _pair_swaps(members: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Pair the i-th busiest rank with the i-th least busy; in every pair at once, swap the two rows
    that bring both loads closest to their mean. Repeats while the busiest rank gets lighter."""
    members = members.copy()
    dp, per_rank = members.shape
    half = dp // 2
    top = np.inf
    for _ in range(_MAX_PASSES):
        values = work[members]
        loads = values.sum(axis=1)
        if not loads.max() < top:
            break
        top = loads.max()
        by_load = np.argsort(-loads, kind="stable")
        heavy, light = by_load[:half], by_load[::-1][:half]
        gap = (loads[heavy] - loads[light])[:, None, None]
        delta = values[heavy][:, :, None] - values[light][:, None, :]  # [pair, row of heavy, row of light]
        miss = np.where((delta > 0) & (delta < gap), np.abs(gap / 2 - delta), np.inf).reshape(half, -1)
        pick = miss.argmin(axis=1)
        ok = np.isfinite(miss[np.arange(half), pick])
        i, j = np.unravel_index(pick[ok], (per_rank, per_rank))
        h, lt = heavy[ok], light[ok]
        members[h, i], members[lt, j] = members[lt, j], members[h, i].copy()
    return members


def _busiest_swaps(members: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Swap a row of the busiest rank with a row of any other rank while that lowers the maximum."""
    members = members.copy()
    for _ in range(_MAX_SWAPS):
        values = work[members]
        loads = values.sum(axis=1)
        a = int(np.argmax(loads))
        delta = values[a][:, None, None] - values[None, :, :]  # [row of a, rank b, row of b]
        new_max = np.maximum(loads[a] - delta, loads[None, :, None] + delta)
        new_max[:, a, :] = np.inf
        best = int(np.argmin(new_max))
        if not new_max.flat[best] < loads[a] * (1 - 1e-12):
            break
        i, b, j = np.unravel_index(best, new_max.shape)
        members[a, i], members[b, j] = members[b, j], members[a, i]
    return members


def balanced_assignment(work: RowWork, dp: int, rows_per_rank: int, steps: int = 1) -> np.ndarray:
    """Assign ``steps * dp * rows_per_rank`` rows to steps and dp ranks, evening out step work.

    ``work`` holds the rows' work in window order. Returns int64 [steps, dp, rows_per_rank] row
    numbers: every row exactly once, every rank exactly ``rows_per_rank`` rows per step, each
    rank's rows ascending and the steps in the order of their earliest row. When the window's
    :func:`window_objective` would be higher than that of :func:`strided_assignment`, the strided
    one is returned instead, so balancing never makes a window slower.
    """
    n = steps * dp * rows_per_rank
    if work.work.shape != (n,):
        raise ValueError(
            f"work must hold steps * dp * rows_per_rank = {steps} * {dp} * {rows_per_rank} = {n} rows, "
            f"got {work.work.shape[0]}"
        )
    heaviest = np.argsort(-work.work, kind="stable").reshape(steps, dp * rows_per_rank)
    out = np.empty((steps, dp, rows_per_rank), dtype=np.int64)
    for s, rows in enumerate(heaviest):
        members = _rounds(rows, work, dp)
        if work.combine == "sum" and rows_per_rank > 1 and dp > 1:
            members = _busiest_swaps(_pair_swaps(members, work.work), work.work)
        out[s] = members
    out.sort(axis=2)
    out = out[np.argsort(out[:, :, 0].min(axis=1), kind="stable")]
    strided = strided_assignment(steps, dp, rows_per_rank)
    if window_objective(out, work) > window_objective(strided, work):
        return strided
    return out
