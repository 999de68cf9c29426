"""The tiny CP training pipeline: CP=4 training equals CP=1 training; naive positions do not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# spawned workers unpickle train_tiny_cp.run_rank by module name: make pipelines/ importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import train_tiny_cp  # noqa: E402

KINDS = ("zig_zag", "llama3", "ulysses")


@pytest.fixture(scope="module")
def results() -> dict:
    return train_tiny_cp.run(4, steps=2, seq_len=64, batch_size=2)


@pytest.mark.parametrize("kind", KINDS)
def test_cp_training_equals_cp1_training(results, kind):
    assert len(results[kind]["losses"]) == 2
    assert results[kind]["loss_diff"] <= 1e-10
    assert results[kind]["weight_diff"] <= 1e-10
    assert results["CP=1"]["weight_diff"] == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_naive_local_positions_change_loss_and_weights(results, kind):
    naive = results[f"{kind} naive"]
    assert naive["loss_diff"] > 1e-5
    assert naive["weight_diff"] > 1e-4


def test_report_flags_a_mismatch(results):
    cfg = train_tiny_cp.TinyConfig(steps=2, seq_len=64, batch_size=2)
    table, ok = train_tiny_cp.report(results, cfg, 4)
    assert ok and "CP=4 equals CP=1 within 1e-09 (losses and final weights): True" in table
    broken = {**results, "llama3": {**results["llama3"], "loss_diff": 1e-3}}
    assert not train_tiny_cp.report(broken, cfg, 4)[1]
