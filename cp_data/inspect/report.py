"""Reports over several batches (what ``cp-data demo`` and ``cp-data inspect`` print)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from cp_data.balancers import RingAttentionLoadBalancerType

from .metrics import REORDERED, BalancerComparison, ShardMetrics, compare_balancers, row_from_instances
from .shard_map import shard_map

__all__ = ["InspectReport", "inspect_batches", "shard_previews", "save_plots"]


@dataclass
class InspectReport:
    """Balancer comparisons of consecutive batches, with their aggregate."""

    cp_world_size: int
    seq_len: int
    batch_size: int
    length_multiple: int | None
    comparisons: list[BalancerComparison] = field(default_factory=list)
    doc_lens: list[np.ndarray] = field(default_factory=list)
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
            batches=[c.to_dict() for c in self.comparisons],
        )

    def render(self) -> str:
        """The aggregate table (and the first batch's per-rank tables)."""
        lines = [
            f"{len(self.comparisons)} batch(es) of {self.batch_size} x {self.seq_len} tokens, "
            f"W={self.cp_world_size}"
            + (f", length_multiple={self.length_multiple}" if self.length_multiple else "")
        ]
        if self.packing:
            lines.append("packing: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.packing.items()))
        head = (
            f"{'balancer':<18} {'work max/mean':>13} {'worst batch':>11} {'compute max/mean':>16} "
            f"{'tokens max/mean':>15} {'padding':>8}"
        )
        lines += [
            "",
            "mean over batches (work: real queries; compute: padding queries too)",
            head,
            "-" * len(head),
        ]
        summary = self.summary()
        for name, s in summary.items():
            lines.append(
                f"{name:<18} {s['work_imbalance_mean']:>13.3f} {s['work_imbalance_max']:>11.3f} "
                f"{s['compute_imbalance_mean']:>16.3f} {s['token_imbalance_mean']:>15.3f} "
                f"{s['padding_fraction']:>8.2%}"
            )
        if "ulysses" in summary:
            lines.append("ulysses: heads are split after the all-to-all, so every rank computes total/W")
        return "\n".join(lines)


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
    total: int | None = None,
    progress: bool = True,
) -> InspectReport:
    """:func:`compare_balancers` on each batch of packed instances, with a progress bar."""
    kinds = list(balancers) if balancers is not None else list(RingAttentionLoadBalancerType)
    report = InspectReport(cp_world_size, seq_len, batch_size, length_multiple)
    for instances in tqdm(batches, total=total, desc="inspect batches", unit="batch", disable=not progress):
        row = row_from_instances(instances, pad_token_id)
        report.comparisons.append(
            compare_balancers(row, cp_world_size, kinds, length_multiple=length_multiple)
        )
        report.doc_lens.append(row.doc_lens[row.real_documents])
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
    report: InspectReport, directory: str | Path, first_batch: Sequence[dict] | None = None
) -> list[Path]:
    """Shard maps of the first batch, work bars and the document length histogram, as PNG files."""
    from . import plots

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if report.doc_lens:
        written.append(directory / "doc_lengths.png")
        plots.plot_doc_lengths(np.concatenate(report.doc_lens), written[-1])
    if report.comparisons:
        written.append(directory / "rank_work.png")
        plots.plot_rank_work(report.comparisons[0], written[-1])
    if first_batch is not None:
        row = row_from_instances(first_batch)
        world, multiple = report.cp_world_size, report.length_multiple
        for name in report.comparisons[0].metrics if report.comparisons else ():
            written.append(directory / f"shard_map_{name}.png")
            if name == REORDERED:
                reordered = row.llama3_reordered(world, multiple)
                smap = shard_map(reordered, "llama3", world, length_multiple=multiple)
            else:
                smap = shard_map(row, name, world, length_multiple=multiple)
            plots.plot_shard_map(smap, written[-1], title=name)
    return written
