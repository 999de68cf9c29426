"""See the shards: per-rank metrics, balancer comparisons, shard maps and plots."""

from .metrics import (
    REORDERED,
    BalancerComparison,
    BatchRow,
    ShardMetrics,
    compare_balancers,
    row_from_instances,
    shard_metrics,
)
from .shard_map import ShardMap, shard_map

__all__ = [
    "REORDERED",
    "BalancerComparison",
    "BatchRow",
    "ShardMap",
    "ShardMetrics",
    "compare_balancers",
    "row_from_instances",
    "shard_map",
    "shard_metrics",
]
