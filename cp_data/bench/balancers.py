"""Balancer benchmark: planned gather vs the upstream per-document loop vs the copy limit.

A batch of ~64k tokens in ~1000 long-tailed documents, three int64 inputs, all W ranks. Every
figure is a ratio of timings taken in the same run, so a noisy machine changes little.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cp_data.balancers import RingAttentionLoadBalancerType, llama3_cu_seqlens


def long_tailed_doc_lens(num_tokens: int, num_docs: int, seed: int = 0) -> np.ndarray:
    """``num_docs`` positive lengths summing to ``num_tokens``, lognormal (a few long, many short)."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=1.2, size=num_docs)
    lengths = np.maximum(1, np.floor(weights / weights.sum() * num_tokens)).astype(np.int64)
    lengths[np.argmax(lengths)] += num_tokens - lengths.sum()
    return lengths


def seconds_per_call(fn: Callable[[], object], calls: int = 1, rounds: int = 3) -> float:
    """Seconds per call of ``fn``: the best over ``rounds`` of the mean of ``calls`` calls in a row.

    One warm-up call comes first; the best round is the one least disturbed by other processes.
    """
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def upstream_zig_zag(inputs, cu, W, r, pad_values):
    """The upstream algorithm: slice, pad and chunk every document of every input in Python."""
    out = []
    for x, pad in zip(inputs, pad_values):
        local = []
        for i in range(len(cu) - 1):
            doc = x[:, int(cu[i]) : int(cu[i + 1])]
            doc = F.pad(doc, (0, (-doc.shape[1]) % (2 * W)), value=pad)
            chunks = doc.chunk(2 * W, dim=1)
            local.extend([chunks[r], chunks[2 * W - 1 - r]])
        out.append(torch.cat(local, dim=1).contiguous())
    return out


def upstream_contiguous(inputs, cu, W, r, pad_values, llama3: bool):
    """The upstream llama3/ulysses path: pad the whole row, slice, (llama3) prepare cu_seqlens."""
    n = int(cu[-1])
    padding = (-n) % W
    out = []
    for x, pad in zip(inputs, pad_values):
        x = F.pad(x, (0, padding), value=pad)
        size = x.shape[1] // W
        out.append(x[:, r * size : (r + 1) * size].contiguous())
    if llama3:
        padded_cu = torch.cat([cu, cu.new_tensor([n + padding])]) if padding else cu
        llama3_cu_seqlens(padded_cu, r, W)
    return out


def run(num_tokens: int = 65_536, num_docs: int = 1000, world_size: int = 8, repeats: int = 20) -> dict:
    """Time every balancer for all ranks; return speed-ups and copy-limit ratios."""
    lengths = long_tailed_doc_lens(num_tokens - 3, num_docs)  # not a multiple: padding is exercised
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(torch.int32)
    n = int(cu[-1])
    inputs = [torch.randint(0, 50_000, (1, n)) for _ in range(3)]
    pads = [0, -100, 0]
    results = {"num_tokens": n, "num_docs": num_docs, "world_size": world_size}
    for kind in RingAttentionLoadBalancerType:
        balancers = [kind.create(cp_rank=r, cp_world_size=world_size) for r in range(world_size)]
        # The copy limit: the same gathers with each rank's index ready, on the inputs as given
        # ([1, N], dim 1) and on flat 1-D views (the fastest gather torch has).
        ready = [b.plan(n, cu).gather_index for b in balancers]
        flat = [x.view(-1) for x in inputs]
        copy_limit = seconds_per_call(lambda: [x.index_select(1, i) for i in ready for x in inputs], rounds=repeats)
        flat_copy = seconds_per_call(lambda: [x.index_select(0, i) for i in ready for x in flat], rounds=repeats)
        ours = seconds_per_call(
            lambda: [
                b.batch_shard_by_document(inputs=inputs, seq_dims=[1, 1, 1], cu_doc_lens=cu, pad_values=pads)
                for b in balancers
            ],
            rounds=repeats,
        )
        if kind is RingAttentionLoadBalancerType.zig_zag:
            baseline_fn = lambda r: upstream_zig_zag(inputs, cu, world_size, r, pads)
        else:
            llama3 = kind is RingAttentionLoadBalancerType.llama3
            baseline_fn = lambda r: upstream_contiguous(inputs, cu, world_size, r, pads, llama3)
        # The upstream zig_zag loop is slow: fewer repeats keep the benchmark short.
        baseline_repeats = max(2, repeats // 5) if kind is RingAttentionLoadBalancerType.zig_zag else repeats
        baseline = seconds_per_call(lambda: [baseline_fn(r) for r in range(world_size)], rounds=baseline_repeats)
        results[kind.value] = {
            "seconds": ours,
            "copy_limit_seconds": copy_limit,
            "flat_copy_seconds": flat_copy,
            "baseline_seconds": baseline,
            "speedup_vs_upstream_loop": baseline / ours,
            "ratio_to_copy_limit": ours / copy_limit,
            "ratio_to_flat_copy": ours / flat_copy,
        }
    return results


def main(**kwargs) -> dict:
    """Run the benchmark and print one line per balancer."""
    results = run(**kwargs)
    print(
        f"balancers: {results['num_tokens']} tokens, {results['num_docs']} docs, "
        f"W={results['world_size']}, 3 int64 [1, N] inputs, all ranks; copy limit = 3 index_selects per "
        "rank with the index ready (flat: on 1-D views)"
    )
    for kind in RingAttentionLoadBalancerType:
        r = results[kind.value]
        print(
            f"  {kind.value:8s} {r['seconds'] * 1e6:6.0f} us  speed-up vs upstream loop "
            f"{r['speedup_vs_upstream_loop']:6.1f}x  ratio to copy limit {r['ratio_to_copy_limit']:4.2f}x "
            f"(flat {r['ratio_to_flat_copy']:4.2f}x)"
        )
    return results


if __name__ == "__main__":
    main()
