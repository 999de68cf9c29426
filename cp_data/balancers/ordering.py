"""Balance-aware document order for llama3 sharding.

llama3 gives every rank a contiguous slice of the packed row. With causal document masking a
query at offset ``p`` of its document attends to ``p + 1`` keys, so the work of a slice depends
on where the documents of the row start: in the original order the later ranks (or the rank that
holds the tail of a long document) do far more work than the others. Reordering whole documents
changes no token's attention (each document keeps its own keys, in order) and, chosen well, evens
the work out.

:func:`llama3_balanced_order` finds such an order by best-improvement local search over a few
starting orders (the longest document among the shortest ones in the ranks it spans, at the start
and at the end of the row; a greedy "snake" deal of the longest documents; on short rows the
original order). Every candidate move — swap two documents,
or move one document to another place — is scored at once in closed form: the work of a rank is
``F(end) - F(start)`` where ``F(x)`` is the causal work of the first ``x`` tokens, and a move only
changes ``F`` inside the block it rearranges, so scoring all ``O(n^2)`` moves costs
``O(n^2 · W · log n)`` numpy work per step, with no Python loop over moves or documents (rows of
more than 32 documents score only the moves that involve a cut or one of the 8 longest
documents). On 8192-token rows of 15-60 documents this takes a few milliseconds.
"""

from __future__ import annotations

import numpy as np

from .validation import ShardingError, check_length_multiple, check_lengths, round_up

__all__ = ["llama3_balanced_order", "llama3_rank_work", "reorder_documents"]

_MAX_STEPS = 64  # moves per descent; descents end far earlier in practice
_STEP_BUDGET = 20_000  # documents x moves per descent: bounds the cost on long flattened batches
_TIE_WEIGHT = 1e-3  # weight of the 2nd busiest rank in the score (1e-6 for the 3rd, ...)
_FULL_SEARCH = 32  # rows with more documents score only moves that involve a key document
_KEY_LONGEST = 8  # the longest documents count as key documents
_GOOD_ENOUGH = 1.01
"""Stop searching once the busiest rank is within 1% of the mean (the bound no order beats)."""


def _tri(x: np.ndarray | float) -> np.ndarray:
    """Causal work of the first ``x`` tokens of one document: ``x (x + 1) / 2`` pairs."""
    x = np.asarray(x, dtype=np.float64)
    return x * (x + 1.0) / 2.0


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
    before = np.append(np.cumsum(_tri(lens)) - _tri(lens), _tri(lens).sum())

    def prefix(x: np.ndarray) -> np.ndarray:
        x = np.minimum(x, total)
        doc = np.searchsorted(ends, x, side="right")
        return before[doc] + _tri(x - starts[doc])

    return prefix


def _rank_work(lens: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Work of each slice ``[bounds[r], bounds[r + 1])`` of the row with documents ``lens`` in order."""
    return np.diff(_prefix_work(lens)(bounds))


def _score(works: np.ndarray) -> np.ndarray:
    # The max decides; the next busiest ranks break ties, so moves that relieve them count too.
    ranked = -np.sort(-works, axis=-1)
    return ranked @ (_TIE_WEIGHT ** np.arange(works.shape[-1]))


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
    work = _tri(lens)
    done = np.cumsum(work)  # F at each document's end; F at its start is done - work
    inner = bounds[1:-1][None, :]
    base = prefix(inner)
    # Candidates: every pair in short rows; in long ones, the pairs that involve a key document
    # (one cut by a slice boundary, or one of the longest): the moves that shift work in big steps.
    key = np.full(n, n <= _FULL_SEARCH)
    key[np.minimum(np.searchsorted(ends, bounds[1:-1], side="right"), n - 1)] = True
    key[np.argsort(-lens, kind="stable")[:_KEY_LONGEST]] = True
    pairs = key[:, None] | key[None, :]
    np.fill_diagonal(pairs, False)
    ii, jj = np.nonzero(pairs)
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
        inside, np.where(inner < tail, prefix(inner + di) - wi, Fj - wi + _tri(inner - tail)), base
    )
    # Move i back to position j < i: i starts the block, documents j..i-1 shift right by d_i.
    b = ~f
    si, ei, di, wi, _ = cols(ii[b])
    sj, ej, dj, wj, Fj = cols(jj[b])
    head = sj + di
    inside = (inner >= sj) & (inner < ei)
    bwd = np.where(inside, np.where(inner < head, Fj - wj + _tri(inner - sj), prefix(inner - di) + wi), base)
    # Swap i < j: j takes i's place, the documents between shift by d_j - d_i.
    si, ei, di, wi, Fi = cols(ii[f])
    sj, ej, dj, wj, Fj = cols(jj[f])
    inside = (inner >= si) & (inner < ej)
    swapped = np.where(
        inner < si + dj,
        Fi - wi + _tri(inner - si),
        np.where(inner < ej - di, prefix(inner - (dj - di)) + wj - wi, Fj - wi + _tri(inner - ej + di)),
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


def _local_search(lens: np.ndarray, order: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """Best-improvement descent from ``order``; returns the order and its score."""
    works = _rank_work(lens[order], bounds)
    current = float(_score(works))
    good_enough = _GOOD_ENOUGH * works.sum() / len(works)
    inner = bounds[1:-1]
    for _ in range(min(_MAX_STEPS, max(16, _STEP_BUDGET // len(order)))):
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


def _snake_order(lens: np.ndarray, cp_world_size: int) -> np.ndarray:
    """Longest documents dealt to ranks in snake order (0..W-1, W-1..0, ...), short ones at the ends.

    A cheap starting point: each rank gets a similar mix of long and short documents, and the
    short ones sit where the slice boundaries will cut.
    """
    by_len = np.argsort(-lens, kind="stable")
    turn = np.arange(lens.size) % (2 * cp_world_size)
    group = np.where(turn < cp_world_size, turn, 2 * cp_world_size - 1 - turn)
    # Within a group: ascending to the middle, then descending, so long documents sit inside.
    rank_in_group = np.arange(lens.size) // (2 * cp_world_size) * 2 + (turn >= cp_world_size)
    side = rank_in_group % 2
    key = np.where(side == 0, -rank_in_group, rank_in_group)
    return by_len[np.lexsort((key, group))]


def _window_order(lens: np.ndarray, cp_world_size: int, local_len: int) -> np.ndarray:
    """The longest document inside the first ranks it must touch, among the shortest documents.

    A long document's tail is expensive wherever it lands, so the ranks it spans should hold
    cheap (short) documents around it; the longer documents fill the other ranks, dealt as in
    :func:`_snake_order`. The descent then fixes the split point.
    """
    by_len = np.argsort(lens, kind="stable")
    longest, rest = by_len[-1], by_len[:-1]
    span = min(cp_world_size, -(-int(lens[longest]) // local_len) + 1)
    room = span * local_len - int(lens[longest])
    fill = rest[: int(np.searchsorted(np.cumsum(lens[rest]), room))]
    others = rest[fill.size :]
    others = others[_snake_order(lens[others], max(cp_world_size - span, 1))]
    return np.concatenate([fill[1::2], [longest], fill[0::2], others]).astype(np.int64)


def llama3_balanced_order(
    doc_lens: np.ndarray, cp_world_size: int, length_multiple: int | None = None
) -> np.ndarray:
    """A permutation of the documents of a row that evens out the llama3 causal work per rank.

    ``doc_lens`` are the lengths of the documents of one (flattened) packed row. Rank ``r`` holds
    ``[r L, (r + 1) L)`` of the row padded at its end to a multiple of
    ``W · (length_multiple or 1)``; the returned int64 permutation ``perm`` (``doc_lens[perm]`` is
    the new order) minimises, approximately, the largest per-rank causal work
    (:func:`llama3_rank_work`). Documents stay whole, so no token's attention changes. The result
    is deterministic and never worse than the original order.

    Every given document counts, the instances' padding documents included (the kernel computes
    them like any other); the balancer's own end padding (under ``W · length_multiple`` tokens)
    does not. Zero-length documents go to the end.
    """
    lens, bounds = _check(doc_lens, cp_world_size, length_multiple)
    identity = np.arange(lens.size, dtype=np.int64)
    # Zero-length documents change nothing; search over the others and put them back at the end.
    real = identity[lens > 0]
    if real.size < 2 or cp_world_size == 1:
        return identity  # no order of fewer than two real documents changes the work
    good_enough = _GOOD_ENOUGH * _tri(lens).sum() / cp_world_size
    window = real[_window_order(lens[real], cp_world_size, int(bounds[1]))]
    # The snake first: on long (flattened) rows it is usually good enough at once.
    starts = [real[_snake_order(lens[real], cp_world_size)], window, window[::-1]]
    if real.size <= _FULL_SEARCH:
        starts.append(real)  # cheap on short rows; rescues the rows where the others stall
    best, best_score = identity, float(_score(_rank_work(lens, bounds)))
    for start in starts:
        if best_score <= good_enough:
            break
        order, score = _local_search(lens, start, bounds)
        if score < best_score:
            best, best_score = np.concatenate([order, identity[lens == 0]]), score
    return best


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
