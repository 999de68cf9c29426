"""Zig-zag load balancing: rank r keeps chunks r and 2W-1-r of each (padded) document."""

from __future__ import annotations

import numpy as np
import torch

from .base import RingAttentionLoadBalancer
from .plan import ShardPlan, pad_to_multiple
from .validation import check_cu_doc_lens, check_length_multiple, metadata_tensor, round_up


def zig_zag_index(
    cu: np.ndarray, chunk: np.ndarray, cp_rank: int, cp_world_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank ``cp_rank``'s zig-zag gather index, its padding positions and local boundaries.

    Document ``i`` occupies ``[cu[i], cu[i + 1])`` and is padded at its end to ``2W * chunk[i]``
    tokens, then cut into 2W chunks of ``chunk[i]``; the shard holds chunks ``r`` and ``2W-1-r`` of
    every document, in document order. The local boundaries (``[n + 1]``, from 0) are the padded
    global ones divided by W.
    """
    # Few numpy calls on whole arrays: their per-call cost dominates at typical sizes.
    n = len(chunk)
    held = 2 * chunk  # positions of each document on the rank
    local_cu = np.empty(n + 1, dtype=np.int64)
    local_cu[0] = 0
    np.cumsum(held, out=local_cu[1:])
    # Source minus shard position along each segment: the front chunk, then its mirror.
    base = cu[:-1] - local_cu[:-1]
    offset = np.empty((n, 2), dtype=np.int64)
    np.add(base, cp_rank * chunk, out=offset[:, 0])
    np.add(base, (2 * cp_world_size - 2 - cp_rank) * chunk, out=offset[:, 1])
    gather = np.repeat(offset.ravel(), np.repeat(chunk, 2))
    gather += np.arange(gather.size)
    # Positions past their document's end are that document's padding.
    pad_positions = np.flatnonzero(gather >= np.repeat(cu[1:], held))
    gather[pad_positions] = 0
    return gather, pad_positions, local_cu


class RingAttentionZigZagLoadBalancer(RingAttentionLoadBalancer):
    """Zig-zag load balancing for ring attention.

    The sequence (or each document) is cut into 2W chunks and rank r keeps chunks r and 2W-1-r,
    so every rank does the same causal attention work.

    With ``batch_shard_by_document`` any positive ``length_multiple`` is accepted (as upstream),
    but ring-flash-attn's zigzag varlen kernel halves the local ``cu_doc_lens``: give it an even
    multiple so that the final padding document has an even length too.
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
            gather, pads, _ = zig_zag_index(
                np.array([0, seq_len], dtype=np.int64),
                np.array([round_up(seq_len, multiple) // num_chunks], dtype=np.int64),
                self.cp_rank,
                self.cp_world_size,
            )
            return self._plan(gather, pads, seq_len, {})

        cu, lengths = check_cu_doc_lens(cu_doc_lens, seq_len)
        final_multiple = check_length_multiple(length_multiple)
        chunk = (lengths + (num_chunks - 1)) // num_chunks
        gather, pads, local_cu = zig_zag_index(cu, chunk, self.cp_rank, self.cp_world_size)
        max_doc_len = 2 * int(chunk.max()) if len(chunk) else 0
        if final_multiple is not None:
            # Upstream appends the end padding as one more document, even when it is empty.
            local_len = len(gather)
            final_padding = round_up(local_len, final_multiple) - local_len
            gather = np.concatenate([gather, np.zeros(final_padding, dtype=np.int64)])
            pads = np.concatenate([pads, np.arange(local_len, local_len + final_padding)])
            local_cu = np.append(local_cu, local_cu[-1] + final_padding)
            max_doc_len = max(max_doc_len, final_padding)
        metadata = dict(cu_doc_lens=metadata_tensor(local_cu, cu_doc_lens), max_doc_len=max_doc_len)
        return self._plan(gather, pads, seq_len, metadata)

    def _plan(self, gather: np.ndarray, pads: np.ndarray, seq_len: int, metadata: dict) -> ShardPlan:
        return ShardPlan(
            torch.from_numpy(gather), torch.from_numpy(pads), seq_len, self.cp_rank, self.cp_world_size, metadata
        )

    def pad(
        self,
        x: torch.Tensor,
        seq_dim: int,
        value: int | float,
        length_multiple: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Pad ``x`` at the end of ``seq_dim`` to a multiple of ``length_multiple`` (default 2W)."""
        default = 2 * self.cp_world_size
        return pad_to_multiple(x, seq_dim, value, default if length_multiple is None else length_multiple)

