"""Benchmark of the balance-aware llama3 order: imbalance before/after over random length mixes.

Rows of ``seq_len`` tokens are filled with lognormal document lengths (the last one cut to fit),
as a concat packer would; batches are such rows flattened, as the collator orders them. For every
mix the figures are over the rows of max/mean causal work under llama3 slicing: the original
order, :func:`llama3_balanced_order`, and a lower bound no order can beat (see
:func:`work_lower_bound`), the p90 of each and of their per-row ratio (the gap), and the time.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from cp_data.balancers.ordering import llama3_balanced_order, llama3_rank_work
from cp_data.balancers.pairs import fill_work_bound

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
    spreading it over as many documents as possible (:func:`~cp_data.balancers.pairs.fill_work_bound`).
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
    spread = own[:, single] + fill_work_bound(others, local)[np.clip(room[:, single], 0, local)]
    window[:, single] = np.maximum(window[:, single], spread)
    busiest = np.where(hi[:, last] > lo[:, first], window, 0.0).max(axis=1).min()
    return max(float((lens * (lens + 1) / 2).sum() / cp_world_size), float(busiest))


def _imbalance(works: np.ndarray) -> float:
    return float(works.max() / works.mean())


def _case(rows: list[np.ndarray], cp_world_size: int, progress) -> dict:
    """Imbalance before/after and the bound over ``rows``; ms of CPU time per row for the order."""
    before, after, bound, seconds = [], [], [], 0.0
    for lens in rows:
        start = time.thread_time()
        perm = llama3_balanced_order(lens, cp_world_size)
        seconds += time.thread_time() - start
        works = llama3_rank_work(lens, cp_world_size)
        before.append(_imbalance(works))
        after.append(_imbalance(llama3_rank_work(lens[perm], cp_world_size)))
        bound.append(work_lower_bound(lens, cp_world_size) / works.mean())
        progress.update()
    gap = np.array(after) / np.array(bound)
    return dict(
        before=float(np.mean(before)),
        after=float(np.mean(after)),
        after_p90=float(np.quantile(after, 0.9)),
        bound=float(np.mean(bound)),
        bound_p90=float(np.quantile(bound, 0.9)),
        gap_p90=float(np.quantile(gap, 0.9)),
        gap_max=float(gap.max()),
        docs_per_row=float(np.mean([len(r) for r in rows])),
        ms_per_row=1e3 * seconds / len(rows),
        rows=len(rows),
    )


def run(
    num_rows: int = 200,
    seq_len: int = 8192,
    cp_world_size: int = 4,
    num_batches: int = 16,
    batch_size: int = 8,
    batch_world_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Before/after imbalance per mix, on single rows and on flattened batches.

    ``{case: {before, after, after_p90, bound, bound_p90, gap_p90, gap_max, ms_per_row, ...}}``
    where a case is a mix on ``num_rows`` rows of ``seq_len`` at ``cp_world_size``, or on
    ``num_batches`` batches of ``batch_size`` such rows flattened (what the collator orders) at
    ``batch_world_size``. ``gap`` is a row's balanced max/mean over its bound; ``ms_per_row`` is
    the CPU time of :func:`llama3_balanced_order` per row (per batch).
    """
    out = {}
    total = len(MIXES) * (num_rows + num_batches)
    with tqdm(total=total, desc="ordering bench", disable=not progress) as bar:
        for name, (median, sigma) in MIXES.items():
            rows = sample_rows(num_rows, seq_len, median, sigma, seed)
            out[f"W={cp_world_size}, rows: {name}"] = _case(rows, cp_world_size, bar)
        for name, (median, sigma) in MIXES.items():
            rows = sample_rows(num_batches * batch_size, seq_len, median, sigma, seed + 1)
            batches = [np.concatenate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
            out[f"W={batch_world_size}, {batch_size}-row batches: {name}"] = _case(batches, batch_world_size, bar)
    return out


def main(quick: bool = False) -> dict:
    """Print the before/after table (``quick``: 40 rows and 4 batches per mix)."""
    result = run(num_rows=40, num_batches=4) if quick else run()
    print("llama3 document order: max/mean causal work per row (p90 over rows; gap = balanced / bound)")
    head = (
        f"{'case':<72} {'docs':>5} {'original':>9} {'balanced':>9} {'p90':>6} {'bound':>6} "
        f"{'p90':>6} {'gap p90':>7} {'ms/row':>7}"
    )
    print(head)
    for name, r in result.items():
        print(
            f"{name:<72} {r['docs_per_row']:>5.1f} {r['before']:>9.3f} {r['after']:>9.3f} "
            f"{r['after_p90']:>6.3f} {r['bound']:>6.3f} {r['bound_p90']:>6.3f} {r['gap_p90']:>7.3f} "
            f"{r['ms_per_row']:>7.2f}"
        )
    return result


if __name__ == "__main__":
    main()
