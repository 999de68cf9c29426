"""Matplotlib figures of a sharded batch: shard map, per-rank work, document lengths.

Every function returns the :class:`~matplotlib.figure.Figure` (shown inline in a notebook) and
saves it when ``path`` is given. Call :func:`use_file_backend` first when nothing is displayed
(the CLI does).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import BalancerComparison, plural
from .shard_map import ShardMap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["use_file_backend", "plot_shard_map", "plot_rank_work", "plot_doc_lengths"]


def use_file_backend() -> None:
    """Switch matplotlib to the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")


def _figure(**kwargs: Any) -> "Figure":
    from matplotlib.figure import Figure

    # A bare Figure: no pyplot state, nothing kept alive after the caller drops it.
    return Figure(layout="constrained", **kwargs)


def _rank_colors(world: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if world <= 10 else "tab20"]
    return [cmap(r % cmap.N) for r in range(world)]


def _finish(fig: "Figure", path: str | Path | None) -> "Figure":
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def plot_shard_map(
    smap: ShardMap, path: str | Path | None = None, max_docs: int = 60, title: str | None = None
) -> "Figure":
    """Documents (rows) × positions inside each document, coloured by the rank holding them.

    Documents are numbered in row order; the padding that ends a packed row is drawn hatched as
    "row padding", not numbered. A last "balancer padding" row shows the padding each rank's
    shard gets from the balancer, when there is any. Only the first ``max_docs`` documents are
    drawn. ``title`` replaces the balancer's name at the start of the title.
    """
    lens = np.diff(smap.cu_doc_lens)
    shown = min(len(lens), max_docs)
    real = np.ones(len(lens), bool) if smap.real_documents is None else np.asarray(smap.real_documents)
    colors = _rank_colors(smap.cp_world_size)
    has_padding = bool(smap.padding.sum())
    fig = _figure(figsize=(9, 1.2 + 0.22 * (shown + has_padding)))
    ax = fig.add_subplot()
    starts, run_lens, ranks = smap.runs()
    doc = np.searchsorted(smap.cu_doc_lens, starts, side="right") - 1
    offset = starts - smap.cu_doc_lens[doc]
    for is_real in (True, False):
        keep = (doc < shown) & (real[doc] == is_real)
        ax.barh(
            doc[keep],
            run_lens[keep],
            left=offset[keep],
            height=0.8,
            color=[colors[r] for r in ranks[keep]],
            hatch=None if is_real else "//",
            edgecolor="white",
            linewidth=0,
        )
    number = np.cumsum(real) - 1  # real documents are numbered 0, 1, ... in row order
    labels = [str(number[d]) if real[d] else "row padding" for d in range(shown)]
    if has_padding:
        pad_left = np.concatenate([[0], np.cumsum(smap.padding)[:-1]])
        ax.barh(
            np.full(smap.cp_world_size, shown),
            smap.padding,
            left=pad_left,
            height=0.8,
            color=colors,
            hatch="//",
            edgecolor="white",
            linewidth=0,
        )
        labels.append("balancer padding")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("position inside the document")
    ax.set_ylabel("document")
    hidden = f" (first {shown} of {len(lens)} rows)" if shown < len(lens) else ""
    ax.set_title(f"{title or smap.balancer}: which rank holds each token, W={smap.cp_world_size}{hidden}")
    _legend_outside(ax, colors)
    return _finish(fig, path)


def _legend_outside(ax: Any, colors: list) -> None:
    """Rank colours and the hatch of padding to the right of the axes, never over the bars."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=f"rank {r}") for r, c in enumerate(colors)]
    handles.append(Patch(facecolor="lightgray", hatch="//", label="padding"))
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_rank_work(
    comparison: BalancerComparison, path: str | Path | None = None, label: str | None = None
) -> "Figure":
    """Per-rank causal work, one group of bars per balancer (padding work stacked, hatched).

    ``label`` names the batch in the title (e.g. ``"batch 3 (rows 12, 40)"``).
    """
    names = list(comparison.metrics)
    world = comparison.metrics[names[0]].cp_world_size
    colors = _rank_colors(world)
    fig = _figure(figsize=(2.2 + 1.6 * len(names), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / world
    for i, name in enumerate(names):
        m = comparison.metrics[name]
        x = i + (np.arange(world) - (world - 1) / 2) * width
        ax.bar(x, m.work, width, color=colors)
        ax.bar(x, m.padding_work, width, bottom=m.work, color=colors, alpha=0.35, hatch="//")
        ax.text(
            i,
            float((m.work + m.padding_work).max()),
            f"{m.work_imbalance:.2f}x",
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("query-key pairs")
    top = max(float((m.work + m.padding_work).max()) for m in comparison.metrics.values())
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)  # room for the labels
    ax.set_title(f"{label + ': ' if label else ''}causal attention work per rank (label: max/mean)")
    _legend_outside(ax, colors)
    return _finish(fig, path)


def plot_doc_lengths(
    doc_lens: Any, path: str | Path | None = None, bins: int = 40, label: str | None = None
) -> "Figure":
    """Histogram of document lengths (log-spaced bins); empty documents are counted in the title.

    ``label`` says what the lengths are (e.g. ``"corpus before packing"``) at the start of the title.
    """
    lens = np.asarray(doc_lens, dtype=np.int64)
    empty = int((lens <= 0).sum())
    lens = lens[lens > 0]
    fig = _figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    if lens.size:
        edges = np.unique(np.geomspace(1, lens.max() + 1, bins).astype(np.int64))
        ax.hist(lens, bins=edges if edges.size > 1 else 1, color="tab:blue")
        ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    median = int(np.median(lens)) if lens.size else 0
    skipped = f", {empty} empty not shown" if empty else ""
    what = f"{label}: " if label else ""
    ax.set_title(f"{what}{plural(lens.size, 'document')}, median {median} tokens{skipped}")
    return _finish(fig, path)
