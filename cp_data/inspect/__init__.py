"""See the shards: per-rank metrics, balancer comparisons, shard maps and plots."""

from .metrics import (
    REORDERED,
    BalancerComparison,
    BatchRow,
    ShardMap,
    ShardMetrics,
    compare_balancers,
    row_from_instances,
    shard_map,
    shard_metrics,
)

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
