"""Shard plans: one gather index per rank, computed once and applied to every input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .validation import ShardingError, check_length_multiple, normalize_dim, round_up

PAD = -1
"""Value of :attr:`ShardPlan.index` at positions where the shard holds padding."""


@dataclass(eq=False)
class ShardPlan:
    """Where each element of one rank's shard comes from.

    A plan is a gather index into the original (unpadded) sequence plus the shard positions that
    hold padding. Applying it is one ``index_select`` along the sequence dimension (and a fill of
    the padding), so every input of a batch is sharded with the same plan.
    """

    gather_index: torch.Tensor
    """int64 [local_len]: source position of each shard position (any valid one at padding)."""
    pad_positions: torch.Tensor
    """int64 [num_padding]: the shard positions that hold padding."""
    seq_len: int
    """Length of the original sequence the plan reads from."""
    cp_rank: int
    cp_world_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    """What the attention kernel needs besides the shard (empty for plain sharding)."""

    @classmethod
    def from_index(
        cls, index: torch.Tensor, seq_len: int, cp_rank: int, cp_world_size: int,
        metadata: dict[str, Any] | None = None,
    ) -> "ShardPlan":
        """A plan from source positions with :data:`PAD` marking padding."""
        values = index.numpy()
        pad_positions = np.flatnonzero(values == PAD)
        gather = values.copy()
        gather[pad_positions] = 0
        return cls(
            torch.from_numpy(gather), torch.from_numpy(pad_positions), seq_len, cp_rank,
            cp_world_size, metadata or {},
        )

    @property
    def index(self) -> torch.Tensor:
        """int64 [local_len]: source position per shard position, :data:`PAD` at padding."""
        return self.gather_index.index_fill(0, self.pad_positions, PAD)

    @property
    def local_len(self) -> int:
        """Length of the shard on the sequence dimension."""
        return int(self.gather_index.numel())

    @property
    def num_padding(self) -> int:
        """How many positions of this rank's shard are padding."""
        return int(self.pad_positions.numel())

    @property
    def group_padding(self) -> int:
        """How many padding positions the whole group adds (every rank holds ``local_len``)."""
        return self.cp_world_size * self.local_len - self.seq_len

    def shard(
        self, x: torch.Tensor, seq_dim: int, pad_value: int | float | None = None, *, name: str = "input"
    ) -> torch.Tensor:
        """Gather this rank's shard of ``x`` along ``seq_dim``, writing ``pad_value`` into padding."""
        shape = x.shape
        in_range = type(seq_dim) is int and 0 <= seq_dim < len(shape)  # skip the checks of the usual case
        dim = seq_dim if in_range else normalize_dim(seq_dim, len(shape))
        if shape[dim] != self.seq_len:
            raise ShardingError(
                f"{name} has size {shape[dim]} on seq_dim {seq_dim} but the plan was made for "
                f"a sequence of length {self.seq_len}"
            )
        # Checked for the whole group so that every rank fails alike, not only those holding padding.
        if pad_value is None and self.group_padding:
            raise ShardingError(
                f"a sequence of length {self.seq_len} needs {self.group_padding} padding positions "
                f"over {self.cp_world_size} ranks, but {name} has no pad value"
            )
        gather, pads = self.gather_index, self.pad_positions
        if not x.is_cpu:
            gather, pads = gather.to(x.device), pads.to(x.device)
        if dim and shape[:dim].numel() == 1:
            # Leading size-1 dims (the usual [1, N] batch) make index_select on dim > 0 ~2x slower.
            out = self._gather(x.flatten(0, dim), 0, gather, pads, pad_value)
            for _ in range(dim):
                out = out.unsqueeze(0)
            return out
        return self._gather(x, dim, gather, pads, pad_value)

    def _gather(
        self, x: torch.Tensor, dim: int, gather: torch.Tensor, pads: torch.Tensor, pad_value: int | float | None
    ) -> torch.Tensor:
        if not len(pads):
            return x.index_select(dim, gather)
        if self.seq_len == 0:
            shape = list(x.shape)
            shape[dim] = self.local_len
            return torch.full(shape, pad_value, dtype=x.dtype, device=x.device)
        return x.index_select(dim, gather).index_fill_(dim, pads, pad_value)

    def shard_all(
        self,
        inputs: Sequence[torch.Tensor],
        seq_dims: Sequence[int],
        pad_values: Sequence[int | float | None] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`shard` every input with its own ``seq_dim`` and pad value."""
        pads = list(pad_values) if pad_values is not None else [None] * len(inputs)
        return [
            self.shard(x, d, p, name=f"inputs[{i}]")
            for i, (x, d, p) in enumerate(zip(inputs, seq_dims, pads))
        ]


def pad_to_multiple(
    x: torch.Tensor, seq_dim: int, value: int | float, length_multiple: int
) -> tuple[torch.Tensor, int]:
    """Pad ``x`` with ``value`` at the end of ``seq_dim`` to a multiple of ``length_multiple``.

    Returns a new tensor and the number of positions added.
    """
    check_length_multiple(length_multiple)
    dim = normalize_dim(seq_dim, x.ndim)
    padding = round_up(x.shape[dim], length_multiple) - x.shape[dim]
    shape = list(x.shape)
    shape[dim] = padding
    return torch.cat([x, x.new_full(shape, value)], dim=dim), padding


def contiguous_plan(
    seq_len: int, padded_len: int, cp_rank: int, cp_world_size: int, metadata: dict[str, Any] | None = None
) -> ShardPlan:
    """Rank ``cp_rank``'s contiguous slice of a sequence padded at its end to ``padded_len``."""
    local_len = padded_len // cp_world_size
    start = cp_rank * local_len
    real = min(max(seq_len - start, 0), local_len)
    gather = torch.arange(start, start + local_len, dtype=torch.int64)
    gather[real:] = 0
    pad_positions = torch.arange(real, local_len, dtype=torch.int64)
    return ShardPlan(gather, pad_positions, seq_len, cp_rank, cp_world_size, metadata or {})


def unshard(shards: Sequence[torch.Tensor], plans: Sequence[ShardPlan], seq_dim: int) -> torch.Tensor:
    """Rebuild the original sequence from the shards of all ranks (the inverse of sharding).

    ``shards[r]`` must be the shard that ``plans[r]`` produced. Raises :class:`ShardingError` when
    the plans do not cover every position of the sequence exactly once.
    """
    if not shards or len(shards) != len(plans):
        raise ShardingError(f"need one shard per plan, got {len(shards)} shards and {len(plans)} plans")
    seq_len = plans[0].seq_len
    first = shards[0]
    dim = normalize_dim(seq_dim, first.ndim)
    shape = list(first.shape)
    shape[dim] = seq_len
    out = first.new_empty(shape)
    seen = torch.zeros(seq_len, dtype=torch.int64)
    for shard, plan in zip(shards, plans):
        if shard.shape[dim] != plan.local_len:
            raise ShardingError(
                f"shard of rank {plan.cp_rank} has size {shard.shape[dim]} on seq_dim {seq_dim}, "
                f"its plan expects {plan.local_len}"
            )
        index = plan.index  # a property that builds a new tensor: read it once
        real = (index != PAD).nonzero().flatten()
        targets = index[real]
        seen.index_add_(0, targets, torch.ones_like(targets))
        out.index_copy_(dim, targets, shard.index_select(dim, real))
    if seq_len and not bool((seen == 1).all()):
        bad = (seen != 1).nonzero().flatten()[:8].tolist()
        raise ShardingError(f"plans do not cover each position exactly once (e.g. positions {bad})")
    return out
