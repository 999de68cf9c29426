"""The collectives the CP attention schemes use, with the gradients their backward passes need.

All of them work on the gloo backend (CPU) as well as on NCCL; none of them relies on autograd
through ``torch.distributed`` (which P2P communication does not support).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_rank_size(group: Any) -> tuple[int, int]:
    """This process's rank in the process group ``group`` and the group's size (no communication)."""
    return dist.get_rank(group), dist.get_world_size(group)


def resolve_group(group: Any) -> tuple[Any, int, int]:
    """``(process group, this process's rank in it, its size)`` for a CP group or a 1-D DeviceMesh.

    The group is required: attention over the default (whole-world) group silently mixes the
    shards of different data-parallel batches in a DP x CP job. Pass ``dist.group.WORLD`` when
    every process really is one CP group. Raises ``ValueError`` without communicating.
    """
    if group is None:
        raise ValueError(
            "group is required: pass the context-parallel process group (or its 1-D DeviceMesh); "
            "use dist.group.WORLD only when all processes form one CP group"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; call init_process_group first")
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(
                f"a {group.ndim}-D DeviceMesh has no single CP group; pass its CP dimension, "
                "e.g. mesh['cp']"
            )
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be a ProcessGroup or a 1-D DeviceMesh, got {group!r}")
    rank, size = group_rank_size(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group"
        )
    return group, rank, size


class RingExchange:
    """Send a tensor to the next rank of the ring while receiving the previous rank's.

    ``start`` posts both transfers and returns at once, so the caller computes while the block
    travels; ``wait`` returns the received tensor.
    """

    def __init__(self, group: Any):
        rank, size = group_rank_size(group)
        self._next = dist.get_global_rank(group, (rank + 1) % size)
        self._prev = dist.get_global_rank(group, (rank - 1) % size)
        self._group = group
        self._works: list = []
        self._recv: torch.Tensor | None = None

    def start(self, tensor: torch.Tensor) -> None:
        self._recv = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor.contiguous(), self._next, self._group),
            dist.P2POp(dist.irecv, self._recv, self._prev, self._group),
        ]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        received, self._recv, self._works = self._recv, None, []
        return received


class _GatherSum(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        rank, size = group_rank_size(group)
        ctx.group, ctx.rank, ctx.local = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # all-reduce + slice rather than reduce-scatter: every backend has it.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local], None


def all_gather_with_grad(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, differentiably (gradients go to the owners)."""
    return _GatherSum.apply(x, group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """Send chunk j of ``scatter_dim`` to rank j; concatenate what arrives along ``gather_dim``.

    Chunks arrive in rank order. No gradient: see :func:`all_to_all_with_grad`.
    """
    _, size = group_rank_size(group)
    # Stacked equal chunks on a new leading dim: all_to_all_single, which gloo supports too.
    send = torch.stack(x.chunk(size, dim=scatter_dim))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Split ``scatter_dim`` over the ranks and concatenate what arrives along ``gather_dim``."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any
    ) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all_with_grad(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """Differentiable all-to-all: the backward is the reverse all-to-all."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)
