"""Balance-aware document order for llama3 sharding.

llama3 gives every rank a contiguous slice of the packed row. With causal document masking a
query at offset ``p`` of its document attends to ``p + 1`` keys, so the work of a slice depends
on where the documents of the row start: in the original order the later ranks (or the rank that
holds the tail of a long document) do far more work than the others. Reordering whole documents
changes no token's attention (each document keeps its own keys, in order) and, chosen well, evens
the work out.

:func:`llama3_balanced_order` builds an order in two steps. First a construction
(:func:`_heavy_first_order`): the documents too heavy to sit whole in one rank are laid across
rank boundaries where they cost least, and the others are dealt, longest first, to the least
loaded rank with room. Then, unless that is already within 1% of a bound no order beats (the
mean, or the longest document's cheapest placement: :func:`~cp_data.balancers.pairs.
busiest_rank_bound`), best-improvement local search with a bounded number of moves: every candidate move — swap two documents, or move one
document to another place — is scored at once in closed form. The work of a rank is
``F(end) - F(start)`` where ``F(x)`` is the causal work of the first ``x`` tokens, and a move only
changes ``F`` inside the block it rearranges, so scoring ``m`` moves costs ``O(m · W · log n)``
numpy work, with no Python loop over moves. Short rows score every pair of documents; long ones
only the moves between a key document (one cut by a slice boundary, or one of the longest) and a
sample of partners, which keeps a flattened batch of 64k tokens at W = 8 near 15 ms of one core.
"""

from __future__ import annotations

import numpy as np

from .pairs import busiest_rank_bound, causal_pairs
from .validation import ShardingError, check_length_multiple, check_lengths, round_up

__all__ = ["llama3_balanced_order", "llama3_rank_work", "reorder_documents"]

_MAX_STEPS = 64  # moves per descent; descents on short rows end far earlier in practice
_STEP_BUDGET = 500  # documents x moves per descent: bounds the cost on long flattened batches
_MIN_STEPS = 4
_TIE_WEIGHT = 1e-3  # weight of the 2nd busiest rank in the score (1e-6 for the 3rd, ...)
_FULL_SEARCH = 32  # rows with more documents score only moves that involve a key document
_KEY_LONGEST = 8  # the longest documents count as key documents
_PARTNERS = 64  # on long rows, the documents a key document may swap or trade places with
_HEAVY = (0.25, 0.5)  # a document is heavy above this share of the mean rank work (one seed each)
_GOOD_ENOUGH = 1.01
"""Stop searching once the busiest rank is within 1% of a bound that no order beats."""


def _check(
    doc_lens: np.ndarray, cp_world_size: int, length_multiple: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The checked lengths and the slice bounds ``[0, L, ..., W L]`` of the padded row."""
    lens = check_lengths(doc_lens, "doc_lens")
    if (
        isinstance(cp_world_size, bool)
        or not isinstance(cp_world_size, (int, np.integer))
        or cp_world_size < 1
    ):
        raise ShardingError(f"cp_world_size must be an int >= 1, got {cp_world_size!r}")
    multiple = int(cp_world_size) * (check_length_multiple(length_multiple) or 1)
    local_len = round_up(int(lens.sum()), multiple) // int(cp_world_size)
    return lens, np.arange(int(cp_world_size) + 1, dtype=np.int64) * local_len


def llama3_rank_work(
    doc_lens: np.ndarray, cp_world_size: int, length_multiple: int | None = None
) -> np.ndarray:
    """Causal document-masked work (query-key pairs) of each rank under llama3 slicing.

    The documents lie in the given order; rank ``r`` holds ``[r L, (r + 1) L)`` of the row padded
    to a multiple of ``W · (length_multiple or 1)``. Only real documents count (the balancer's
    padding document is left out). Returns float64 ``[W]``.
    """
    return _rank_work(*_check(doc_lens, cp_world_size, length_multiple))


def _prefix_work(lens: np.ndarray):
    """``F(x)``: causal work of the first ``x`` tokens of the row (``x`` clipped to its length)."""
    ends = np.cumsum(lens)
    total = int(ends[-1]) if lens.size else 0
    starts = np.append(ends - lens, total)
    before = np.append(np.cumsum(causal_pairs(lens)) - causal_pairs(lens), causal_pairs(lens).sum())

    def prefix(x: np.ndarray) -> np.ndarray:
        x = np.minimum(x, total)
        doc = np.searchsorted(ends, x, side="right")
        return before[doc] + causal_pairs(x - starts[doc])

    return prefix


def _rank_work(lens: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Work of each slice ``[bounds[r], bounds[r + 1])`` of the row with documents ``lens`` in order."""
    return np.diff(_prefix_work(lens)(bounds))


def _score(works: np.ndarray) -> np.ndarray:
    # The max decides; the next busiest ranks break ties, so moves that relieve them count too.
    ranked = -np.sort(-works, axis=-1)
    return ranked @ (_TIE_WEIGHT ** np.arange(works.shape[-1]))


def _candidate_pairs(lens: np.ndarray, ends: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(i, j)`` of the moves worth scoring, in both orders.

    Every pair in short rows. In long ones, the pairs of a key document (one cut by a slice
    boundary, or one of the longest: the moves that shift work in big steps) with a partner: a
    key document, or one of :data:`_PARTNERS` documents spread evenly along the row.
    """
    n = lens.size
    if n <= _FULL_SEARCH:
        pairs = ~np.eye(n, dtype=bool)
        return np.nonzero(pairs)
    cut = np.minimum(np.searchsorted(ends, bounds[1:-1], side="right"), n - 1)
    keys = np.unique(np.concatenate([cut, np.argsort(-lens, kind="stable")[:_KEY_LONGEST]]))
    spread = np.linspace(0, n - 1, _PARTNERS).astype(np.int64)
    partners = np.unique(np.concatenate([keys, spread]))
    ii, jj = np.repeat(keys, partners.size), np.tile(partners, keys.size)
    keep = ii != jj
    ii, jj = ii[keep], jj[keep]
    # (key, key) pairs come twice in each order; scoring them twice is cheaper than a dedup.
    return np.concatenate([ii, jj]), np.concatenate([jj, ii])


def _move_scores(
    lens: np.ndarray, bounds: np.ndarray, focus: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scores of every swap ``(i, j)`` and every move of document ``i`` to position ``j``.

    Only moves whose block holds one of the ``focus`` boundaries are scored (any other move
    leaves the work at those boundaries as it is). Returns ``(scores, kinds, i, j)``, one entry
    per candidate: kind 0 swaps the documents at positions ``i < j``, kind 1 moves the document at
    ``i`` to position ``j``.
    """
    n = lens.size
    prefix = _prefix_work(lens)
    ends = np.cumsum(lens)
    starts = ends - lens
    work = causal_pairs(lens)
    done = np.cumsum(work)  # F at each document's end; F at its start is done - work
    inner = bounds[1:-1][None, :]
    base = prefix(inner)
    ii, jj = _candidate_pairs(lens, ends, bounds)
    lo, hi = np.minimum(starts[ii], starts[jj]), np.maximum(ends[ii], ends[jj])
    cuts = ((focus[None, :] >= lo[:, None]) & (focus[None, :] < hi[:, None])).any(axis=1)
    ii, jj = ii[cuts], jj[cuts]

    def cols(k: np.ndarray) -> tuple[np.ndarray, ...]:
        return starts[k, None], ends[k, None], lens[k, None], work[k, None], done[k, None]

    # Move i forward to position j > i: documents i+1..j shift left by d_i, i ends the block.
    f = jj > ii
    si, ei, di, wi, _ = cols(ii[f])
    sj, ej, dj, wj, Fj = cols(jj[f])
    tail = ej - di
    inside = (inner >= si) & (inner < ej)
    fwd = np.where(
        inside, np.where(inner < tail, prefix(inner + di) - wi, Fj - wi + causal_pairs(inner - tail)), base
    )
    # Move i back to position j < i: i starts the block, documents j..i-1 shift right by d_i.
    b = ~f
    si, ei, di, wi, _ = cols(ii[b])
    sj, ej, dj, wj, Fj = cols(jj[b])
    head = sj + di
    inside = (inner >= sj) & (inner < ei)
    bwd = np.where(inside, np.where(inner < head, Fj - wj + causal_pairs(inner - sj), prefix(inner - di) + wi), base)
    # Swap i < j: j takes i's place, the documents between shift by d_j - d_i.
    si, ei, di, wi, Fi = cols(ii[f])
    sj, ej, dj, wj, Fj = cols(jj[f])
    inside = (inner >= si) & (inner < ej)
    swapped = np.where(
        inner < si + dj,
        Fi - wi + causal_pairs(inner - si),
        np.where(inner < ej - di, prefix(inner - (dj - di)) + wj - wi, Fj - wi + causal_pairs(inner - ej + di)),
    )
    swapped = np.where(inside, swapped, base)

    total = work.sum()
    prefixes = np.concatenate([swapped, fwd, bwd])
    works = np.diff(
        np.concatenate([np.zeros((len(prefixes), 1)), prefixes, np.full((len(prefixes), 1), total)], axis=1),
        axis=1,
    )
    kinds = np.repeat(np.array([0, 1, 1], dtype=np.int8), [f.sum(), f.sum(), b.sum()])
    return _score(works), kinds, np.concatenate([ii[f], ii[f], ii[b]]), np.concatenate([jj[f], jj[f], jj[b]])


def _apply(order: np.ndarray, kind: int, i: int, j: int) -> np.ndarray:
    if kind == 0:
        order = order.copy()
        order[i], order[j] = order[j], order[i]
        return order
    return np.insert(np.delete(order, i), j, order[i])


def _local_search(
    lens: np.ndarray, order: np.ndarray, bounds: np.ndarray, good_enough: float
) -> tuple[np.ndarray, float]:
    """Best-improvement descent from ``order`` until its score is ``good_enough``; returns the
    order and its score."""
    works = _rank_work(lens[order], bounds)
    current = float(_score(works))
    inner = bounds[1:-1]
    for _ in range(min(_MAX_STEPS, max(_MIN_STEPS, _STEP_BUDGET // len(order)))):
        if current <= good_enough:
            break
        # Only moves across the busiest rank's own boundaries can lower the max: try them first,
        # then every boundary (moves that relieve the next busiest ranks).
        busiest = int(np.argmax(works))
        for focus in (inner[max(busiest - 1, 0) : busiest + 1], inner):
            scores, kinds, ii, jj = _move_scores(lens[order], bounds, focus)
            best = int(np.argmin(scores)) if scores.size else -1
            if best >= 0 and scores[best] < current * (1.0 - 1e-12):
                break
        else:
            break
        current = float(scores[best])
        order = _apply(order, int(kinds[best]), int(ii[best]), int(jj[best]))
        works = _rank_work(lens[order], bounds)
    return order, current


def _heavy_first_order(lens: np.ndarray, bounds: np.ndarray, threshold: float) -> np.ndarray:
    """An order built around the documents too heavy to sit whole in one rank.

    A document is heavy when its causal work exceeds ``threshold`` times the mean rank work. Each
    heavy document, longest first, takes the next free run of ranks and starts at the offset
    that minimises the busiest rank it touches, counting the rest of each of those ranks as
    filled at the light documents' mean work per token. The light documents then go, longest
    first, to the least loaded rank with room for them (the heavy pieces already counted; with no
    room anywhere, to the rank with the most), and each rank lays its light documents out
    short-long-short, so that a slice boundary that falls inside them cuts a short one.
    """
    world, local = bounds.size - 1, int(bounds[1])
    total = int(lens.sum())
    room = np.clip(total - bounds[:-1], 0, local).astype(np.float64)
    tokens, work = np.zeros(world), np.zeros(world)
    by_len = np.argsort(-lens, kind="stable")
    heavy_count = int(np.sum(causal_pairs(lens) > threshold * causal_pairs(lens).sum() / world))
    light = by_len[heavy_count:]
    per_token = causal_pairs(lens[light]).sum() / max(int(lens[light].sum()), 1)
    starting = {}  # rank -> the heavy document that starts in it
    rank = 0
    touched = np.arange(-(-(local + int(lens[by_len[0]])) // local))
    step = max(local // 256, 1)
    for doc in by_len[:heavy_count].tolist():
        length = int(lens[doc])

        def pieces(offset: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lo = np.clip(touched * local - offset[:, None], 0, length)
            hi = np.clip((touched + 1) * local - offset[:, None], 0, length)
            own = causal_pairs(hi) - causal_pairs(lo)
            held = hi - lo
            cost = np.where(held > 0, own + per_token * (room[np.minimum(rank + touched, world - 1)] - held), 0.0)
            fits = ((rank + touched < world) | (held == 0)).all(axis=1)
            return np.where(fits, cost.max(axis=1), np.inf), own, held

        # A coarse scan of the start offsets, then every offset around the best one.
        cost, _, _ = pieces(np.arange(0, local, step))
        if not np.isfinite(cost).any():
            light = np.append(light, doc)  # no free run of ranks left: treat it as light
            continue
        near = int(np.argmin(cost)) * step
        offsets = np.arange(max(near - step, 0), min(near + step, local))
        cost, own, held = pieces(offsets)
        best = int(np.argmin(cost))
        used = held[best] > 0
        tokens[rank + touched[used]] += held[best, used]
        work[rank + touched[used]] += own[best, used]
        starting[rank] = doc
        rank += int(touched[used].max()) + 1
    members = [[] for _ in range(world)]
    tokens, work, room = tokens.tolist(), work.tolist(), room.tolist()
    light = light[np.argsort(-lens[light], kind="stable")]
    for doc, length in zip(light.tolist(), lens[light].tolist()):  # plain Python: W is small
        target, least = -1, np.inf
        for r in range(world):
            if tokens[r] + length <= room[r] and work[r] < least:
                target, least = r, work[r]
        if target < 0:
            target = max(range(world), key=lambda r: room[r] - tokens[r])
        tokens[target] += length
        work[target] += length * (length + 1) / 2
        members[target].append(doc)
    order = []
    for r in range(world):
        ascending = sorted(members[r], key=lens.__getitem__)
        order += ascending[0::2] + ascending[1::2][::-1]
        if r in starting:
            order.append(starting[r])
    return np.array(order, dtype=np.int64)


def llama3_balanced_order(
    doc_lens: np.ndarray, cp_world_size: int, length_multiple: int | None = None
) -> np.ndarray:
    """A permutation of the documents of a row that evens out the llama3 causal work per rank.

    ``doc_lens`` are the lengths of the documents of one (flattened) packed row. Rank ``r`` holds
    ``[r L, (r + 1) L)`` of the row padded at its end to a multiple of
    ``W · (length_multiple or 1)``; the returned int64 permutation ``perm`` (``doc_lens[perm]`` is
    the new order) minimises, approximately, the largest per-rank causal work
    (:func:`llama3_rank_work`). Documents stay whole, so no token's attention changes. The result
    is a deterministic function of the arguments and never worse than the original order.

    Every given document counts, the instances' padding documents included (the kernel computes
    them like any other); the balancer's own end padding (under ``W · length_multiple`` tokens)
    does not. Zero-length documents go to the end.
    """
    lens, bounds = _check(doc_lens, cp_world_size, length_multiple)
    identity = np.arange(lens.size, dtype=np.int64)
    real = identity[lens > 0]
    if real.size < 2 or cp_world_size == 1:
        return identity
    # Zero-length documents change nothing; search over the others and put them back at the end.
    real_lens = lens[real]
    # Stop as soon as the busiest rank is within 1% of a bound that no order beats.
    good_enough = _GOOD_ENOUGH * busiest_rank_bound(real_lens, bounds)
    seeds = [_heavy_first_order(real_lens, bounds, t) for t in _HEAVY]
    # The original order is a seed too, and descents only improve: never worse than it.
    seeds += [seed[::-1] for seed in seeds] + [np.arange(real.size)]
    scores = [float(_score(_rank_work(real_lens[seed], bounds))) for seed in seeds]
    # Long rows: descend from the best seed only. Short ones are cheap: descend from each, since
    # a descent can stall where another start does not.
    starts = np.argsort(scores, kind="stable")[: None if real.size <= _FULL_SEARCH else 1]
    order, score = seeds[starts[0]], scores[starts[0]]
    for start in starts.tolist():
        if score <= good_enough:
            break
        found, found_score = _local_search(real_lens, seeds[start], bounds, good_enough)
        if found_score < score:
            order, score = found, found_score
    return np.concatenate([real[order], identity[lens == 0]])


def reorder_documents(cu_doc_lens: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The row with its documents in the order ``perm``: its boundaries and a gather index.

    Returns ``(cu, source)``: int64 boundaries of the reordered row, and for each of its tokens the
    position it comes from in the original row (documents stay whole and keep their order inside).
    """
    cu_doc_lens = np.asarray(cu_doc_lens, dtype=np.int64)
    lens = np.diff(cu_doc_lens)[perm]
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    source = np.repeat(cu_doc_lens[:-1][perm] - cu[:-1], lens) + np.arange(cu[-1])
    return cu, source
