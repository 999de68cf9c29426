"""One entry point for the three CP attention schemes, driven by a batch's metadata."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..balancers import METADATA_KEYS, RingAttentionLoadBalancer, RingAttentionLoadBalancerType
from .comm import resolve_group
from .gathered import llama3_attention, ulysses_attention
from .ring import zig_zag_ring_attention
from .verify import verify_metadata

__all__ = ["cp_attention", "METADATA_KEYS", "balancer_kind", "scheme_metadata"]

_SCHEMES = {
    RingAttentionLoadBalancerType.zig_zag: zig_zag_ring_attention,
    RingAttentionLoadBalancerType.llama3: llama3_attention,
    RingAttentionLoadBalancerType.ulysses: ulysses_attention,
}


def balancer_kind(load_balancer: Any, rank: int, size: int) -> RingAttentionLoadBalancerType:
    """The scheme of ``load_balancer`` (a type, its name or a balancer).

    A balancer carries its rank and group size: they must be this process's rank and size in
    the CP group, else ``ValueError`` (no communication).
    """
    if not isinstance(load_balancer, RingAttentionLoadBalancer):
        return RingAttentionLoadBalancerType.parse(load_balancer)
    if (load_balancer.cp_rank, load_balancer.cp_world_size) != (rank, size):
        raise ValueError(
            f"the load balancer is for rank {load_balancer.cp_rank} of {load_balancer.cp_world_size} "
            f"but this process is rank {rank} of {size} in the CP group"
        )
    return next(
        k for k in RingAttentionLoadBalancerType if isinstance(load_balancer, k.balancer_class)
    )


def scheme_metadata(
    kind: RingAttentionLoadBalancerType, batch_metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """The metadata ``kind`` needs, in kernel argument order, from a batch or its metadata."""
    missing = [key for key in METADATA_KEYS[kind] if key not in batch_metadata]
    if missing:
        raise ValueError(
            f"{kind.value} attention needs batch metadata {missing}; got keys {sorted(batch_metadata)}"
        )
    return {key: batch_metadata[key] for key in METADATA_KEYS[kind]}


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_metadata: Mapping[str, Any],
    *,
    load_balancer: RingAttentionLoadBalancerType | str | RingAttentionLoadBalancer,
    group: Any,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    verify: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal document-masked attention of this rank's shard, equal to full attention's.

    ``q``: ``[T_local, H, D]``, ``k, v``: ``[T_local, H_kv, D]`` (``H_kv`` dividing ``H``),
    sharded by ``load_balancer`` (a type, its name, or a balancer, whose rank and size must
    match this process's in ``group``); ``batch_metadata``: the balancer's metadata, or the
    whole collated batch (other keys are ignored); ``group``: the CP process group or a 1-D
    DeviceMesh, required (``dist.group.WORLD`` only when all processes form one CP group).
    Dispatches to :func:`zig_zag_ring_attention`, :func:`llama3_attention` or
    :func:`ulysses_attention`. ``return_lse`` also returns the log-sum-exp ``[H, T_local]``.
    ``verify`` first checks the metadata against the other ranks' (one small collective; use it
    on the first step). Bad input raises ``ValueError`` before any other communication.
    """
    group, rank, size = resolve_group(group)
    kind = balancer_kind(load_balancer, rank, size)
    metadata = scheme_metadata(kind, batch_metadata)
    if verify:
        tokens = q.shape[0] if isinstance(q, torch.Tensor) and q.ndim else 0
        verify_metadata(kind, metadata, tokens, group=group, rank=rank, size=size)
    return _SCHEMES[kind](
        q, k, v, *metadata.values(), group=group, softmax_scale=softmax_scale, return_lse=return_lse
    )
