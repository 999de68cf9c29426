"""The shard map: which rank holds each position of the global row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cp_data.balancers import PAD, RingAttentionLoadBalancerType

from .metrics import BatchRow, all_rank_plans, as_row

__all__ = ["ShardMap", "shard_map"]


@dataclass(frozen=True)
class ShardMap:
    """Which rank holds each position of the global row."""

    balancer: str
    cp_world_size: int
    cu_doc_lens: np.ndarray
    rank: np.ndarray
    """int64 [N]: the rank holding each global position."""
    local_position: np.ndarray
    """int64 [N]: where in that rank's shard the position lands."""
    padding: np.ndarray
    """int64 [W]: balancer padding slots per rank (they have no global position)."""
    real_documents: np.ndarray | None = None
    """bool [n_docs]: False for documents made only of the instances' padding (None: all real)."""

    def doc_rank_tokens(self) -> np.ndarray:
        """int64 [n_docs, W]: tokens of each document on each rank."""
        lens = np.diff(self.cu_doc_lens)
        doc = np.repeat(np.arange(len(lens)), lens)
        flat = doc * self.cp_world_size + self.rank
        counts = np.bincount(flat, minlength=len(lens) * self.cp_world_size)
        return counts.reshape(len(lens), self.cp_world_size)

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Maximal runs of positions held by one rank within one document: (start, length, rank)."""
        n = self.rank.size
        cut = np.zeros(n, dtype=bool)
        if n:
            cut[0] = True
            cut[1:] = self.rank[1:] != self.rank[:-1]
            cut[self.cu_doc_lens[:-1][self.cu_doc_lens[:-1] < n]] = True
        starts = np.flatnonzero(cut)
        return starts, np.diff(np.append(starts, n)), self.rank[starts]


def shard_map(
    batch: BatchRow | Any,
    balancer: RingAttentionLoadBalancerType | str,
    cp_world_size: int,
    *,
    length_multiple: int | None = None,
) -> ShardMap:
    """The :class:`ShardMap` of ``balancer`` on a batch (``cu_doc_lens``, a :class:`BatchRow` or a
    list of packed instances; the last two mark the instances' padding documents)."""
    kind = RingAttentionLoadBalancerType.parse(balancer)
    row = as_row(batch)
    cu = row.cu_doc_lens
    n = int(cu[-1])
    rank = np.full(n, -1, dtype=np.int64)
    local = np.full(n, -1, dtype=np.int64)
    padding = np.zeros(cp_world_size, dtype=np.int64)
    for r, plan in enumerate(all_rank_plans(kind, cu, cp_world_size, length_multiple)):
        index = plan.index.numpy()
        slots = np.flatnonzero(index != PAD)
        rank[index[slots]] = r
        local[index[slots]] = slots
        padding[r] = plan.num_padding
    return ShardMap(kind.value, cp_world_size, cu, rank, local, padding, row.real_documents)
