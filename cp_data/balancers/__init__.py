"""Context-parallel load balancers: plan one gather index per rank, then shard every input."""

from .base import RingAttentionLoadBalancer
from .llama3 import RingAttentionLlama3LoadBalancer, llama3_cu_seqlens
from .ordering import llama3_balanced_order, llama3_rank_work
from .pairs import causal_pairs
from .plan import PAD, ShardPlan, SlicePlan, unshard
from .types import (
    METADATA_KEYS,
    RingAttentionLoadBalancerType,
    RingContextParallelStyle,
    UlyssesContextParallelStyle,
)
from .ulysses import UlyssesLoadBalancer
from .validation import ShardingError
from .zig_zag import RingAttentionZigZagLoadBalancer

__all__ = [
    "METADATA_KEYS",
    "PAD",
    "RingAttentionLlama3LoadBalancer",
    "RingAttentionLoadBalancer",
    "RingAttentionLoadBalancerType",
    "RingAttentionZigZagLoadBalancer",
    "RingContextParallelStyle",
    "ShardPlan",
    "SlicePlan",
    "ShardingError",
    "UlyssesContextParallelStyle",
    "UlyssesLoadBalancer",
    "causal_pairs",
    "llama3_balanced_order",
    "llama3_cu_seqlens",
    "llama3_rank_work",
    "unshard",
]
