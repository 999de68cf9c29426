"""cp-data: context-parallel training data, ready in the DataLoader.

The package follows the data flow: ``balancers`` -> ``packing`` -> ``datasets`` -> ``collate``
-> ``loader``, with ``attention`` (CPU reference CP attention) and ``inspect`` (metrics, plots)
on top. Names from modules that need the optional ``hf`` extra (datasets, torchdata) or
``torch.distributed`` are imported on first use, so ``import cp_data`` stays light.
"""

from importlib import import_module
from typing import Any

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
from .collate import ContextParallelCollator
from .packing import PackingConfig, PackingPlan, best_fit_decreasing, plan_packing

__version__ = "0.1.0"

_LAZY = {
    "PackedDataset": "cp_data.datasets",
    "PackedIterableDataset": "cp_data.datasets",
    "load_default_corpus": "cp_data.datasets",
    "load_text_files": "cp_data.datasets",
    "packed_dataset_from_files": "cp_data.datasets",
    "tokenize_dataset": "cp_data.datasets",
    "ContextParallelLoaderConfig": "cp_data.loader",
    "DataParallelSampler": "cp_data.loader",
    "cp_attention": "cp_data.attention",
    "varlen_attention": "cp_data.attention",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cp_data' has no attribute {name!r}")


__all__ = [
    "PAD",
    "ContextParallelCollator",
    "PackingConfig",
    "PackingPlan",
    "RingAttentionLlama3LoadBalancer",
    "RingAttentionLoadBalancer",
    "RingAttentionLoadBalancerType",
    "RingAttentionZigZagLoadBalancer",
    "RingContextParallelStyle",
    "ShardPlan",
    "ShardingError",
    "UlyssesContextParallelStyle",
    "UlyssesLoadBalancer",
    "best_fit_decreasing",
    "llama3_cu_seqlens",
    "plan_packing",
    "unshard",
    *_LAZY,
]
