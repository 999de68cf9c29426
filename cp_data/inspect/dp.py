"""DP imbalance of a packed dataset: every DP rank's modelled step work, today's split vs balanced.

For the first steps of an epoch, the loader's :class:`~cp_data.loader.DataParallelSampler` draws
the global batches twice: split plainly (before) and DP-balanced (after). Each DP rank's
flattened batch is sharded for its CP group and measured with :func:`~cp_data.inspect.shard_metrics`;
its step work is the slowest CP rank's cost under a :class:`~cp_data.work.WorkModel`. The report
gives the DP imbalance (max / mean over DP ranks) beside the CP imbalance inside the groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from cp_data.balancers import RingAttentionLoadBalancerType
from cp_data.loader import DataParallelSampler
from cp_data.work import WorkModel, row_work

from .metrics import shard_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DPReport", "dp_report", "plot_dp_work"]


@dataclass
class DPReport:
    """Per-step, per-DP-rank modelled work before and after DP balancing."""

    balancer: str
    dp_world_size: int
    cp_world_size: int
    batch_size: int
    lookahead: int
    work_model: str
    before: np.ndarray
    """float64 [steps, dp]: step work of every DP rank, today's split (FLOPs)."""
    after: np.ndarray
    """float64 [steps, dp]: the same, DP-balanced."""
    cp_before: np.ndarray
    """float64 [steps, dp]: compute max/mean over the CP ranks of every DP rank's group, before."""
    cp_after: np.ndarray

    @staticmethod
    def _imbalance(work: np.ndarray) -> np.ndarray:
        return work.max(axis=1) / work.mean(axis=1)

    def summary(self) -> dict[str, float]:
        """DP and CP imbalance (mean and p90 over steps) before and after, and the modelled gain."""
        out = {}
        for name, dp_work, cp in (("before", self.before, self.cp_before), ("after", self.after, self.cp_after)):
            ratio = self._imbalance(dp_work)
            out[f"dp_imbalance_{name}"] = float(ratio.mean())
            out[f"dp_imbalance_p90_{name}"] = float(np.quantile(ratio, 0.9))
            out[f"cp_imbalance_{name}"] = float(cp.mean())
        out["gain"] = float(self.before.max(axis=1).sum() / self.after.max(axis=1).sum())
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types, ready for JSON."""
        return dict(
            balancer=self.balancer,
            dp_world_size=self.dp_world_size,
            cp_world_size=self.cp_world_size,
            batch_size=self.batch_size,
            lookahead=self.lookahead,
            work_model=self.work_model,
            summary=self.summary(),
            before=self.before.tolist(),
            after=self.after.tolist(),
        )

    def render(self) -> str:
        """A short text table."""
        s = self.summary()
        return "\n".join([
            f"DP balance, {self.balancer} W={self.cp_world_size}, dp={self.dp_world_size} x batch_size="
            f"{self.batch_size}, lookahead {self.lookahead}, {self.work_model} work model, {len(self.before)} steps",
            f"{'':<8} {'DP max/mean':>11} {'DP p90':>7} {'CP max/mean':>11}",
            f"{'before':<8} {s['dp_imbalance_before']:>11.3f} {s['dp_imbalance_p90_before']:>7.3f} "
            f"{s['cp_imbalance_before']:>11.3f}",
            f"{'after':<8} {s['dp_imbalance_after']:>11.3f} {s['dp_imbalance_p90_after']:>7.3f} "
            f"{s['cp_imbalance_after']:>11.3f}",
            f"modelled end-to-end gain (sum over steps of the slowest DP rank): {s['gain']:.3f}x",
        ])


def _epoch_work(sampler, lens, offsets, kind, cp_world_size, length_multiple, model, steps, bar):
    cu_all = np.concatenate([[0], np.cumsum(lens)])
    work, cp = [], []
    for (indices, _), _step in zip(sampler.global_steps(), range(steps)):
        rank_work, rank_cp = [], []
        for rows in indices:
            docs = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
            cu = np.concatenate([[0], np.cumsum(cu_all[docs + 1] - cu_all[docs])])
            m = shard_metrics(cu, kind, cp_world_size, length_multiple=length_multiple)
            costs = model.shard_costs(m)
            rank_work.append(costs.max())
            rank_cp.append(m.compute_imbalance)
        work.append(rank_work)
        cp.append(rank_cp)
        bar.update()
    return np.array(work, dtype=np.float64).reshape(-1, sampler.dp_world_size), np.array(cp).reshape(-1, sampler.dp_world_size)


def dp_report(
    packed: Any,
    *,
    dp_world_size: int,
    batch_size: int,
    cp_world_size: int,
    balancer: RingAttentionLoadBalancerType | str = "zig_zag",
    length_multiple: int | None = None,
    lookahead: int = 1,
    work_model: WorkModel | str = "llama-8b",
    steps: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> DPReport:
    """Before/after DP balancing for the first ``steps`` steps of epoch 0 of ``packed``.

    ``packed`` must tell its rows' document lengths (``row_doc_lens()``, as
    :class:`~cp_data.datasets.PackedDataset` does). Raises ``ValueError`` when it holds fewer rows
    than one global batch.
    """
    kind = RingAttentionLoadBalancerType.parse(balancer)
    model = WorkModel.preset(work_model) if isinstance(work_model, str) else work_model
    lens, offsets = packed.row_doc_lens()
    rows = len(offsets) - 1
    if rows < dp_world_size * batch_size:
        raise ValueError(
            f"only {rows} packed rows: not enough for one global batch of dp={dp_world_size} x "
            f"batch_size={batch_size}; lower --dp or --batch-size"
        )
    work = row_work(model, lens, offsets, load_balancer=kind, cp_world_size=cp_world_size, batch_size=batch_size,
                    length_multiple=length_multiple)
    common = dict(dp_rank=0, dp_world_size=dp_world_size, batch_size=batch_size, seed=seed)
    plain = DataParallelSampler(rows, **common)
    balanced = DataParallelSampler(rows, **common, row_work=work, lookahead=lookahead)
    steps = min(steps, len(plain))
    with tqdm(total=2 * steps, desc="dp balance", unit="step", disable=not progress) as bar:
        args = (lens, offsets, kind, cp_world_size, length_multiple, model, steps, bar)
        before, cp_before = _epoch_work(plain, *args)
        after, cp_after = _epoch_work(balanced, *args)
    return DPReport(kind.value, dp_world_size, cp_world_size, batch_size, lookahead, model.name,
                    before, after, cp_before, cp_after)


def plot_dp_work(report: DPReport, path: str | Path | None = None) -> "Figure":
    """Every DP rank's modelled step work per step, before and after balancing (one panel each)."""
    from matplotlib.ticker import MaxNLocator

    from .plots import _figure, _finish

    fig = _figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    summary = report.summary()
    for ax, name, work in ((axes[0], "before", report.before), (axes[1], "after", report.after)):
        steps = np.arange(len(work))
        scaled = work / 1e12
        for r in range(report.dp_world_size):
            ax.plot(steps, scaled[:, r], ".", color="tab:blue", alpha=0.5)
        ax.plot(steps, scaled.max(axis=1), "-", color="tab:red", label="slowest DP rank")
        ax.plot(steps, scaled.mean(axis=1), "--", color="gray", label="mean")
        ax.set_title(f"{name}: DP max/mean {summary[f'dp_imbalance_{name}']:.3f}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"modelled step work (TFLOPs, {report.work_model})")
    axes[1].legend(fontsize="small", loc="lower right")
    fig.suptitle(
        f"{report.balancer} W={report.cp_world_size}, dp={report.dp_world_size} x {report.batch_size} rows: "
        f"modelled gain {summary['gain']:.2f}x"
    )
    return _finish(fig, path)
