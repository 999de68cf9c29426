"""Best-fit-decreasing bin packing over integer item sizes, in O(n log n).

Per-item best fit is a Python loop of ~1M steps; instead items of equal size are placed as one
group. Within a group the best-fit choice is predictable: the bin with the smallest remaining
capacity c >= s takes an item, is left with c - s, and — being alone in that smaller class — is
again the best fit, so it absorbs ``c // s`` items in a row before the next bin is considered. A
group therefore consumes whole "capacity classes" (bins grouped by remaining room, found by
bisection in a sorted list of rooms) in ascending order: one numpy slice per class, not per item. The result is identical to the per-item algorithm with
ties (bins of equal remaining capacity) going to the lowest bin id.
"""

from __future__ import annotations

import bisect

import numpy as np

from cp_data.balancers.validation import check_lengths, is_int

__all__ = ["best_fit_decreasing", "best_fit_decreasing_capped"]


def _check_sizes(sizes, capacity: int) -> np.ndarray:
    if not is_int(capacity) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    arr = check_lengths(sizes, "sizes", minimum=1)
    if arr.size and arr.max() > capacity:
        raise ValueError(f"sizes must lie in [1, capacity={capacity}], got max {arr.max()}")
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

    members: dict[int, np.ndarray] = {}  # remaining capacity -> sorted ids of the bins with it
    rooms: list[int] = []  # sorted keys of `members`: bisect finds the best fit in O(log S)
    bin_of_sorted = np.empty(n, dtype=np.int64)
    num_bins = 0
    for lo, hi in zip(starts, ends):
        s = int(sorted_sizes[lo])
        pos, k = lo, hi - lo
        moves: dict[int, list[np.ndarray]] = {}

        def place(ids: np.ndarray, absorbed: int, room: int) -> None:
            # each bin in `ids` takes the next `absorbed` items and is left with `room`
            nonlocal pos
            if not ids.size:
                return
            end = pos + ids.size * absorbed
            bin_of_sorted[pos:end] = ids if absorbed == 1 else np.repeat(ids, absorbed)
            pos = end
            if room:  # a full bin never takes anything again
                moves.setdefault(room, []).append(ids)

        first = bisect.bisect_left(rooms, s)
        used_up = 0
        for c in rooms[first:]:  # ascending: the best fit first
            ids = members[c]
            q = c // s
            if ids.size * q <= k:
                place(ids, q, c - q * s)
                k -= ids.size * q
                used_up += 1
                del members[c]
                if not k:
                    break
                continue
            full, rest = divmod(k, q)
            place(ids[:full], q, c - q * s)
            if rest:
                place(ids[full : full + 1], rest, c - rest * s)
                full += 1
            if full < ids.size:
                members[c] = ids[full:]
            else:
                del members[c]
                used_up += 1
            k = 0
            break
        del rooms[first : first + used_up]
        if k:  # open new bins, each absorbing as many items as fit
            q = capacity // s
            full, rest = divmod(k, q)
            place(np.arange(num_bins, num_bins + full, dtype=np.int64), q, capacity - q * s)
            num_bins += full
            if rest:
                place(np.array([num_bins], dtype=np.int64), rest, capacity - rest * s)
                num_bins += 1

        for room, parts in moves.items():
            if room in members:
                parts.append(members[room])
            else:
                bisect.insort(rooms, room)
            if len(parts) > 1:
                members[room] = np.concatenate(parts)
                members[room].sort()
            else:
                members[room] = parts[0]

    bins = np.empty(n, dtype=np.int64)
    bins[order] = bin_of_sorted
    return bins


def best_fit_decreasing_capped(sizes, capacity: int, costs, max_cost) -> np.ndarray:
    """Best-fit-decreasing with a second, additive limit: a bin's item costs sum to ``max_cost``.

    Items are taken in decreasing size (stable); each goes to the open bin with the least
    remaining room that still fits it and whose remaining cost budget covers its cost (on equal
    room, the one with the most budget left, then the lowest bin id), or to a new bin. An empty
    bin takes any item, so an item costlier than ``max_cost`` sits alone. Returns the bin of every
    item, in input order; bins are numbered in the order they open. With ``max_cost=inf`` every
    budget ties and the result is :func:`best_fit_decreasing`'s.

    One Python step per item (``O(n log capacity)``: a max-tree over the rooms finds the best
    fit with budget), so slower than :func:`best_fit_decreasing`.
    """
    sizes = _check_sizes(sizes, capacity)
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != sizes.shape or (costs.size and costs.min() < 0):
        raise ValueError(f"costs must be >= 0, one per item ({sizes.size}), got shape {costs.shape}")
    if not max_cost > 0:
        raise ValueError(f"max_cost must be > 0, got {max_cost!r}")
    order = np.argsort(-sizes, kind="stable")
    leaves = 1 << (capacity + 1).bit_length()
    tree = [-1.0] * (2 * leaves)  # leaf `room`: the most budget among bins with that room; -1: none
    by_room: dict[int, list[tuple[float, int]]] = {}  # room -> (budget, -bin), ascending

    def set_budget(room: int, budget: float) -> None:
        i = room + leaves
        tree[i] = budget
        i >>= 1
        while i:
            best = max(tree[2 * i], tree[2 * i + 1])
            if tree[i] == best:
                break
            tree[i] = best
            i >>= 1

    bins = np.empty(sizes.size, dtype=np.int64)
    num_bins = 0
    for item, size, cost in zip(order.tolist(), sizes[order].tolist(), costs[order].tolist()):
        # The leftmost room >= size whose best budget covers the cost: climb right, then descend.
        i = size + leaves
        while tree[i] < cost:
            while i & 1:
                i >>= 1
            if not i:
                break
            i += 1
        if i:
            while i < leaves:
                i = 2 * i if tree[2 * i] >= cost else 2 * i + 1
            room = i - leaves
            members = by_room[room]
            budget, b = members.pop()
            b = -b
            set_budget(room, members[-1][0] if members else -1.0)
        else:
            budget, b, room = float(max_cost), num_bins, capacity
            num_bins += 1
        bins[item] = b
        room, budget = room - size, budget - cost
        if room:  # a full bin never takes anything again
            members = by_room.setdefault(room, [])
            bisect.insort(members, (budget, -b))
            if members[-1][1] == -b:
                set_budget(room, budget)
    return bins
