"""Shard plans: one gather index per rank, computed once and applied to every input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .validation import ShardingError, check_length_multiple, normalize_dim, round_up

PAD = -1
"""Value of :attr:`ShardPlan.index` at positions where the shard holds padding."""


@dataclass(eq=False)
class ShardPlan:
    """Where each element of one rank's shard comes from.

    ``index[j]`` is the position in the original (unpadded) sequence of the ``j``-th element of
    the shard, or :data:`PAD` where the shard holds padding. Applying a plan is one gather along
    the sequence dimension, so every input of a batch is sharded with the same plan.
    """

    index: torch.Tensor
    """int64 [local_len]: source position per shard position, ``PAD`` for padding."""
    seq_len: int
    """Length of the original sequence the plan reads from."""
    cp_rank: int
    cp_world_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    """What the attention kernel needs besides the shard (empty for plain sharding)."""
    _gather_index: torch.Tensor = field(init=False, repr=False)
    _pad_positions: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        is_pad = self.index == PAD
        self._pad_positions = is_pad.nonzero().flatten()
        # Pad slots read position 0 and are overwritten afterwards: no padded copy of the input.
        self._gather_index = (
            self.index.masked_fill(is_pad, 0) if len(self._pad_positions) else self.index
        )

    @property
    def local_len(self) -> int:
        """Length of the shard on the sequence dimension."""
        return int(self.index.numel())

    @property
    def num_padding(self) -> int:
        """How many positions of this rank's shard are padding."""
        return int(self._pad_positions.numel())

    @property
    def group_padding(self) -> int:
        """How many padding positions the whole group adds (every rank holds ``local_len``)."""
        return self.cp_world_size * self.local_len - self.seq_len

    def shard(
        self, x: torch.Tensor, seq_dim: int, pad_value: int | float | None = None, *, name: str = "input"
    ) -> torch.Tensor:
        """Gather this rank's shard of ``x`` along ``seq_dim``, writing ``pad_value`` into padding."""
        dim = normalize_dim(seq_dim, x.ndim)
        if x.shape[dim] != self.seq_len:
            raise ShardingError(
                f"{name} has size {x.shape[dim]} on seq_dim {seq_dim} but the plan was made for "
                f"a sequence of length {self.seq_len}"
            )
        # Checked for the whole group so that every rank fails alike, not only those holding padding.
        if self.group_padding and pad_value is None:
            raise ShardingError(
                f"a sequence of length {self.seq_len} needs {self.group_padding} padding positions "
                f"over {self.cp_world_size} ranks, but {name} has no pad value"
            )
        if not self.num_padding:
            return x.index_select(dim, self.index)
        if self.seq_len == 0:
            shape = list(x.shape)
            shape[dim] = self.local_len
            return torch.full(shape, pad_value, dtype=x.dtype, device=x.device)
        out = x.index_select(dim, self._gather_index.to(x.device))
        return out.index_fill_(dim, self._pad_positions.to(x.device), pad_value)

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


def contiguous_index(seq_len: int, padded_len: int, cp_rank: int, cp_world_size: int) -> torch.Tensor:
    """Rank ``cp_rank``'s contiguous slice of a sequence padded to ``padded_len``."""
    local_len = padded_len // cp_world_size
    index = torch.arange(cp_rank * local_len, (cp_rank + 1) * local_len, dtype=torch.int64)
    return index.masked_fill_(index >= seq_len, PAD)


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
        real = (plan.index != PAD).nonzero().flatten()
        targets = plan.index[real]
        seen.index_add_(0, targets, torch.ones_like(targets))
        out.index_copy_(dim, targets, shard.index_select(dim, real))
    if seq_len and not bool((seen == 1).all()):
        bad = (seen != 1).nonzero().flatten()[:8].tolist()
        raise ShardingError(f"plans do not cover each position exactly once (e.g. positions {bad})")
    return out
