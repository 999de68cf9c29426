"""One entry point for the three CP attention schemes, driven by a batch's metadata."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..balancers import METADATA_KEYS, RingAttentionLoadBalancer, RingAttentionLoadBalancerType
from .comm import group_rank_size
from .gathered import llama3_attention, ulysses_attention
from .ring import zig_zag_ring_attention

__all__ = ["cp_attention", "METADATA_KEYS"]

_SCHEMES = {
    RingAttentionLoadBalancerType.zig_zag: zig_zag_ring_attention,
    RingAttentionLoadBalancerType.llama3: llama3_attention,
    RingAttentionLoadBalancerType.ulysses: ulysses_attention,
}


def _balancer_kind(load_balancer: Any, group: Any) -> RingAttentionLoadBalancerType:
    if not isinstance(load_balancer, RingAttentionLoadBalancer):
        return RingAttentionLoadBalancerType.parse(load_balancer)
    rank, size = group_rank_size(group)
    if (load_balancer.cp_rank, load_balancer.cp_world_size) != (rank, size):
        raise ValueError(
            f"the load balancer is for rank {load_balancer.cp_rank} of {load_balancer.cp_world_size} "
            f"but this process is rank {rank} of {size} in the CP group"
        )
    return next(
        k for k in RingAttentionLoadBalancerType if isinstance(load_balancer, k.balancer_class)
    )


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_metadata: Mapping[str, Any],
    *,
    load_balancer: RingAttentionLoadBalancerType | str | RingAttentionLoadBalancer,
    group: Any = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal document-masked attention of this rank's shard, equal to full attention's.

    ``q, k, v``: ``[T_local, H, D]`` sharded by ``load_balancer`` (a type, its name, or a
    balancer); ``batch_metadata``: the balancer's metadata, or the whole collated batch (other
    keys are ignored). Dispatches to :func:`zig_zag_ring_attention`, :func:`llama3_attention` or
    :func:`ulysses_attention` over the CP process ``group`` (default: the world). Bad input raises
    ``ValueError`` before any communication.
    """
    kind = _balancer_kind(load_balancer, group)
    missing = [key for key in METADATA_KEYS[kind] if key not in batch_metadata]
    if missing:
        raise ValueError(
            f"{kind.value} attention needs batch metadata {missing}; got keys {sorted(batch_metadata)}"
        )
    args = [batch_metadata[key] for key in METADATA_KEYS[kind]]
    return _SCHEMES[kind](q, k, v, *args, softmax_scale=softmax_scale, group=group)
