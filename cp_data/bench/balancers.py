"""Balancer benchmark: ours vs upstream's code and vs the copy limit, all W ranks of one row.

A row of ~64k tokens in ~1000 long-tailed documents, three int64 ``[1, N]`` inputs. zig_zag is
compared with the upstream per-document loop and with the copy limit (the same gathers with the
index ready); llama3 and ulysses with upstream's pad-and-slice (plus its metadata: ring-flash-attn's
torch ops for llama3), on a row that needs padding and on one that does not. Every figure is a
ratio of timings taken in the same run, so a noisy machine changes little.
"""

from __future__ import annotations

import functools
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


def interleaved_seconds(
    fns: dict[str, list[Callable[[], object]]], rounds: int = 3
) -> dict[str, float]:
    """For each name, the summed least CPU time of its calls (one per rank), rounds taken in turn.

    CPU time of this thread (``time.thread_time``; run torch on one thread), so time the process
    spends descheduled on a busy machine does not count; each call keeps its own best round, and
    interleaving (in an order that rotates every round, so no function always runs after the same
    one) exposes every function to the same load and cache: the ratios hold on a shared machine.
    """
    best = {name: [float("inf")] * len(calls) for name, calls in fns.items()}
    for calls in fns.values():
        for fn in calls:
            fn()
    names = list(fns)
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            calls = fns[name]
            for i, fn in enumerate(calls):
                start = time.thread_time()
                fn()
                best[name][i] = min(best[name][i], time.thread_time() - start)
    return {name: sum(times) for name, times in best.items()}


def upstream_zig_zag(inputs, cu, W, pad_values, r):
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


def upstream_llama3_prepare(cu_seqlens: torch.Tensor, rank: int, world_size: int) -> tuple:
    """ring-flash-attn's ``llama3_flash_attn_prepare_cu_seqlens(causal=True)``: its torch ops, in order."""
    total = cu_seqlens[-1].item()
    per_rank = total // world_size
    left = torch.searchsorted(cu_seqlens, rank * per_rank)
    right = torch.searchsorted(cu_seqlens, (rank + 1) * per_rank)
    if cu_seqlens[left] != rank * per_rank:
        left -= 1
    left, right = left.item(), right.item()
    cu_q = cu_seqlens[left : right + 1].clone()
    cu_q -= rank * per_rank
    cu_q[0] = 0
    cu_q[-1] = per_rank
    cu_k = cu_seqlens[left : right + 1].clone()
    cu_k[-1] = (rank + 1) * per_rank
    slice_left = cu_seqlens[left].item()
    cu_k -= slice_left
    max_q = (cu_q[1:] - cu_q[:-1]).max().item()
    max_k = (cu_k[1:] - cu_k[:-1]).max().item()
    return cu_q, cu_k, max_q, max_k, slice(slice_left, (rank + 1) * per_rank)


def upstream_contiguous(inputs, cu, W, pad_values, llama3: bool, r: int):
    """The upstream llama3/ulysses ``batch_shard_by_document``: the same checks, tensor ops and copies.

    When the row needs padding every rank pads the whole row (``F.pad``), then slices; the
    metadata is ring-flash-attn's (llama3) or the passed-through boundaries (ulysses).
    """
    if cu.device.type != "cpu" or cu.ndim != 1 or cu[0] != 0:
        raise RuntimeError("bad cu_doc_lens")
    n = int(cu[-1])
    padding = (-n) % W
    out = []
    for x, pad in zip(inputs, pad_values):
        if x.shape[1] != n:
            raise RuntimeError("bad input")
        if padding:
            x = F.pad(x, (0, padding), value=pad)
        size = x.shape[1] // W
        out.append(torch.ops.aten.slice(x, dim=1, start=r * size, end=(r + 1) * size).contiguous())
    if llama3:
        padded_cu = torch.cat([cu, cu.new_tensor([n + padding])]) if padding else cu
        return out, upstream_llama3_prepare(padded_cu, r, W)
    max_doc_len = (cu[1:] - cu[:-1]).max().item()
    if padding:
        cu, max_doc_len = torch.cat([cu, (cu[-1] + padding).unsqueeze(0)]), max(max_doc_len, padding)
    return out, (cu, max_doc_len)


def _gathers(inputs: list[torch.Tensor], dim: int, index: torch.Tensor) -> list[torch.Tensor]:
    return [x.index_select(dim, index) for x in inputs]


def _row(num_tokens: int, num_docs: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three int64 ``[1, num_tokens]`` inputs and int32 boundaries of long-tailed documents."""
    lengths = long_tailed_doc_lens(num_tokens, num_docs)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])).to(torch.int32)
    return [torch.randint(0, 50_000, (1, num_tokens)) for _ in range(3)], cu


def run(num_tokens: int = 65_536, num_docs: int = 1000, world_size: int = 8, repeats: int = 200) -> dict:
    """Time every balancer for all ranks; return speed-ups and copy-limit ratios.

    The row is ``num_tokens - 3`` tokens, so that it needs padding; llama3 and ulysses are also
    timed on a row of ``num_tokens`` (a multiple of W: no padding, every shard a slice of the input).
    Torch runs on one thread, as in a DataLoader worker.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(num_tokens, num_docs, world_size, repeats)
    finally:
        torch.set_num_threads(threads)


def _run(num_tokens: int, num_docs: int, world_size: int, repeats: int) -> dict:
    inputs, cu = _row(num_tokens - 3, num_docs)
    aligned_inputs, aligned_cu = _row(world_size * -(-num_tokens // world_size), num_docs)
    n = int(cu[-1])
    pads = [0, -100, 0]
    results = {"num_tokens": n, "num_docs": num_docs, "world_size": world_size}

    def all_ranks(balancers, inputs, cu):
        return [
            functools.partial(
                b.batch_shard_by_document, inputs=inputs, seq_dims=[1, 1, 1], cu_doc_lens=cu, pad_values=pads
            )
            for b in balancers
        ]

    def each(fn, *args):
        return [functools.partial(fn, *args, r) for r in range(world_size)]

    for kind in RingAttentionLoadBalancerType:
        balancers = [kind.create(cp_rank=r, cp_world_size=world_size) for r in range(world_size)]
        # The copy limit: the same gathers with each rank's index ready, on the inputs as given
        # ([1, N], dim 1) and on flat 1-D views (the fastest gather torch has).
        ready = [b.plan(n, cu).gather_index for b in balancers]
        flat = [x.view(-1) for x in inputs]
        fns = {
            "seconds": all_ranks(balancers, inputs, cu),
            "copy_limit_seconds": [functools.partial(_gathers, inputs, 1, i) for i in ready],
            "flat_copy_seconds": [functools.partial(_gathers, flat, 0, i) for i in ready],
        }
        if kind is not RingAttentionLoadBalancerType.zig_zag:
            llama3 = kind is RingAttentionLoadBalancerType.llama3
            fns.update(
                baseline_seconds=each(upstream_contiguous, inputs, cu, world_size, pads, llama3),
                aligned_seconds=all_ranks(balancers, aligned_inputs, aligned_cu),
                aligned_baseline_seconds=each(upstream_contiguous, aligned_inputs, aligned_cu, world_size, pads, llama3),
            )
        figures = interleaved_seconds(fns, rounds=repeats)
        ours = figures["seconds"]
        figures.update(
            ratio_to_copy_limit=ours / figures["copy_limit_seconds"],
            ratio_to_flat_copy=ours / figures["flat_copy_seconds"],
        )
        if kind is RingAttentionLoadBalancerType.zig_zag:
            # The upstream loop is slow (seconds): a few rounds suffice.
            baseline = interleaved_seconds(
                {"loop": each(upstream_zig_zag, inputs, cu, world_size, pads)}, rounds=min(3, repeats)
            )["loop"]
            figures.update(baseline_seconds=baseline, speedup_vs_upstream_loop=baseline / ours)
        else:
            figures.update(
                speedup_vs_upstream=figures["baseline_seconds"] / ours,
                aligned_speedup_vs_upstream=figures["aligned_baseline_seconds"] / figures["aligned_seconds"],
            )
        results[kind.value] = figures
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
        line = (
            f"  {kind.value:8s} {r['seconds'] * 1e6:6.0f} us  ratio to copy limit {r['ratio_to_copy_limit']:4.2f}x "
            f"(flat {r['ratio_to_flat_copy']:4.2f}x)"
        )
        if "speedup_vs_upstream_loop" in r:
            line += f"  speed-up vs upstream loop {r['speedup_vs_upstream_loop']:6.1f}x"
        else:
            line += (
                f"  vs upstream slice: {r['baseline_seconds'] * 1e6:.0f} us ({r['speedup_vs_upstream']:.1f}x); "
                f"row a multiple of W: {r['aligned_seconds'] * 1e6:.0f} us vs "
                f"{r['aligned_baseline_seconds'] * 1e6:.0f} us ({r['aligned_speedup_vs_upstream']:.2f}x)"
            )
        print(line)
    return results


if __name__ == "__main__":
    main()
