"""Reports over several batches (what ``cp-data demo`` and ``cp-data inspect`` print)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from cp_data.balancers import RingAttentionLoadBalancerType

from .metrics import (
    REORDERED,
    BalancerComparison,
    ShardMetrics,
    compare_balancers,
    plural,
    row_from_instances,
)
from .shard_map import shard_map

__all__ = ["InspectReport", "inspect_batches", "shard_previews", "save_plots"]


@dataclass
class InspectReport:
    """Balancer comparisons of several batches, with their aggregate.

    ``rows[i]`` are the packed-dataset rows that make batch ``i`` (empty lists when unknown) and
    ``documents[i]`` its number of real documents (pieces of documents; row padding left out).
    """

    cp_world_size: int
    seq_len: int
    batch_size: int
    length_multiple: int | None
    comparisons: list[BalancerComparison] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)
    documents: list[int] = field(default_factory=list)
    packing: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per balancer, over the batches: mean and worst work imbalance, token imbalance, padding."""
        out = {}
        for name in self.comparisons[0].metrics if self.comparisons else ():
            ms = [c.metrics[name] for c in self.comparisons]
            work = [m.work_imbalance for m in ms]
            out[name] = dict(
                work_imbalance_mean=float(np.mean(work)),
                work_imbalance_max=float(np.max(work)),
                compute_imbalance_mean=float(np.mean([m.compute_imbalance for m in ms])),
                token_imbalance_mean=float(np.mean([m.token_imbalance for m in ms])),
                padding_fraction=float(np.mean([m.padding_fraction for m in ms])),
                max_rank_work_mean=float(np.mean([m.work.max() for m in ms])),
            )
        return out

    def busiest_batch(self) -> int:
        """The batch with the most documents (where the balancers differ most); the first on ties."""
        return int(np.argmax(self.documents)) if self.documents else 0

    def batch_label(self, i: int) -> str:
        """``"batch i (rows a, b)"``: how tables and plot titles name batch ``i``."""
        rows = self.rows[i] if i < len(self.rows) else []
        if not rows:
            return f"batch {i}"
        shown = ", ".join(map(str, rows[:4])) + (f", … ({len(rows)} rows)" if len(rows) > 4 else "")
        return f"batch {i} ({plural(len(rows), 'row', with_count=False)} {shown})"

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain Python types (the ``--json`` output)."""
        return dict(
            cp_world_size=self.cp_world_size,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            length_multiple=self.length_multiple,
            num_batches=len(self.comparisons),
            packing=self.packing,
            summary=self.summary(),
            batch_rows=self.rows,
            batch_documents=self.documents,
            batches=[c.to_dict() for c in self.comparisons],
        )

    def render(self) -> str:
        """The aggregate table over the batches, with a legend of its columns."""
        lines = [
            f"{plural(len(self.comparisons), 'batch')} of {self.batch_size} x {self.seq_len} tokens, "
            f"W={self.cp_world_size}"
            + (f", length_multiple={self.length_multiple}" if self.length_multiple else "")
        ]
        if self.packing:
            lines.append("packing: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.packing.items()))
        head = (
            f"{'balancer':<18} {'work max/mean':>13} {'worst batch':>11} {'compute max/mean':>16} "
            f"{'tokens max/mean':>15} {'padding':>8}"
        )
        lines += ["", f"mean over the {plural(len(self.comparisons), 'batch')}", head, "-" * len(head)]
        summary = self.summary()
        for name, s in summary.items():
            lines.append(
                f"{name:<18} {s['work_imbalance_mean']:>13.3f} {s['work_imbalance_max']:>11.3f} "
                f"{s['compute_imbalance_mean']:>16.3f} {s['token_imbalance_mean']:>15.3f} "
                f"{s['padding_fraction']:>8.2%}"
            )
        lines += ["", *LEGEND]
        if REORDERED in summary:
            lines += REORDERED_LEGEND
        if "ulysses" in summary:
            lines.append("ulysses: heads are split after the all-to-all, so every rank computes total/W")
        return "\n".join(lines)


LEGEND = [
    "work max/mean: the busiest rank's causal attention work (query-key pairs of real tokens) over",
    "  the mean of the ranks; 1.000 is even. compute: the same with padding queries counted too",
    "worst batch: the largest work max/mean of any batch inspected",
]
REORDERED_LEGEND = [
    "llama3_reordered: llama3 after reordering whole documents of the row with",
    "  cp_data.llama3_balanced_order (ContextParallelCollator(reorder_documents=True)); no token",
    "  attends to anything different, only the work per rank changes",
]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def inspect_batches(
    batches: Iterable[Sequence[dict]],
    cp_world_size: int,
    balancers: Iterable[RingAttentionLoadBalancerType | str] | None = None,
    *,
    seq_len: int,
    batch_size: int,
    length_multiple: int | None = None,
    pad_token_id: int = 0,
    rows: Sequence[Sequence[int]] | None = None,
    total: int | None = None,
    progress: bool = True,
) -> InspectReport:
    """:func:`compare_balancers` on each batch of packed instances, with a progress bar.

    ``rows`` names the packed-dataset rows of each batch (for the labels of tables and plots).
    """
    kinds = list(balancers) if balancers is not None else list(RingAttentionLoadBalancerType)
    report = InspectReport(cp_world_size, seq_len, batch_size, length_multiple)
    report.rows = [list(map(int, r)) for r in rows] if rows is not None else []
    for instances in tqdm(batches, total=total, desc="inspect batches", unit="batch", disable=not progress):
        row = row_from_instances(instances, pad_token_id)
        report.comparisons.append(
            compare_balancers(row, cp_world_size, kinds, length_multiple=length_multiple)
        )
        report.documents.append(int(row.real_documents.sum()))
    return report


def shard_previews(
    instances: Sequence[dict],
    cp_world_size: int,
    names: Iterable[str],
    decode: Any = None,
    *,
    length_multiple: int | None = None,
    pad_token_id: int = 0,
    num_tokens: int = 8,
) -> dict[str, list[dict[str, Any]]]:
    """What each rank's collated batch holds: length, first tokens (decoded when ``decode``)."""
    from cp_data.collate import ContextParallelCollator

    out = {}
    for name in names:
        options = (
            dict(load_balancer="llama3", reorder_documents=True)
            if name == REORDERED
            else dict(load_balancer=name)
        )
        ranks = []
        for r in range(cp_world_size):
            collator = ContextParallelCollator(
                cp_rank=r,
                cp_world_size=cp_world_size,
                pad_token_id=pad_token_id,
                length_multiple=length_multiple,
                **options,
            )
            ids = collator(list(instances))["input_ids"][0]
            first = ids[:num_tokens].tolist()
            ranks.append(
                dict(
                    local_len=int(ids.numel()),
                    first_ids=first,
                    first_text=decode(first) if decode is not None else None,
                )
            )
        out[name] = ranks
    return out


def render_rank_table(m: ShardMetrics, preview: list[dict[str, Any]] | None = None) -> str:
    """A per-rank table of one balancer, with each shard's first tokens when given."""
    lines = [m.render()]
    if preview:
        lines[0] = lines[0].replace("pad work", "pad work  first tokens", 1)
        body = lines[0].split("\n")
        for r, p in enumerate(preview):
            shown = p["first_text"] if p["first_text"] is not None else " ".join(map(str, p["first_ids"]))
            # Cut the text, not its repr, so the quotes stay balanced.
            body[2 + r] += "  " + repr(shown if len(shown) <= 40 else shown[:39] + "…")
        lines = body
    return "\n".join(lines)


def save_plots(
    report: InspectReport,
    directory: str | Path,
    shown: int,
    instances: Sequence[dict],
    corpus_doc_lens: Any = None,
) -> list[Path]:
    """PNG files: the work bars and every balancer's shard map of batch ``shown`` (its
    ``instances``, titled with its label), and the histogram of ``corpus_doc_lens`` (the
    corpus's document lengths before packing) when given."""
    from . import plots

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if corpus_doc_lens is not None:
        written.append(directory / "doc_lengths.png")
        plots.plot_doc_lengths(corpus_doc_lens, written[-1], label="corpus before packing")
    label = report.batch_label(shown)
    comparison = report.comparisons[shown]
    written.append(directory / "rank_work.png")
    plots.plot_rank_work(comparison, written[-1], label=label)
    row = row_from_instances(instances)
    world, multiple = report.cp_world_size, report.length_multiple
    for name in comparison.metrics:
        written.append(directory / f"shard_map_{name}.png")
        if name == REORDERED:
            smap = shard_map(row.llama3_reordered(world, multiple), "llama3", world, length_multiple=multiple)
        else:
            smap = shard_map(row, name, world, length_multiple=multiple)
        plots.plot_shard_map(smap, written[-1], title=f"{name}, {label}")
    return written
