"""Ulysses sharding: contiguous chunks; attention sees the whole sequence after an all-to-all."""

from __future__ import annotations

import numpy as np
import torch

from .base import RingAttentionLoadBalancer
from .plan import ShardPlan, SlicePlan, pad_to_multiple
from .validation import check_cu_doc_lens, check_length_multiple, metadata_tensor, round_up


class UlyssesLoadBalancer(RingAttentionLoadBalancer):
    """Contiguous sequence sharding for Ulysses-style context parallelism.

    Rank r keeps the r-th of W contiguous chunks. The all-to-all rebuilds full sequences before
    attention, so the global ``cu_doc_lens`` is passed through (plus the padding document).
    A rank whose chunk holds no padding gets views of the inputs (where the chunk is contiguous
    in memory), so its shards share memory with them; the inputs are never modified.
    """

    def plan(
        self,
        seq_len: int,
        cu_doc_lens: torch.Tensor | None = None,
        *,
        length_multiple: int | None = None,
    ) -> ShardPlan:
        multiple = (
            check_length_multiple(length_multiple, self.cp_world_size, "CP degree")
            or self.cp_world_size
        )
        padded_len = round_up(seq_len, multiple)
        if cu_doc_lens is None:
            return SlicePlan.of_rank(seq_len, padded_len, self.cp_rank, self.cp_world_size)
        cu, lengths = check_cu_doc_lens(cu_doc_lens, seq_len)
        padding = padded_len - seq_len
        if padding:
            cu = np.append(cu, padded_len)
        metadata = dict(
            cu_doc_lens=metadata_tensor(cu, cu_doc_lens),
            max_doc_len=max(int(lengths.max()) if len(lengths) else 0, padding),
        )
        return SlicePlan.of_rank(seq_len, padded_len, self.cp_rank, self.cp_world_size, metadata)

    def pad(
        self,
        x: torch.Tensor,
        seq_dim: int,
        value: int | float,
        length_multiple: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Pad ``x`` at the end of ``seq_dim`` to a multiple of ``length_multiple`` (default W)."""
        default = self.cp_world_size
        return pad_to_multiple(x, seq_dim, value, default if length_multiple is None else length_multiple)
