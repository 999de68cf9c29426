"""Best-fit-decreasing bin packing over integer item sizes, in O(n log n).

Per-item best fit is a Python loop of ~1M steps; instead items of equal size are placed as one
group. Within a group the best-fit choice is predictable: the bin with the smallest remaining
capacity c >= s takes an item, is left with c - s, and — being alone in that smaller class — is
again the best fit, so it absorbs ``c // s`` items in a row before the next bin is considered. A
group therefore consumes whole "capacity classes" in ascending order, which is a handful of numpy
operations per class instead of per item. The result is identical to the per-item algorithm with
ties (bins of equal remaining capacity) going to the lowest bin id.
"""

from __future__ import annotations

import numpy as np

__all__ = ["best_fit_decreasing"]


def _check_sizes(sizes, capacity: int) -> np.ndarray:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    arr = np.asarray(sizes)
    if arr.ndim != 1:
        raise ValueError(f"sizes must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"sizes must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 1 or arr.max() > capacity):
        raise ValueError(
            f"sizes must lie in [1, capacity={capacity}], got min {arr.min()} and max {arr.max()}"
        )
    return arr


def best_fit_decreasing(sizes, capacity: int) -> np.ndarray:
    """Assign items to bins of ``capacity`` by best-fit-decreasing.

    Items are taken in decreasing size (stable: equal sizes in input order); each goes to the open
    bin with the least remaining room that still fits it (lowest bin id on ties), or to a new bin.
    Returns the bin id of every item, in input order; bins are numbered in the order they open.

    >>> best_fit_decreasing([8, 6, 6, 4, 3, 2, 3], 8).tolist()
    [0, 1, 2, 3, 3, 1, 4]
    """
    sizes = _check_sizes(sizes, capacity)
    n = sizes.size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    sorted_sizes = sizes[order]
    bounds = np.flatnonzero(np.diff(sorted_sizes)) + 1
    starts = np.concatenate(([0], bounds)).tolist()
    ends = np.concatenate((bounds, [n])).tolist()

    counts = np.zeros(capacity + 1, dtype=np.int64)  # bins per remaining capacity
    members: dict[int, np.ndarray] = {}  # remaining capacity -> sorted bin ids
    bin_of_sorted = np.empty(n, dtype=np.int64)
    num_bins = 0
    for lo, hi in zip(starts, ends):
        s = int(sorted_sizes[lo])
        k = hi - lo
        ids_parts: list[np.ndarray] = []
        rep_parts: list[int] = []
        moves: dict[int, list[np.ndarray]] = {}

        def place(ids: np.ndarray, absorbed: int, room: int) -> None:
            # each bin in `ids` takes `absorbed` consecutive items and is left with `room`
            if not ids.size:
                return
            ids_parts.append(ids)
            rep_parts.append(absorbed)
            if room:  # a full bin never takes anything again
                moves.setdefault(room, []).append(ids)

        classes = np.flatnonzero(counts[s:]) + s
        if classes.size:
            per_bin = classes // s
            cum = np.cumsum(counts[classes] * per_bin)
            t = int(np.searchsorted(cum, k))  # classes[:t] are used up entirely
            for c, q in zip(classes[:t].tolist(), per_bin[:t].tolist()):
                counts[c] = 0
                place(members.pop(c), q, c - q * s)
            if t < classes.size:
                c, q = int(classes[t]), int(per_bin[t])
                left = k - (int(cum[t - 1]) if t else 0)
                full, rest = divmod(left, q)
                ids = members.pop(c)
                place(ids[:full], q, c - q * s)
                if rest:
                    place(ids[full : full + 1], rest, c - rest * s)
                    full += 1
                if full < ids.size:
                    members[c] = ids[full:]
                counts[c] = ids.size - full
                k = 0
            else:
                k -= int(cum[-1])
        if k:  # open new bins, each absorbing as many items as fit
            q = capacity // s
            full, rest = divmod(k, q)
            place(np.arange(num_bins, num_bins + full, dtype=np.int64), q, capacity - q * s)
            num_bins += full
            if rest:
                place(np.array([num_bins], dtype=np.int64), rest, capacity - rest * s)
                num_bins += 1

        reps = np.repeat(np.asarray(rep_parts, dtype=np.int64), [a.size for a in ids_parts])
        bin_of_sorted[lo:hi] = np.repeat(np.concatenate(ids_parts), reps)
        for room, parts in moves.items():
            if room in members:
                parts.append(members[room])
            merged = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if len(parts) > 1:
                merged.sort()
            members[room] = merged
            counts[room] = merged.size

    bins = np.empty(n, dtype=np.int64)
    bins[order] = bin_of_sorted
    return bins
