"""DP=2 x CP=2 on 4 gloo processes: CP ranks share one global batch, DP groups differ."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from cp_data import RingAttentionLoadBalancerType, RingContextParallelStyle, UlyssesContextParallelStyle
from cp_data.attention.launch import free_port
from cp_data.collate import ContextParallelCollator
from cp_data.loader import ContextParallelLoaderConfig, IndexedDataset, dp_cp_coordinates, verify_dp_cp_batch

WORLD = 4
TIMEOUT_S = 120

# No DataLoader workers here: which samples a rank draws is decided in its main process (the
# sampler), and 2 workers on each of the 4 ranks cost ~25 s of process start-up; test_loader.py
# checks workers.
CONFIGS = [
    dict(load_balancer="zig_zag"),
    dict(load_balancer="llama3", length_multiple=4),
    dict(load_balancer="ulysses"),
    dict(load_balancer="zig_zag", document_masking=False),
]


def _expect_failure(fn, match: str, error: type[Exception] = RuntimeError) -> str:
    try:
        fn()
    except error as err:
        if match not in str(err):
            raise
        return "raised"
    raise AssertionError(f"expected a {error.__name__} containing {match!r}")


def _worker(rank: int, port: int, out_dir: str) -> None:
    from test_loader import Synthetic  # the synthetic packed dataset of the loader tests

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        coords = dp_cp_coordinates(mesh)
        assert coords == (rank // 2, 2, rank % 2, 2), coords
        from_mesh = ContextParallelCollator.from_mesh(mesh["cp"], load_balancer="llama3", length_multiple=2)
        assert from_mesh == ContextParallelCollator(
            load_balancer="llama3", cp_rank=rank % 2, cp_world_size=2, length_multiple=2
        )
        _expect_failure(lambda: ContextParallelCollator.from_mesh(mesh, load_balancer="llama3"), "must be 1-D", ValueError)
        data = IndexedDataset([{k: v for k, v in item.items() if k != "index"} for item in Synthetic(n=30).items])
        lines = []
        for options in CONFIGS:
            cfg = ContextParallelLoaderConfig(batch_size=3, seed=7, **options)
            loader = cfg.build(data, mesh=mesh)
            for step, batch in zip(range(3), loader):
                summary = verify_dp_cp_batch(batch, dataset=data, collator=loader.collate_fn, mesh=mesh)
                lines.append(f"{options['load_balancer']} {step} {summary['dp_rank']} {summary['cp_rank']} "
                             f"{summary['indices']}")
        # The checks catch CP ranks that drew different batches, and DP groups that drew the same.
        cfg = ContextParallelLoaderConfig(batch_size=3, seed=rank % 2)
        batch = next(iter(cfg.build(data, mesh=mesh)))
        lines.append(_expect_failure(
            lambda: verify_dp_cp_batch(batch, dataset=data, collator=cfg.collator(rank % 2, 2), mesh=mesh),
            "drew samples",
        ))
        cfg = ContextParallelLoaderConfig(batch_size=3)
        batch = next(iter(cfg.build(data, dp_rank=0, dp_world_size=2, cp_rank=rank % 2, cp_world_size=2)))
        lines.append(_expect_failure(
            lambda: verify_dp_cp_batch(batch, dataset=data, collator=cfg.collator(rank % 2, 2), mesh=mesh),
            "got the same data",
        ))
        lines += _same_data_controls(rank, data, cfg.collator(rank % 2, 2), mesh)
        lines.append(_cp_rank_from_meshes())
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(lines))
    finally:
        dist.destroy_process_group()


def _same_data_controls(rank: int, data, collator, mesh) -> list[str]:
    """verify_dp_cp_batch flags DP groups that share a sample, and groups that share only content."""
    dp = rank // 2
    # Overlap only: samples {0, 1, 2} and {2, 3, 4} share one index, and their tokens differ.
    indices = [[0, 1, 2], [2, 3, 4]][dp]
    overlap = _expect_failure(
        lambda: verify_dp_cp_batch(collator([data[i] for i in indices]), dataset=data, collator=collator, mesh=mesh),
        "got the same data",
    )
    # Content only: disjoint indices of a dataset whose samples are all one instance.
    copies = IndexedDataset([{k: v for k, v in data[0].items() if k != "index"}] * 4)
    indices = [[0, 1], [2, 3]][dp]
    content = _expect_failure(
        lambda: verify_dp_cp_batch(
            collator([copies[i] for i in indices]), dataset=copies, collator=collator, mesh=mesh
        ),
        "got the same data",
    )
    return [overlap, content]


def _cp_rank_from_meshes() -> str:
    """What balancers and collators built from the "cp" dim of ("dp", "cp") and ("cp", "dp") meshes hold.

    One line: per mesh, the (cp_rank, cp_world_size) of the three ``build`` paths and ``from_mesh``.
    """
    meshes = [init_device_mesh("cpu", (2, 2), mesh_dim_names=names) for names in (("dp", "cp"), ("cp", "dp"))]
    seen = []
    for mesh in meshes:
        makers = [
            RingAttentionLoadBalancerType.zig_zag.build,
            RingContextParallelStyle(load_balancer="llama3").build,
            UlyssesContextParallelStyle().build,
            lambda cp_mesh: ContextParallelCollator.from_mesh(cp_mesh, load_balancer="zig_zag"),
        ]
        for make in makers:
            try:
                made = make(mesh["cp"])
                seen.append(f"{type(made).__name__}:{made.cp_rank}/{made.cp_world_size}")
            except ValueError as err:  # e.g. a global rank out of range for the cp group
                seen.append(f"ValueError:{err}")
        seen.append("coords:" + ",".join(map(str, dp_cp_coordinates(mesh))))
    return " ".join(seen)


def test_dp_cp_groups_with_four_gloo_processes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned workers import test_loader
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    ctx = mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 4 gloo processes did not finish within {TIMEOUT_S} s")
    results = [Path(tmp_path, f"rank{r}.txt").read_text().splitlines() for r in range(WORLD)]
    for r, lines in enumerate(results):
        assert lines[-5:-1] == ["raised"] * 4
        # The CP rank is the coordinate in the "cp" dim, wherever that dim lies; never the global rank.
        dp, cp = r // 2, r % 2
        built = ["RingAttentionZigZagLoadBalancer", "RingAttentionLlama3LoadBalancer", "UlyssesLoadBalancer"]
        expected = [f"{name}:{cp}/2" for name in built] + [f"ContextParallelCollator:{cp}/2", f"coords:{dp},2,{cp},2"]
        expected += [f"{name}:{dp}/2" for name in built] + [f"ContextParallelCollator:{dp}/2", f"coords:{cp},2,{dp},2"]
        assert lines[-1].split() == expected, (r, lines[-1])
        assert len(lines) == 5 + 3 * len(CONFIGS)
        assert all(line.split()[2:4] == [str(r // 2), str(r % 2)] for line in lines[:-5])
    # cp ranks of a dp group print the same samples; the two dp groups print different ones
    same_group = [[line.split(maxsplit=4)[4] for line in lines[:-5]] for lines in results]
    assert same_group[0] == same_group[1] and same_group[2] == same_group[3]
    assert all(a != b for a, b in zip(same_group[0], same_group[2]))

