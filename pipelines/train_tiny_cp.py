"""Train a tiny transformer with context parallelism on CPU and show it matches training without.

A 2-layer decoder-only transformer (RoPE driven by ``position_ids``, causal document-masked
attention) is trained a few steps in float64 on packed batches from the cp-data loader:

- CP=1 (on rank 0): the loader's whole rows, single-process :func:`cp_data.attention.varlen_attention`;
- CP=W for zig_zag, llama3 and ulysses: every rank gets its shard from the loader and attends
  through :func:`cp_data.attention.cp_attention` (ring, all-gather, all-to-all over gloo);
- the same CP runs with ``position_ids`` replaced by ``arange`` of each rank's local shard, what
  naive CP code does: RoPE sees wrong positions and the loss changes.

The loss is the global mean over all non-ignored labels (loss sum and token count all-reduced
over the CP group) and the gradients of the replicated weights are summed over the group, so CP
training must equal CP=1 training: the script prints per-step losses and the largest weight
difference, and exits non-zero if CP differs from CP=1 or the naive positions do not.

    torchrun --standalone --nproc-per-node 4 pipelines/train_tiny_cp.py
    python pipelines/train_tiny_cp.py                  # the same without torchrun (spawns 4)
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cp_data.attention import cp_attention, varlen_attention
from cp_data.attention.launch import run_gloo
from cp_data.collate import IGNORE_INDEX
from cp_data.loader import ContextParallelLoaderConfig
from cp_data.packing import PackingConfig, assemble_row, plan_packing

KINDS = ("zig_zag", "llama3", "ulysses")


@dataclass
class TinyConfig:
    """Model, data and optimiser sizes; :meth:`build` makes the (float64) model."""

    vocab: int = 48
    dim: int = 32
    heads: int = 4
    layers: int = 2
    seq_len: int = 96
    batch_size: int = 2
    steps: int = 4
    lr: float = 1e-2
    seed: int = 0
    loss_tolerance: float = 1e-9
    naive_min_change: float = 1e-4

    def build(self) -> "TinyTransformer":
        torch.manual_seed(self.seed)  # same initial weights on every rank
        return TinyTransformer(self).to(torch.float64)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[L, H, D]`` with per-token angles ``[L, 1, D/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: RoPE attention through ``attend``, then an MLP."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim)
        )

    def forward(self, x, cos, sin, attend):
        length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(length, 3, self.heads, dim // self.heads).unbind(1)
        x = x + self.proj(attend(rotate(q, cos, sin), rotate(k, cos, sin), v).reshape(length, dim))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Decoder-only transformer over one packed row ``[L]``; ``attend(q, k, v)`` does the mixing."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        head_dim = cfg.dim // cfg.heads
        self.register_buffer(
            "inv_freq", 10_000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: Callable
    ) -> torch.Tensor:
        angles = (position_ids.to(self.inv_freq.dtype)[:, None] * self.inv_freq)[:, None, :]
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, attend)
        return self.head(self.norm(x))


def synthetic_dataset(cfg: TinyConfig) -> list[dict[str, torch.Tensor]]:
    """Packed instances of documents that count upward in random strides (learnable, seeded)."""
    rng = np.random.default_rng(cfg.seed)
    num_docs = 6 * cfg.steps * cfg.batch_size
    lengths = rng.integers(2, cfg.seq_len // 2, size=num_docs)
    starts, strides = rng.integers(1, cfg.vocab, size=(2, num_docs))

    def tokens_of(doc: int, start: int, length: int) -> np.ndarray:
        return 1 + (starts[doc] + strides[doc] * np.arange(start, start + length)) % (cfg.vocab - 1)

    plan = plan_packing(lengths, PackingConfig(seq_len=cfg.seq_len))
    needed = cfg.steps * cfg.batch_size
    if plan.num_rows < needed:
        raise ValueError(
            f"{plan.num_rows} packed rows are too few for {cfg.steps} steps of {cfg.batch_size}"
        )
    rows = [assemble_row(plan, r, tokens_of) for r in range(needed)]
    return [{key: torch.from_numpy(value) for key, value in row.items()} for row in rows]


def batches(cfg: TinyConfig, dataset, kind: str, rank: int, world: int) -> list[dict[str, Any]]:
    """The first ``cfg.steps`` batches of CP rank ``rank`` from the cp-data loader (one DP group)."""
    loader = ContextParallelLoaderConfig(
        batch_size=cfg.batch_size, load_balancer=kind, shuffle=False
    ).build(dataset, dp_rank=0, dp_world_size=1, cp_rank=rank, cp_world_size=world)
    return list(islice(loader, cfg.steps))


def train(
    cfg: TinyConfig, steps: list[dict[str, Any]], attend: Callable, *, cp: bool, naive: bool = False
) -> dict:
    """Train from the seeded initial weights; per-step global losses and the final weights."""
    model = cfg.build()
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for batch in steps:
        input_ids, labels = batch["input_ids"][0], batch["labels"][0]
        positions = torch.arange(len(input_ids)) if naive else batch["position_ids"][0]
        logits = model(input_ids, positions, lambda q, k, v: attend(q, k, v, batch))
        loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        stats = torch.stack([loss_sum.detach(), (labels != IGNORE_INDEX).sum().to(loss_sum.dtype)])
        if cp:
            dist.all_reduce(stats)  # global loss sum and label count over the CP group
        (loss_sum / stats[1]).backward()
        if cp:
            for p in model.parameters():  # replicated weights: sum the ranks' gradient shares
                dist.all_reduce(p.grad)
        optim.step()
        optim.zero_grad()
        losses.append(float(stats[0] / stats[1]))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return dict(losses=losses, weights=weights)


def full_attention(q, k, v, batch):
    """CP=1 attention: the single-process reference over the whole row (llama3 metadata of W=1)."""
    return varlen_attention(q, k, v, batch["cu_doc_lens_q"])[0]


def run_rank(rank: int, world: int, cfg: TinyConfig, dataset=None) -> dict | None:
    """Everything one rank does; rank 0 returns the results of all runs.

    ``dataset``: packed instances to train on (default: :func:`synthetic_dataset`).
    """
    dataset = synthetic_dataset(cfg) if dataset is None else dataset
    runs = {}
    if rank == 0:  # CP=1: a llama3 collator with one rank yields the whole row, unpadded
        runs["CP=1"] = train(cfg, batches(cfg, dataset, "llama3", 0, 1), full_attention, cp=False)
    for kind in KINDS:
        steps = batches(cfg, dataset, kind, rank, world)

        def attend(q, k, v, batch, kind=kind):
            return cp_attention(q, k, v, batch, load_balancer=kind, group=dist.group.WORLD)

        runs[kind] = train(cfg, steps, attend, cp=True)
        runs[f"{kind} naive"] = train(cfg, steps, attend, cp=True, naive=True)
    if rank:
        return None
    base = runs["CP=1"]
    return {
        name: dict(
            losses=run["losses"],
            loss_diff=max(abs(a - b) for a, b in zip(run["losses"], base["losses"])),
            weight_diff=float((run["weights"] - base["weights"]).abs().max()),
        )
        for name, run in runs.items()
    }


def report(results: dict, cfg: TinyConfig, world: int) -> tuple[str, bool]:
    """The table, and whether CP matched CP=1 while naive positions did not."""
    names = list(results)

    def row(label: str, cells) -> str:
        return f"{label:<11}" + "".join(f"{c:>16}" for c in cells)

    lines = [
        f"tiny transformer, float64, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"CP=1 vs CP={world}; loss per step",
        row("step", names),
    ]
    for step in range(cfg.steps):
        lines.append(row(str(step), [f"{results[n]['losses'][step]:.12f}" for n in names]))
    for key, label in (("loss_diff", "max|dloss|"), ("weight_diff", "max|dw|")):
        lines.append(row(label, ["-"] + [f"{results[n][key]:.2e}" for n in names[1:]]))
    tol = cfg.loss_tolerance
    exact = all(max(results[k]["loss_diff"], results[k]["weight_diff"]) <= tol for k in KINDS)
    naive = all(results[f"{k} naive"]["loss_diff"] >= cfg.naive_min_change for k in KINDS)
    lines.append(f"CP={world} equals CP=1 within {tol:g} (losses and final weights): {exact}")
    lines.append(f"naive arange positions change the loss by >= {cfg.naive_min_change:g}: {naive}")
    return "\n".join(lines), exact and naive


def run(world_size: int = 4, dataset=None, **overrides: Any) -> dict:
    """Spawn ``world_size`` gloo processes and return rank 0's results (for tests)."""
    cfg = TinyConfig(**overrides)
    return run_gloo(run_rank, world_size, cfg, dataset, timeout=300)[0]


def launch(argv: list[str] | None, description: str, config_type: type, rank_fn, spawn_fn, report_fn) -> int:
    """The training pipelines' command line: flags from ``config_type``'s fields; run under
    torchrun (``rank_fn`` on this rank) or spawn gloo processes (``spawn_fn``); print
    ``report_fn``'s table; 0 when CP matched CP=1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--spawn", type=int, default=0, help="spawn this many gloo processes instead of torchrun"
    )
    for name, value in asdict(config_type()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    spawn = args.pop("spawn") or (0 if "RANK" in os.environ else 4)  # not under torchrun: spawn 4
    cfg = config_type(**args)
    if spawn:
        world, results = spawn, spawn_fn(spawn, **args)
    else:
        dist.init_process_group("gloo")
        world = dist.get_world_size()
        results = rank_fn(dist.get_rank(), world, cfg)
        dist.destroy_process_group()
        if results is None:
            return 0
    table, ok = report_fn(results, cfg, world)
    print(table, flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run under torchrun, or spawn gloo processes; print the table; 0 when CP matched CP=1."""
    return launch(argv, __doc__.splitlines()[0], TinyConfig, run_rank, run, report)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
