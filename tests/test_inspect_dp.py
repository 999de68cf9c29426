"""The DP balance report: every DP rank's step work as inspect measures it, before and after balancing."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("datasets")
from cp_data.inspect import row_from_instances, shard_metrics
from cp_data.inspect.dp import dp_report, plot_dp_work
from cp_data.loader import DataParallelSampler
from cp_data.work import WorkModel


@pytest.fixture(scope="module")
def packed():
    import datasets

    from cp_data.datasets import PackedDataset

    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 300, int(rng.lognormal(3.5, 1.3)) + 1).tolist() for _ in range(400)]
    return PackedDataset(datasets.Dataset.from_dict({"input_ids": docs}), 256)


@pytest.mark.parametrize("balancer", ["zig_zag", "llama3"])
def test_report_measures_each_dp_rank_on_the_rows_it_gets(packed, balancer):
    report = dp_report(packed, dp_world_size=3, batch_size=2, cp_world_size=2, balancer=balancer,
                       work_model="llama-1b", steps=4, progress=False)
    model = WorkModel.preset("llama-1b")
    sampler = DataParallelSampler(len(packed), dp_rank=0, dp_world_size=3, batch_size=2)
    for step, (indices, _) in zip(range(4), sampler.global_steps()):
        for rank, rows in enumerate(indices):
            # the rows themselves, flattened as the collator does
            m = shard_metrics(row_from_instances([packed[i] for i in rows]), balancer, 2)
            assert report.before[step, rank] == pytest.approx(model.shard_costs(m).max(), rel=1e-12)
            assert report.cp_before[step, rank] == pytest.approx(m.compute_imbalance, rel=1e-12)
    s = report.summary()
    assert report.before.shape == report.after.shape == (4, 3)
    assert s["gain"] >= 1.0 and s["dp_imbalance_after"] <= s["dp_imbalance_before"]
    assert s["dp_imbalance_before"] == pytest.approx(np.mean(report.before.max(1) / report.before.mean(1)))
    assert json.loads(json.dumps(report.to_dict()))["summary"] == s
    assert "modelled end-to-end gain" in report.render()


def test_plot_and_too_few_rows(packed, tmp_path):
    report = dp_report(packed, dp_world_size=2, batch_size=1, cp_world_size=2, steps=3, progress=False)
    fig = plot_dp_work(report, tmp_path / "dp.png")
    assert len(fig.axes) == 2 and (tmp_path / "dp.png").stat().st_size > 0
    assert [len(line.get_xdata()) for line in fig.axes[1].lines][-2:] == [3, 3]  # slowest rank and mean
    with pytest.raises(ValueError, match=f"only {len(packed)} packed rows: not enough for one global batch"):
        dp_report(packed, dp_world_size=len(packed), batch_size=2, cp_world_size=2, progress=False)
