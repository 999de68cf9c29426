"""Shard plans: one gather index per rank, computed once and applied to every input."""

from __future__ import annotations

import functools
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
    the padding), so every input of a batch is sharded with the same plan. Plans that read one
    contiguous range (llama3, ulysses) are :class:`SlicePlan` objects, applied as a slice.
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
        self,
        x: torch.Tensor,
        seq_dim: int,
        pad_value: int | float | None = None,
        *,
        name: str = "input",
        copy: bool = False,
    ) -> torch.Tensor:
        """This rank's shard of ``x`` along ``seq_dim``, with ``pad_value`` written into padding.

        ``x`` is never modified. The shard is a new contiguous tensor, except for a
        :class:`SlicePlan` without padding: there it is a view of ``x`` whenever that slice is
        contiguous in memory, so writing into the shard writes into ``x``. ``copy=True`` always
        returns a new tensor (e.g. when ``x`` is a temporary that the view would keep alive whole).
        """
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
        return self._take(x, dim, pad_value, copy)

    def _take(self, x: torch.Tensor, dim: int, pad_value: int | float | None, copy: bool) -> torch.Tensor:
        """Apply the plan to ``x`` along ``dim`` (both already checked); a gather always copies."""
        gather, pads = self.gather_index, self.pad_positions
        if not x.is_cpu:
            gather, pads = gather.to(x.device), pads.to(x.device)
        if len(pads) and self.seq_len == 0:
            shape = list(x.shape)
            shape[dim] = self.local_len
            return torch.full(shape, pad_value, dtype=x.dtype, device=x.device)
        # Leading size-1 dims (the usual [1, N] batch) make index_select on dim > 0 ~2x slower.
        lead = dim if dim and x.shape[:dim].numel() == 1 else 0
        out = (x.flatten(0, dim) if lead else x).index_select(dim - lead, gather)
        if len(pads):
            out.index_fill_(dim - lead, pads, pad_value)
        for _ in range(lead):
            out = out.unsqueeze(0)
        return out

    def shard_all(
        self,
        inputs: Sequence[torch.Tensor],
        seq_dims: Sequence[int],
        pad_values: Sequence[int | float | None] | None = None,
        *,
        copy: bool = False,
    ) -> list[torch.Tensor]:
        """:meth:`shard` every input with its own ``seq_dim`` and pad value."""
        pads = list(pad_values) if pad_values is not None else [None] * len(inputs)
        return [
            self.shard(x, d, p, name=f"inputs[{i}]", copy=copy)
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


class SlicePlan(ShardPlan):
    """A plan that reads one contiguous range: ``[start, start + real)`` of the input, then padding.

    llama3 and ulysses shards are such slices. Applying the plan is a slice, not a gather: on a
    rank without padding the shard is a view of the input (when that range is contiguous in
    memory), so it shares memory with the input; on the rank holding the final padding it is one
    copy of the range plus a fill. The gather index is only built when asked for.
    """

    def __init__(
        self, start: int, real: int, local_len: int, seq_len: int, cp_rank: int, cp_world_size: int,
        metadata: dict[str, Any] | None = None,
    ):
        self.start, self.real, self._local_len = start, real, local_len
        self.seq_len, self.cp_rank, self.cp_world_size = seq_len, cp_rank, cp_world_size
        self.metadata = metadata or {}

    @classmethod
    def of_rank(
        cls, seq_len: int, padded_len: int, cp_rank: int, cp_world_size: int, metadata: dict[str, Any] | None = None
    ) -> "SlicePlan":
        """Rank ``cp_rank``'s slice of a sequence padded at its end to ``padded_len``."""
        local_len = padded_len // cp_world_size
        start = cp_rank * local_len
        return cls(start, min(max(seq_len - start, 0), local_len), local_len, seq_len, cp_rank, cp_world_size, metadata)

    def __repr__(self) -> str:
        return (
            f"SlicePlan(start={self.start}, real={self.real}, local_len={self._local_len}, "
            f"seq_len={self.seq_len}, cp_rank={self.cp_rank}, cp_world_size={self.cp_world_size})"
        )

    @functools.cached_property
    def gather_index(self) -> torch.Tensor:  # type: ignore[override]
        gather = torch.zeros(self._local_len, dtype=torch.int64)
        torch.arange(self.start, self.start + self.real, out=gather[: self.real])
        return gather

    @functools.cached_property
    def pad_positions(self) -> torch.Tensor:  # type: ignore[override]
        return torch.arange(self.real, self._local_len, dtype=torch.int64)

    @property
    def local_len(self) -> int:
        return self._local_len

    @property
    def num_padding(self) -> int:
        return self._local_len - self.real

    def _take(self, x: torch.Tensor, dim: int, pad_value: int | float | None, copy: bool) -> torch.Tensor:
        if self.real == self._local_len:
            view = x.narrow(dim, self.start, self.real)
            return view.clone(memory_format=torch.contiguous_format) if copy else view.contiguous()
        shape = list(x.shape)
        shape[dim] = self._local_len
        out = x.new_empty(shape)
        if self.real:  # a rank past the end of the sequence holds only padding
            out.narrow(dim, 0, self.real).copy_(x.narrow(dim, self.start, self.real))
        out.narrow(dim, self.real, self._local_len - self.real).fill_(pad_value)
        return out


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
