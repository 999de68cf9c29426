"""Llama3 load balancing: contiguous slices, with per-rank q/k document boundaries."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import RingAttentionLoadBalancer
from .plan import ShardPlan, SlicePlan
from .validation import check_cu_doc_lens, check_length_multiple, metadata_tensor, round_up


def llama3_cu_seqlens(
    cu_doc_lens: torch.Tensor, cp_rank: int, cp_world_size: int
) -> dict[str, Any]:
    """The causal llama3 metadata of one rank, computed without ring-flash-attn.

    Equal to ``ring_flash_attn.llama3_flash_attn_prepare_cu_seqlens(cu_doc_lens, causal=True,
    rank=cp_rank, world_size=cp_world_size)``: the q boundaries of the rank's slice, the k
    boundaries of the keys its queries need (from the start of its first document to the end of
    its slice), their largest lengths, and the slice of the all-gathered keys to use.
    ``cu_doc_lens[-1]`` must be a multiple of ``cp_world_size``.
    """
    cu = cu_doc_lens.numpy().astype(np.int64, copy=False)
    return _llama3_metadata(cu, cu_doc_lens, cp_rank, cp_world_size)


def _llama3_metadata(cu: np.ndarray, like: torch.Tensor, cp_rank: int, cp_world_size: int) -> dict[str, Any]:
    """:func:`llama3_cu_seqlens` on int64 boundaries ``cu``; tensors take the dtype of ``like``."""
    total = int(cu[-1])
    if total % cp_world_size:
        raise ValueError(f"total length {total} is not a multiple of cp_world_size {cp_world_size}")
    local_len = total // cp_world_size
    slice_start, slice_end = cp_rank * local_len, (cp_rank + 1) * local_len
    left, right = cu.searchsorted((slice_start, slice_end), side="left").tolist()
    if cu[left] != slice_start:
        left -= 1
    window = cu[left : right + 1]
    cu_q = window - slice_start
    cu_q[0], cu_q[-1] = 0, local_len
    k_start = int(window[0])
    cu_k = window - k_start
    cu_k[-1] = slice_end - k_start
    return dict(
        cu_doc_lens_q=metadata_tensor(cu_q, like),
        cu_doc_lens_k=metadata_tensor(cu_k, like),
        max_doc_len_q=int((cu_q[1:] - cu_q[:-1]).max()),
        max_doc_len_k=int((cu_k[1:] - cu_k[:-1]).max()),
        local_k_slice=slice(k_start, slice_end),
    )


class RingAttentionLlama3LoadBalancer(RingAttentionLoadBalancer):
    """Llama3 load balancing for context parallelism with intra-document masking.

    Rank r holds the contiguous slice ``[r * L, (r + 1) * L)`` of the sequence, padded at its end
    (the padding is one extra document) to a multiple of ``W * (length_multiple or 1)``.
    Only :meth:`batch_shard_by_document` is supported. A rank whose slice holds no padding gets
    views of the inputs (where the slice is contiguous in memory), so its shards share memory
    with them; the inputs are never modified.
    """

    def plan(
        self,
        seq_len: int,
        cu_doc_lens: torch.Tensor | None = None,
        *,
        length_multiple: int | None = None,
    ) -> ShardPlan:
        if cu_doc_lens is None:
            raise NotImplementedError(
                f"{type(self).__name__} should only be used with intra-document masking. "
                "Please use 'batch_shard_by_document()' instead."
            )
        cu, _ = check_cu_doc_lens(cu_doc_lens, seq_len)
        multiple = self.cp_world_size * (check_length_multiple(length_multiple) or 1)
        padded_len = round_up(seq_len, multiple)
        if padded_len != seq_len:
            cu = np.append(cu, padded_len)  # the padding is one more document
        metadata = (
            _llama3_metadata(cu, cu_doc_lens, self.cp_rank, self.cp_world_size) if padded_len else {}
        )
        return SlicePlan.of_rank(seq_len, padded_len, self.cp_rank, self.cp_world_size, metadata)
