"""cp-data: context-parallel training data, ready in the DataLoader.

The package follows the data flow: ``balancers`` -> ``packing`` -> ``datasets`` -> ``collate``
-> ``loader``, with ``attention`` (CPU reference CP attention), ``integrations`` (transformers,
ring-flash-attn) and ``inspect`` (metrics, plots) on top. Names from modules that need the
optional ``hf`` extra (datasets, torchdata) or ``torch.distributed`` are imported on first use, so
``import cp_data`` stays light.
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
    causal_pairs,
    llama3_balanced_order,
    llama3_cu_seqlens,
    llama3_rank_work,
    unshard,
)
from .collate import ContextParallelCollator
from .packing import PackingConfig, PackingPlan, best_fit_decreasing, plan_packing

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        [
            "ByteTokenizer",
            "PackedDataset",
            "PackedIterableDataset",
            "get_tokenizer",
            "load_default_corpus",
            "load_stream_state",
            "load_text_files",
            "packed_dataset_from_files",
            "stream_state",
            "tokenize_dataset",
            "train_bpe",
        ],
        "cp_data.datasets",
    ),
    "open_token_files": "cp_data.sources",
    **dict.fromkeys(
        [
            "ContextParallelLoader",
            "ContextParallelLoaderConfig",
            "DataParallelSampler",
            "IndexedDataset",
            "dp_cp_coordinates",
            "verify_dp_cp_batch",
            "verify_loader_state",
        ],
        "cp_data.loader",
    ),
    **dict.fromkeys(["RowWork", "WorkModel", "row_work"], "cp_data.work"),
    **dict.fromkeys(
        [
            "cp_attention",
            "llama3_attention",
            "ulysses_attention",
            "varlen_attention",
            "zig_zag_ring_attention",
        ],
        "cp_data.attention",
    ),
    **dict.fromkeys(
        ["cp_loss", "flash_cp_attention", "model_inputs", "register_cp_attention", "sum_gradients"],
        "cp_data.integrations",
    ),
    **dict.fromkeys(
        ["BalancerComparison", "ShardMap", "ShardMetrics", "compare_balancers", "shard_map", "shard_metrics"],
        "cp_data.inspect",
    ),
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
    "causal_pairs",
    "llama3_balanced_order",
    "llama3_cu_seqlens",
    "llama3_rank_work",
    "plan_packing",
    "unshard",
    *_LAZY,
]
