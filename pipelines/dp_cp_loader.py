"""Local text files -> tokens -> packed rows -> CP-ready batches on every rank of a DP x CP job.

Copy this script and point ``--data-dir`` at your own ``.txt`` files (``--sample-by`` says what
one document is: a paragraph, a line or a whole file).
Without it, a few documents of Python's own stdlib sources and pydoc topics are written into a
temporary directory (nothing is downloaded). Run on CPU with gloo, DP=2 x CP=2:

    torchrun --standalone --nproc-per-node 4 pipelines/dp_cp_loader.py

Each step prints every rank's shard summary, then checks with collectives that the CP ranks of
each DP group hold the shards of one identical global batch and that the DP groups got different
data (see ``cp_data.loader.verify_dp_cp_batch``). Exits non-zero when a check fails.

Checkpoint and resume on another topology: ``--save-state s.json`` checks that every rank holds
the same loader state and rank 0 writes it; ``--resume s.json`` loads it on every rank. The data
must stay the same, so keep the packing (``--cp-multiple``) when the CP size changes:

    torchrun --standalone --nproc-per-node 4 pipelines/dp_cp_loader.py --cp-multiple 8 --save-state s.json
    torchrun --standalone --nproc-per-node 4 pipelines/dp_cp_loader.py --cp-multiple 8 --cp 4 --resume s.json
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import heapq
import inspect
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import datasets
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from cp_data.datasets import packed_dataset_from_files
from cp_data.loader import ContextParallelLoaderConfig, IndexedDataset, verify_dp_cp_batch, verify_loader_state
from cp_data.packing import PackingConfig


def write_sample_corpus(directory: Path, num_files: int = 24) -> list[Path]:
    """Write ``num_files`` text documents from stdlib sources and pydoc topics into ``directory``."""
    from pydoc_data.topics import topics

    texts = [inspect.getsource(m) for m in (argparse, json, textwrap, heapq, dataclasses, fractions)]
    texts += [topics[k] for k in sorted(topics)[: num_files - len(texts)]]
    paths = []
    for i, text in enumerate(texts):
        path = directory / f"doc_{i:03d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, help="directory of .txt files (default: a sample corpus)")
    p.add_argument("--sample-by", default="paragraph", choices=["paragraph", "line", "document"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per global batch")
    p.add_argument("--load-balancer", default="zig_zag", choices=["zig_zag", "llama3", "ulysses"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--cp", type=int, default=2, help="context-parallel degree (the rest is dp)")
    p.add_argument("--cp-multiple", type=int, help="pad documents to a multiple of this (default 2 x --cp)")
    p.add_argument("--dp-balance", action="store_true", help="balance the modelled work across DP ranks")
    p.add_argument("--save-state", type=Path, help="write the loader state (JSON) after the last step")
    p.add_argument("--resume", type=Path, help="load a loader state written by --save-state")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run a few loader steps on this rank and check them; returns the exit status."""
    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank:
        datasets.disable_progress_bars()
    if world % args.cp:
        raise SystemExit(f"world size {world} is not divisible by --cp {args.cp}")
    mesh = init_device_mesh("cpu", (world // args.cp, args.cp), mesh_dim_names=("dp", "cp"))
    with tempfile.TemporaryDirectory() as tmp:
        # Rank 0 picks the files; every rank packs them into its own HF cache.
        shared = [str(args.data_dir) if args.data_dir else None]
        if rank == 0 and args.data_dir is None:
            write_sample_corpus(Path(tmp))
            shared = [tmp]
        dist.broadcast_object_list(shared, src=0)
        files = sorted(str(p) for p in Path(shared[0]).glob("*.txt"))
        packing = PackingConfig(seq_len=args.seq_len, cp_multiple=args.cp_multiple or 2 * args.cp)
        if rank:  # rank 0 goes first, so shared HF caches (builder modules) are not set up concurrently
            dist.barrier()
        dataset = IndexedDataset(
            packed_dataset_from_files(
                files, packing, tokenizer="bytes", sample_by=args.sample_by, cache_dir=Path(tmp) / f"rank{rank}"
            )
        )
        if not rank:
            dist.barrier()
        config = ContextParallelLoaderConfig(
            batch_size=args.batch_size,
            load_balancer=args.load_balancer,
            num_workers=args.num_workers,
            dp_balance=args.dp_balance,
        )
        loader = config.build(dataset, mesh=mesh)
        if args.resume:  # every rank loads the same file, whatever topology saved it
            loader.load_state_dict(json.loads(args.resume.read_text()))
        collator = loader.collate_fn
        status = 0
        for step, batch in zip(range(args.steps), loader):
            try:
                summary = verify_dp_cp_batch(batch, dataset=dataset, collator=collator, mesh=mesh)
                print(f"step {step} rank {rank} dp {summary['dp_rank']} cp {summary['cp_rank']} "
                      f"samples {summary['indices']} {summary['shard']}", flush=True)
            except RuntimeError as err:
                print(f"step {step} rank {rank}: CHECK FAILED: {err}", file=sys.stderr, flush=True)
                status = 1
                break
        dist.barrier()
        if args.save_state and not status:
            state = verify_loader_state(loader)  # the same on every rank, or a RuntimeError
            if rank == 0:
                args.save_state.write_text(json.dumps(state))
        if rank == 0 and not status:
            print(f"OK: {args.steps} steps, {len(dataset)} packed rows, mesh {tuple(mesh.shape)} (dp, cp)")
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
