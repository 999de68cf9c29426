"""Collate throughput: B x S packed rows with ~D documents each, one CP rank, every balancer.

Prints global tokens collated per second (B·S per call) and the ratio of the collator's time to a
plain ``torch.cat`` of the same rows, both measured in the same run.
Run: ``python -m cp_data.bench.collate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..balancers import RingAttentionLoadBalancerType
from ..collate import ContextParallelCollator
from .balancers import seconds_per_call


def make_instances(batch_size: int, seq_len: int, docs_per_row: int, seed: int = 0) -> list[dict[str, Any]]:
    """Random packed instances: ``docs_per_row`` random-length documents and a label mask per row."""
    rng = np.random.default_rng(seed)
    instances = []
    for _ in range(batch_size):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=docs_per_row - 1, replace=False))
        doc_lens = np.diff(np.concatenate([[0], cuts, [seq_len]]))
        instances.append(
            dict(
                input_ids=torch.from_numpy(rng.integers(0, 50_000, seq_len)),
                doc_lens=torch.from_numpy(doc_lens.astype(np.int64)),
                label_mask=torch.from_numpy(rng.random(seq_len) < 0.95),
            )
        )
    return instances


def run(
    batch_size: int = 8,
    seq_len: int = 8192,
    docs_per_row: int = 100,
    cp_world_size: int = 8,
    cp_rank: int = 3,
    repeats: int = 50,
    reorder: bool = True,
) -> dict[str, dict[str, float]]:
    """Time the collator for every balancer; return tokens/s and the ratio to ``torch.cat`` each.

    With ``reorder`` also llama3 with ``reorder_documents=True`` ("llama3+reorder"), timed over a
    single call because the document search dominates it.
    """
    torch.set_num_threads(1)
    instances = make_instances(batch_size, seq_len, docs_per_row)
    rows = [inst["input_ids"] for inst in instances]
    tokens = batch_size * seq_len
    cases = [(kind.value, dict(load_balancer=kind)) for kind in RingAttentionLoadBalancerType]
    if reorder:
        cases.append(("llama3+reorder", dict(load_balancer="llama3", reorder_documents=True)))
    results = {}
    for name, options in tqdm(cases, desc="collate bench"):
        collator = ContextParallelCollator(cp_rank=cp_rank, cp_world_size=cp_world_size, **options)
        cat = seconds_per_call(lambda: torch.cat(rows), repeats)
        slow = options.get("reorder_documents", False)
        seconds = seconds_per_call(lambda: collator(instances), 1 if slow else repeats, 1 if slow else 3)
        results[name] = dict(
            tokens_per_s=tokens / seconds, ms_per_call=seconds * 1e3, ratio_to_cat=seconds / cat
        )
    return results


def main() -> None:
    """Print the figures of :func:`run`."""
    for name, r in run().items():
        print(
            f"{name:14s} {r['tokens_per_s']:.3g} tokens/s  {r['ms_per_call']:.2f} ms/call  "
            f"{r['ratio_to_cat']:.1f}x torch.cat"
        )


if __name__ == "__main__":
    main()
