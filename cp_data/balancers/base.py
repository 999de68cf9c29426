"""The load-balancer interface: plan an index per rank, then gather every input with it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence, TypeVar

import torch

from .plan import ShardPlan
from .validation import ShardingError, check_inputs, is_int

_Balancer = TypeVar("_Balancer", bound="RingAttentionLoadBalancer")


class RingAttentionLoadBalancer(ABC):
    """Shards inputs on their sequence dimension for one rank of a context-parallel group.

    Subclasses implement :meth:`plan`; sharding is one gather per input with that plan.
    """

    def __init__(self, *, cp_rank: int, cp_world_size: int):
        for name, value in (("cp_rank", cp_rank), ("cp_world_size", cp_world_size)):
            if not is_int(value):
                raise ShardingError(f"{name} must be an int, got {value!r}")
        if cp_world_size < 1:
            raise ShardingError(f"cp_world_size must be >= 1, got {cp_world_size}")
        if not 0 <= cp_rank < cp_world_size:
            raise ShardingError(f"cp_rank must be in [0, {cp_world_size}), got {cp_rank}")
        self.cp_rank = int(cp_rank)
        self.cp_world_size = int(cp_world_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cp_rank={self.cp_rank}, cp_world_size={self.cp_world_size})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), self.cp_rank, self.cp_world_size))

    @abstractmethod
    def plan(
        self,
        seq_len: int,
        cu_doc_lens: torch.Tensor | None = None,
        *,
        length_multiple: int | None = None,
    ) -> ShardPlan:
        """Plan this rank's shard of a sequence of ``seq_len`` tokens.

        Without ``cu_doc_lens`` the plan is that of :meth:`batch_shard`; with it, that of
        :meth:`batch_shard_by_document`, and :attr:`ShardPlan.metadata` holds what the
        attention kernel needs.
        """

    def for_rank(self: _Balancer, cp_rank: int) -> _Balancer:
        """The same balancer for another rank of the group."""
        return type(self)(cp_rank=cp_rank, cp_world_size=self.cp_world_size)

    def plan_all_ranks(
        self,
        seq_len: int,
        cu_doc_lens: torch.Tensor | None = None,
        *,
        length_multiple: int | None = None,
    ) -> list[ShardPlan]:
        """:meth:`plan` for every rank of the group, in rank order."""
        return [
            self.for_rank(r).plan(seq_len, cu_doc_lens, length_multiple=length_multiple)
            for r in range(self.cp_world_size)
        ]

    def batch_shard(
        self,
        *,
        inputs: Sequence[torch.Tensor],
        seq_dims: Sequence[int],
        pad_values: Sequence[int | float | None] | None = None,
        length_multiple: int | None = None,
    ) -> list[torch.Tensor]:
        """Shard ``inputs`` on their sequence dimensions, padding at the end if needed.

        With intra-document masking use :meth:`batch_shard_by_document` instead.
        """
        seq_len, dims = check_inputs(inputs, seq_dims, pad_values)
        if seq_len is None:
            return []
        plan = self.plan(seq_len, length_multiple=length_multiple)
        return plan.shard_all(inputs, dims, pad_values)

    def batch_shard_by_document(
        self,
        *,
        inputs: Sequence[torch.Tensor],
        seq_dims: Sequence[int],
        cu_doc_lens: torch.Tensor,
        pad_values: Sequence[int | float | None] | None = None,
        length_multiple: int | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Shard ``inputs`` document by document; also return the attention metadata."""
        seq_len, dims = check_inputs(inputs, seq_dims, pad_values)
        if seq_len is None:
            if not isinstance(cu_doc_lens, torch.Tensor) or cu_doc_lens.ndim != 1 or not len(cu_doc_lens):
                raise ShardingError("with no inputs, cu_doc_lens must be a non-empty 1-D tensor")
            seq_len = int(cu_doc_lens[-1])
        plan = self.plan(seq_len, cu_doc_lens, length_multiple=length_multiple)
        return plan.shard_all(inputs, dims, pad_values), plan.metadata
