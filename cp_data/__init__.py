"""cp-data: context-parallel training data, ready in the DataLoader."""

from .balancers import (
    PAD,
    RingAttentionLlama3LoadBalancer,
    RingAttentionLoadBalancer,
    RingAttentionLoadBalancerType,
    RingAttentionZigZagLoadBalancer,
    RingContextParallelStyle,
    ShardingError,
    ShardPlan,
    UlyssesContextParallelStyle,
    UlyssesLoadBalancer,
    llama3_cu_seqlens,
    unshard,
)

__version__ = "0.1.0"

__all__ = [
    "PAD",
    "RingAttentionLlama3LoadBalancer",
    "RingAttentionLoadBalancer",
    "RingAttentionLoadBalancerType",
    "RingAttentionZigZagLoadBalancer",
    "RingContextParallelStyle",
    "ShardPlan",
    "ShardingError",
    "UlyssesContextParallelStyle",
    "UlyssesLoadBalancer",
    "llama3_cu_seqlens",
    "unshard",
]
