"""Benchmark of the balance-aware llama3 order: imbalance before/after over random length mixes.

Rows of ``seq_len`` tokens are filled with lognormal document lengths (the last one cut to fit),
as a concat packer would. For every mix the figures are averages over the rows of max/mean causal
work under llama3 slicing: the original order, :func:`llama3_balanced_order`, and a lower bound
no order can beat (see :func:`work_lower_bound`).
"""

from __future__ import annotations

import time

import numpy as np

from cp_data.balancers.ordering import llama3_balanced_order, llama3_rank_work

__all__ = ["MIXES", "sample_rows", "work_lower_bound", "run", "main"]

MIXES = {
    "web (lognormal median 300, sigma 0.8)": (300.0, 0.8),
    "mixed (lognormal median 200, sigma 1.0)": (200.0, 1.0),
    "long-tailed (lognormal median 400, sigma 1.0)": (400.0, 1.0),
    "many short (lognormal median 50, sigma 1.5)": (50.0, 1.5),
}
"""Name -> (median, sigma) of the document length distribution."""


def sample_rows(num_rows: int, seq_len: int, median: float, sigma: float, seed: int = 0) -> list[np.ndarray]:
    """``num_rows`` rows of lognormal document lengths, each summing to ``seq_len``."""
    rng = np.random.default_rng(seed)
    # Draw more lengths than any row needs, then cut each row where it reaches seq_len.
    per_row = int(4 * seq_len / max(1.0, median)) + 16
    draws = np.clip(rng.lognormal(np.log(median), sigma, size=(num_rows, per_row)), 1, seq_len).astype(
        np.int64
    )
    rows = []
    for lens in draws:
        ends = np.cumsum(lens)
        k = int(np.searchsorted(ends, seq_len))  # the document that reaches seq_len, cut to fit
        row = lens[: k + 1].copy()
        row[-1] -= int(ends[k]) - seq_len
        rows.append(row)
    return rows


def _fill_work_bound(other_lens: np.ndarray, max_tokens: int) -> np.ndarray:
    """``f[c]``: least work of ``c`` tokens taken from these documents, ``c = 0..max_tokens``.

    A rank's tokens from other documents are one contiguous piece per document, and a piece of
    ``x`` tokens costs at least ``x (x + 1) / 2``; the cost is convex, so spreading ``c`` over as
    many documents as possible (pieces of ``min(d, level)`` tokens) is the cheapest.
    """
    d = np.sort(other_lens)
    level = np.arange(int(d.max()) + 1 if d.size else 1)
    # Tokens and work with every piece cut at `level`, then each piece longer than it adds level + 1.
    capped = np.minimum(d[None, :], level[:, None])
    tokens = capped.sum(axis=1)
    work = (capped * (capped + 1) / 2).sum(axis=1)
    wider = (d[None, :] > level[:, None]).sum(axis=1)
    c = np.arange(max_tokens + 1)
    k = np.clip(np.searchsorted(tokens, c, side="right") - 1, 0, len(level) - 1)
    # More tokens than all documents hold cannot happen in a real row: make them free (a bound).
    return np.where(c <= tokens[-1], work[k] + (c - tokens[k]) * (level[k] + 1.0), work[-1])


def _window_fill_bound(other_lens: np.ndarray, max_tokens: int) -> np.ndarray:
    """``g[c]``: least work of ``c`` tokens of a contiguous window taken from these documents.

    Every document inside the window is whole; only the first and the last can be partial, and
    two pieces of ``y`` tokens in all cost at least ``2 tri(y / 2)`` (convexity). So ``g`` is the
    min-plus convolution of an exact-sum knapsack over whole documents with ``2 tri(y / 2)``.
    """
    whole = np.full(max_tokens + 1, np.inf)
    whole[0] = 0.0
    for d in other_lens[(other_lens > 0) & (other_lens <= max_tokens)].tolist():
        whole[d:] = np.minimum(whole[d:], whole[:-d] + d * (d + 1) / 2)
    pieces = np.arange(max_tokens + 1) / 2.0
    pieces = 2 * pieces * (pieces + 1) / 2
    fill = np.minimum(whole, pieces)  # all whole, or all in pieces
    for y in range(1, max_tokens):
        if pieces[y] >= fill.max():  # larger pieces cannot lower any entry
            break
        fill[y:] = np.minimum(fill[y:], whole[:-y] + pieces[y])
    return fill


def work_lower_bound(doc_lens: np.ndarray, cp_world_size: int) -> float:
    """A bound on the busiest rank's work under llama3 slicing that no document order beats.

    The larger of the mean and, over every start of the longest document, the least possible
    busiest rank among those it touches. For every run of consecutive ranks it touches, their mean
    work is at least its own part there plus the cheapest fill of the rest of those ranks with the
    other documents (:func:`_window_fill_bound`); a single rank's fill is also bounded by
    spreading it over as many documents as possible (:func:`_fill_work_bound`).
    """
    lens = np.asarray(doc_lens, dtype=np.int64)
    total = int(lens.sum())
    local = -(-total // cp_world_size)
    longest_at = int(np.argmax(lens))
    longest = int(lens[longest_at])
    others = np.delete(lens, longest_at)
    start = np.arange(total - longest + 1)[:, None]
    edges = np.arange(cp_world_size + 1)[None, :] * local
    hi = np.clip(edges[:, 1:] - start, 0, longest)
    lo = np.clip(edges[:, :-1] - start, 0, longest)
    size = np.clip(np.minimum(edges[0, 1:], total) - edges[0, :-1], 0, None)
    # Every run of ranks first..last: the longest document's part there and the room left.
    first, last = np.triu_indices(cp_world_size)
    own = (hi[:, last] * (hi[:, last] + 1) / 2 - lo[:, first] * (lo[:, first] + 1) / 2).astype(np.float64)
    tokens = np.cumsum(size)[last] - np.cumsum(size)[first] + size[first]
    room = np.clip(tokens - (hi[:, last] - lo[:, first]), 0, None)
    window = (own + _window_fill_bound(others, int(room.max()))[room]) / (last - first + 1)
    single = first == last
    spread = own[:, single] + _fill_work_bound(others, local)[np.clip(room[:, single], 0, local)]
    window[:, single] = np.maximum(window[:, single], spread)
    busiest = np.where(hi[:, last] > lo[:, first], window, 0.0).max(axis=1).min()
    return max(float((lens * (lens + 1) / 2).sum() / cp_world_size), float(busiest))


def _imbalance(works: np.ndarray) -> float:
    return float(works.max() / works.mean())


def run(num_rows: int = 200, seq_len: int = 8192, cp_world_size: int = 4, seed: int = 0) -> dict:
    """Before/after imbalance per mix; ``{mix: {before, after, bound, ms_per_row, rows}}``."""
    out = {}
    for name, (median, sigma) in MIXES.items():
        rows = sample_rows(num_rows, seq_len, median, sigma, seed)
        before, after, bound = [], [], []
        start = time.perf_counter()
        perms = [llama3_balanced_order(r, cp_world_size) for r in rows]
        seconds = time.perf_counter() - start
        for lens, perm in zip(rows, perms):
            works = llama3_rank_work(lens, cp_world_size)
            before.append(_imbalance(works))
            after.append(_imbalance(llama3_rank_work(lens[perm], cp_world_size)))
            bound.append(work_lower_bound(lens, cp_world_size) / works.mean())
        out[name] = dict(
            before=float(np.mean(before)),
            after=float(np.mean(after)),
            after_p90=float(np.quantile(after, 0.9)),
            bound=float(np.mean(bound)),
            docs_per_row=float(np.mean([len(r) for r in rows])),
            ms_per_row=1e3 * seconds / num_rows,
            rows=num_rows,
        )
    return out


def main(quick: bool = False) -> dict:
    """Print the before/after table (``quick``: 40 rows per mix)."""
    num_rows, seq_len, world = (40, 8192, 4) if quick else (200, 8192, 4)
    result = run(num_rows=num_rows, seq_len=seq_len, cp_world_size=world)
    print(f"llama3 document order, W={world}, S={seq_len}: max/mean causal work over {num_rows} rows")
    print(f"{'mix':<48} {'docs':>5} {'original':>9} {'balanced':>9} {'p90':>6} {'bound':>6} {'ms/row':>7}")
    for name, r in result.items():
        print(
            f"{name:<48} {r['docs_per_row']:>5.1f} {r['before']:>9.3f} {r['after']:>9.3f} "
            f"{r['after_p90']:>6.3f} {r['bound']:>6.3f} {r['ms_per_row']:>7.2f}"
        )
    return result


if __name__ == "__main__":
    main()
