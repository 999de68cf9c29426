"""CPU reference context-parallel attention (zig_zag ring, llama3, ulysses) on torch.distributed.

The GPU kernels (ring-flash-attn, Ulysses all-to-all) cannot run here; these implementations
consume the same shards and metadata the same way, so their equality with single-process
document-masked attention proves the balancers' output right. Every CP function takes the CP
process group explicitly (``group=``); grouped-query attention, half precision inputs (computed
in float32) and the log-sum-exp output are supported.
"""

from .api import METADATA_KEYS, cp_attention
from .gathered import llama3_attention, ulysses_attention
from .reference import varlen_attention, varlen_mask
from .ring import zig_zag_ring_attention
from .verify import verify_metadata

__all__ = [
    "METADATA_KEYS",
    "cp_attention",
    "llama3_attention",
    "ulysses_attention",
    "varlen_attention",
    "varlen_mask",
    "verify_metadata",
    "zig_zag_ring_attention",
]
