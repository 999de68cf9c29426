"""Train a Hugging Face ``LlamaForCausalLM`` with context parallelism on CPU; compare with CP=1.

A tiny Llama (2 layers, 4 query / 2 key-value heads, RoPE), built from a config (no download)
and run in float64, trains a few steps on packed batches from the cp-data loader:

- CP=1 (on rank 0): the unmodified model with its default attention, every document of the
  loader's rows run alone; the loss is the mean over all labelled tokens;
- CP=W for zig_zag, llama3 and ulysses: every rank gets its shard from the loader, the model runs
  with cp-data's attention registered in transformers' ``AttentionInterface``
  (:func:`cp_data.integrations.hf.register_cp_attention`), the loss is
  :func:`cp_data.integrations.training.cp_loss` and the gradients are summed over the group.

The script prints per-step losses and the largest weight difference to CP=1, and exits non-zero
if any differs by more than the tolerance.

    torchrun --standalone --nproc-per-node 4 pipelines/train_hf_cp.py
    python pipelines/train_hf_cp.py                  # the same without torchrun (spawns 4)
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cp_data.attention.launch import run_gloo
from cp_data.collate import IGNORE_INDEX
from cp_data.integrations.hf import model_inputs, register_cp_attention
from cp_data.integrations.training import cp_loss, sum_gradients
from train_tiny_cp import batches, launch, synthetic_dataset

KINDS = ("zig_zag", "llama3", "ulysses")


@dataclass
class HFConfig:
    """Model, data and optimiser sizes; :meth:`build` makes the seeded tiny Llama."""

    vocab: int = 48
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    seq_len: int = 96
    batch_size: int = 2
    steps: int = 3
    lr: float = 1e-2
    seed: int = 0
    dtype: str = "float64"
    tolerance: float = 1e-9

    def build(self, attn_implementation: str | None = None) -> torch.nn.Module:
        """A fresh model with the seeded initial weights (the same on every rank)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=2 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.seq_len,
        )
        torch.manual_seed(self.seed)
        model = LlamaForCausalLM(config).to(getattr(torch, self.dtype))
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model


def document_logits(model, input_ids: torch.Tensor, cu_doc_lens: torch.Tensor) -> list[torch.Tensor]:
    """Each document of the row ``input_ids [N]`` run alone through ``model``: logits ``[len, V]``."""
    bounds = cu_doc_lens.tolist()
    return [
        model(input_ids=input_ids[None, start:end]).logits[0]
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]


def document_loss(model, input_ids, labels, cu_doc_lens) -> tuple[torch.Tensor, int]:
    """CP=1: the summed token loss of all documents run alone, and the labelled token count."""
    logits = torch.cat(document_logits(model, input_ids, cu_doc_lens))
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_sum = F.cross_entropy(
        logits.to(compute), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((labels != IGNORE_INDEX).sum())


def train(cfg: HFConfig, steps: list[dict[str, Any]], kind: str | None) -> dict:
    """Train from the seeded weights; per-step global losses and the final weights.

    ``kind=None``: CP=1 on the loader's whole rows; else CP over the world with that balancer.
    """
    if kind is None:
        model = cfg.build()
    else:
        model = cfg.build(register_cp_attention(dist.group.WORLD, kind, name=f"cp_data_{kind}"))
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for batch in steps:
        if kind is None:
            loss_sum, count = document_loss(
                model, batch["input_ids"][0], batch["labels"][0], batch["cu_doc_lens_q"]
            )
            loss = loss_sum / max(count, 1)
            loss.backward()
        else:
            logits = model(**model_inputs(batch)).logits
            loss = cp_loss(logits, batch["labels"], dist.group.WORLD)
            loss.backward()
            sum_gradients(model.parameters(), dist.group.WORLD)
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return dict(losses=losses, weights=weights)


def run_rank(rank: int, world: int, cfg: HFConfig) -> dict | None:
    """Everything one rank does; rank 0 returns every run's losses and differences to CP=1."""
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata noise
    dataset = synthetic_dataset(cfg)
    runs = {}
    if rank == 0:  # CP=1: a llama3 loader with one rank yields the whole rows, unpadded
        runs["CP=1"] = train(cfg, batches(cfg, dataset, "llama3", 0, 1), None)
    for kind in KINDS:
        runs[kind] = train(cfg, batches(cfg, dataset, kind, rank, world), kind)
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


def report(results: dict, cfg: HFConfig, world: int) -> tuple[str, bool]:
    """The table, and whether every CP run matched CP=1 within the tolerance."""
    names = list(results)

    def row(label: str, cells) -> str:
        return f"{label:<11}" + "".join(f"{c:>18}" for c in cells)

    lines = [
        f"LlamaForCausalLM ({cfg.layers} layers, {cfg.heads} q / {cfg.kv_heads} kv heads), "
        f"{cfg.dtype}, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"CP=1 vs CP={world}; loss per step",
        row("step", names),
    ]
    for step in range(cfg.steps):
        lines.append(row(str(step), [f"{results[n]['losses'][step]:.14f}" for n in names]))
    for key, label in (("loss_diff", "max|dloss|"), ("weight_diff", "max|dw|")):
        lines.append(row(label, ["-"] + [f"{results[n][key]:.2e}" for n in names[1:]]))
    worst = max(max(results[k]["loss_diff"], results[k]["weight_diff"]) for k in KINDS)
    exact = worst <= cfg.tolerance
    lines.append(f"CP={world} equals CP=1 within {cfg.tolerance:g} (losses and final weights): {exact}")
    return "\n".join(lines), exact


def run(world_size: int = 4, **overrides: Any) -> dict:
    """Spawn ``world_size`` gloo processes and return rank 0's results."""
    return run_gloo(run_rank, world_size, HFConfig(**overrides), timeout=600)[0]


def main(argv: list[str] | None = None) -> int:
    """Run under torchrun, or spawn gloo processes; print the table; 0 when CP matched CP=1."""
    return launch(argv, __doc__.splitlines()[0], HFConfig, run_rank, run, report)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
