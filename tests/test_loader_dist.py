"""Save the loader state at DP=2 x CP=2, resume at DP=4 x CP=1 and DP=1 x CP=4 on gloo: every sample once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torchdata")  # the optional hf extra
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from cp_data.attention.launch import run_gloo
from cp_data.loader import ContextParallelLoaderConfig, IndexedDataset, verify_dp_cp_batch, verify_loader_state

WORLD = 4
NUM_SAMPLES = 44  # 3 steps of 2 x 2 leave 32: whole steps at DP=4 and DP=1 (batch_size 2), nothing dropped
SAVE_AFTER = 3
CONFIG = dict(batch_size=2, load_balancer="zig_zag", seed=7, dp_balance=True, lookahead=2)


def _dataset():
    from test_loader import Synthetic  # the synthetic packed dataset of the loader tests

    items = Synthetic(n=NUM_SAMPLES, seq_len=16).items
    # weigh each sample by its documents' squared lengths (attention-like work)
    work = [float((item["doc_lens"] ** 2).sum()) for item in items]
    return IndexedDataset([{k: v for k, v in item.items() if k != "index"} for item in items]), work


def _run(rank: int, world: int, dp: int, state: dict | None) -> dict:
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "cp"))
    data, work = _dataset()
    loader = ContextParallelLoaderConfig(**CONFIG).build(data, mesh=mesh, sample_work=work)
    if state is not None:
        loader.load_state_dict(state)
    steps = []
    for batch in loader:
        verify_dp_cp_batch(batch, dataset=data, collator=loader.collate_fn, mesh=mesh)
        steps.append(batch["index"].tolist())
        if state is None and len(steps) == SAVE_AFTER:
            break
    saved = verify_loader_state(loader)  # all ranks hold the same state before it is written
    tampered = dict(saved, epoch=saved["epoch"] + 1) if rank == world - 1 else saved
    try:
        verify_loader_state(tampered)
        caught = ""
    except RuntimeError as err:
        caught = str(err)
    # What every rank saw, gathered on every rank (the all-gather the check runs on).
    seen: list = [None] * world
    dist.all_gather_object(seen, steps)
    return dict(state=json.loads(json.dumps(saved)), seen=seen, caught=caught)


def _consumed(result: dict, dp: int) -> list[int]:
    """Samples of all dp groups (the cp ranks of a group must have seen the same ones)."""
    cp = WORLD // dp
    groups = [result["seen"][g * cp : (g + 1) * cp] for g in range(dp)]
    assert all(all(rank == group[0] for rank in group) for group in groups)
    return [i for group in groups for step in group[0] for i in step]


def test_resume_at_other_dp_and_cp_sizes_consumes_every_sample_once(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    first = run_gloo(_run, WORLD, 2, None)
    state = first[0]["state"]
    assert all(r["state"] == state for r in first) and state["samples_consumed"] == SAVE_AFTER * 2 * 2
    assert state["window"] is not None  # saved part-way through a lookahead window
    assert all("loader states differ between ranks 0 and 3 (epoch: 0 vs 1)" in r["caught"] for r in first)
    head = _consumed(first[0], 2)
    assert len(head) == len(set(head)) == SAVE_AFTER * 4
    for dp in (4, 1):
        rest = run_gloo(_run, WORLD, dp, state)
        tail = _consumed(rest[0], dp)
        assert sorted(head + tail) == list(range(NUM_SAMPLES)), f"DP={dp}"
        assert all(r["state"]["epoch"] == 1 and r["state"]["samples_consumed"] == 0 for r in rest)
