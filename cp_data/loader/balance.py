"""DP-balanced assignment: split a window of rows into steps x dp ranks x rows, evening out work.

:func:`balanced_assignment` is a pure function of the rows' work: every rank computes the same
assignment with no communication. Its building block splits rows into groups of equal size as
evenly as a heuristic can: LPT with the cardinality constraint in rounds (the rows, heaviest
first, form rounds of one row per group, and each round gives its heaviest row to the least
loaded group), then swaps that lower the busiest group: in all pairs of a busy and a light group
at once (the i-th busiest with the i-th lightest, the swap that brings both closest to their
mean), then single swaps out of the busiest group, until it is within 0.2% of
:func:`least_busiest` (a bound no split beats).

A window of several steps (lookahead) has two candidates, and the one whose steps' maxima sum
lowest wins (the plain split too, so balancing never slows a window down):

- the rows, heaviest first, cut into steps, each split across the ranks on its own: heavy rows
  share steps (with one row per rank, the split that minimises the sum of the steps' maxima);
- one group per (step, rank) for the whole window, the heaviest groups sharing a step: an
  outlier row gets the window's lightest rows as company.

Loops run over rounds, steps and swap passes, never over rows; the work is numpy.
"""

from __future__ import annotations

import numpy as np

from cp_data.work import RowWork

__all__ = ["balanced_assignment", "least_busiest", "strided_assignment", "window_objective"]

_MAX_PASSES = 4
"""Rounds of pairwise swaps per step at most (each pass swaps in every pair of ranks at once)."""
_MAX_SWAPS = 16
"""Swaps out of the busiest rank per step at most, after the passes (each lowers the maximum)."""
_CLOSE_ENOUGH = 2e-3
"""Swapping stops once the busiest rank is within 0.2% of the least possible maximum."""


def least_busiest(work: np.ndarray, rows_per_rank: int, ranks: int) -> float:
    """A load no split of these rows into ``ranks`` groups of ``rows_per_rank`` keeps every group under.

    The mean load; and for every ``k``, some group holds ``k`` of the ``(k - 1) * ranks + 1``
    heaviest rows (pigeonhole), so at least the ``k`` lightest of them plus the
    ``rows_per_rank - k`` lightest rows of all. (For a given ``k`` fewer heavy rows give a larger
    sum, so these counts are the ones to check.)
    """
    heaviest_first = np.sort(work)[::-1]
    top = np.concatenate([[0.0], np.cumsum(heaviest_first)])
    bottom = np.concatenate([[0.0], np.cumsum(heaviest_first[::-1])])
    k = np.arange(1, rows_per_rank + 1)
    c = (k - 1) * ranks + 1
    k, c = k[c <= work.size], c[c <= work.size]
    pigeonhole = top[c] - top[c - k] + bottom[rows_per_rank - k]
    return float(max(work.sum() / ranks, pigeonhole.max(initial=0.0)))


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


def _pair_swaps(members: np.ndarray, work: np.ndarray, good: float) -> np.ndarray:
    """Pair the i-th busiest rank with the i-th least busy; in every pair at once, swap the two rows
    that bring both loads closest to their mean. Repeats while the busiest rank gets lighter."""
    members = members.copy()
    dp, per_rank = members.shape
    half = dp // 2
    top = np.inf
    for _ in range(_MAX_PASSES):
        values = work[members]
        loads = values.sum(axis=1)
        if not loads.max() < top or loads.max() <= good:
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


def _busiest_swaps(members: np.ndarray, work: np.ndarray, good: float) -> np.ndarray:
    """Swap a row of the busiest rank with a row of any other rank while that lowers the maximum."""
    members = members.copy()
    for _ in range(_MAX_SWAPS):
        values = work[members]
        loads = values.sum(axis=1)
        a = int(np.argmax(loads))
        if loads[a] <= good:
            break
        delta = values[a][:, None, None] - values[None, :, :]  # [row of a, rank b, row of b]
        new_max = np.maximum(loads[a] - delta, loads[None, :, None] + delta)
        new_max[:, a, :] = np.inf
        best = int(np.argmin(new_max))
        if not new_max.flat[best] < loads[a] * (1 - 1e-12):
            break
        i, b, j = np.unravel_index(best, new_max.shape)
        members[a, i], members[b, j] = members[b, j], members[a, i]
    return members


def _split(work: RowWork, rows: np.ndarray, groups: int) -> np.ndarray:
    """Rows (heaviest first) split into ``groups`` groups of equal size, loads evened: [groups, size]."""
    members = _rounds(rows, work, groups)
    if work.combine == "sum" and members.shape[1] > 1 and groups > 1:
        good = least_busiest(work.work[rows], members.shape[1], groups) * (1 + _CLOSE_ENOUGH)
        members = _busiest_swaps(_pair_swaps(members, work.work, good), work.work, good)
    return members


def balanced_assignment(work: RowWork, dp: int, rows_per_rank: int, steps: int = 1) -> np.ndarray:
    """Assign ``steps * dp * rows_per_rank`` rows to steps and dp ranks, evening out step work.

    ``work`` holds the rows' work in window order. Returns int64 [steps, dp, rows_per_rank] row
    numbers: every row exactly once, every rank exactly ``rows_per_rank`` rows per step, each
    rank's rows ascending and the steps in the order of their earliest row. Of the candidates
    (see the module docstring, and :func:`strided_assignment`), the one of least
    :func:`window_objective` wins, so balancing never makes a window slower.
    """
    n = steps * dp * rows_per_rank
    if work.work.shape != (n,):
        raise ValueError(
            f"work must hold steps * dp * rows_per_rank = {steps} * {dp} * {rows_per_rank} = {n} rows, "
            f"got {work.work.shape[0]}"
        )
    heaviest = np.argsort(-work.work, kind="stable")
    # The window's rows, heaviest first, cut into steps, each split on its own: heavy rows share steps.
    candidates = [np.stack([_split(work, rows, dp) for rows in heaviest.reshape(steps, -1)])]
    if steps > 1:
        # One group per (step, rank) of the whole window, the heaviest groups sharing a step: an
        # outlier row gets the window's lightest rows as company.
        groups = _split(work, heaviest, steps * dp)
        by_work = np.argsort(-work.step_work(groups), kind="stable")
        candidates.append(groups[by_work].reshape(steps, dp, rows_per_rank))
    candidates.append(strided_assignment(steps, dp, rows_per_rank))  # chosen only when strictly faster
    out = min(candidates, key=lambda c: window_objective(c, work))
    out = np.sort(out, axis=2)
    return out[np.argsort(out[:, :, 0].min(axis=1), kind="stable")]
