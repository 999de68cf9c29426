"""Zig-zag load balancing: rank r keeps chunks r and 2W-1-r of each (padded) document."""

from __future__ import annotations

import numpy as np
import torch

from .base import RingAttentionLoadBalancer
from .plan import PAD, ShardPlan, pad_to_multiple
from .validation import check_cu_doc_lens, check_length_multiple, metadata_tensor, round_up


def zig_zag_index(
    starts: np.ndarray, lengths: np.ndarray, padded_lengths: np.ndarray, cp_rank: int, cp_world_size: int
) -> np.ndarray:
    """Source positions of rank ``cp_rank``'s zig-zag shard, ``PAD`` where a document is padded.

    Document ``i`` occupies ``[starts[i], starts[i] + lengths[i])`` and is padded at its end to
    ``padded_lengths[i]`` (a multiple of 2W), then cut into 2W equal chunks; the shard holds
    chunks ``r`` and ``2W-1-r`` of every document, in document order.
    """
    num_chunks = 2 * cp_world_size
    chunk = padded_lengths // num_chunks
    # Two segments per document: the rank's chunk from the front, then its mirror from the back.
    seg_start = np.stack(
        [starts + cp_rank * chunk, starts + (num_chunks - 1 - cp_rank) * chunk], axis=1
    ).ravel()
    seg_len = np.repeat(chunk, 2)
    local_len = int(seg_len.sum())
    local_seg_start = np.cumsum(seg_len) - seg_len
    index = np.arange(local_len, dtype=np.int64) + np.repeat(seg_start - local_seg_start, seg_len)
    if (padded_lengths != lengths).any():
        doc_end = np.repeat(np.repeat(starts + lengths, 2), seg_len)
        index[index >= doc_end] = PAD
    return index


class RingAttentionZigZagLoadBalancer(RingAttentionLoadBalancer):
    """Zig-zag load balancing for ring attention.

    The sequence (or each document) is cut into 2W chunks and rank r keeps chunks r and 2W-1-r,
    so every rank does the same causal attention work.
    """

    def plan(
        self,
        seq_len: int,
        cu_doc_lens: torch.Tensor | None = None,
        *,
        length_multiple: int | None = None,
    ) -> ShardPlan:
        num_chunks = 2 * self.cp_world_size
        if cu_doc_lens is None:
            multiple = check_length_multiple(length_multiple, num_chunks, "2 x CP degree") or num_chunks
            index = zig_zag_index(
                np.zeros(1, dtype=np.int64),
                np.array([seq_len], dtype=np.int64),
                np.array([round_up(seq_len, multiple)], dtype=np.int64),
                self.cp_rank,
                self.cp_world_size,
            )
            return ShardPlan(torch.from_numpy(index), seq_len, self.cp_rank, self.cp_world_size)

        cu = check_cu_doc_lens(cu_doc_lens, seq_len)
        final_multiple = check_length_multiple(length_multiple)
        lengths = np.diff(cu)
        padded = -(-lengths // num_chunks) * num_chunks
        index = zig_zag_index(cu[:-1], lengths, padded, self.cp_rank, self.cp_world_size)
        local_cu = np.zeros(len(cu), dtype=np.int64)
        np.cumsum(padded // self.cp_world_size, out=local_cu[1:])
        if final_multiple is not None:
            # Upstream appends the end padding as one more document, even when it is empty.
            final_padding = round_up(len(index), final_multiple) - len(index)
            index = np.concatenate([index, np.full(final_padding, PAD, dtype=np.int64)])
            local_cu = np.append(local_cu, local_cu[-1] + final_padding)
        max_doc_len = int(np.diff(local_cu).max()) if len(local_cu) > 1 else 0
        metadata = dict(cu_doc_lens=metadata_tensor(local_cu, cu_doc_lens), max_doc_len=max_doc_len)
        return ShardPlan(torch.from_numpy(index), seq_len, self.cp_rank, self.cp_world_size, metadata)

    def pad(
        self,
        x: torch.Tensor,
        seq_dim: int,
        value: int | float,
        length_multiple: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Pad ``x`` at the end of ``seq_dim`` to a multiple of ``length_multiple`` (default 2W)."""
        return pad_to_multiple(x, seq_dim, value, length_multiple or 2 * self.cp_world_size)

