"""The GPU path: cp-data batches through ring-flash-attn and flash-attn's varlen kernels.

- zig_zag: ``ring_flash_attn.zigzag_ring_flash_attn_varlen_func`` with the batch's
  ``cu_doc_lens`` / ``max_doc_len``;
- llama3: ``ring_flash_attn.llama3_flash_attn_varlen_func`` with ``cu_doc_lens_q/k``,
  ``max_doc_len_q/k``, ``local_k_slice`` and ``heads_k_stride`` (how many key/value heads each
  all-gather carries; default all of them);
- ulysses: an all-to-all to head shards, ``flash_attn.flash_attn_varlen_func`` over the whole
  sequence with the global ``cu_doc_lens``, and the all-to-all back.

ring-flash-attn and flash-attn are optional (``pip install cp-data[gpu]``) and imported on first
use. ring-flash-attn 0.1.8's package ``__init__`` also imports its Hugging Face adapter, which
fails with transformers >= 5 (it imports a name transformers 5 removed) and without transformers
at all; :func:`ring_flash_attn_functions` therefore imports the two varlen modules without running
that ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import cache
from types import SimpleNamespace
from typing import Any, Mapping

import torch

from ..attention.api import balancer_kind, scheme_metadata
from ..attention.comm import resolve_group
from ..attention.gathered import check_llama3, check_ulysses, heads_to_ranks, sequence_to_ranks
from ..attention.reference import check_cu, check_max_len, check_qkv
from ..attention.verify import verify_metadata
from ..balancers import RingAttentionLoadBalancer, RingAttentionLoadBalancerType

__all__ = ["flash_cp_attention", "ring_flash_attn_functions"]

_RING_MODULES = ("zigzag_ring_flash_attn_varlen", "llama3_flash_attn_varlen")


@cache
def ring_flash_attn_functions() -> SimpleNamespace:
    """``zigzag``, ``llama3`` (ring-flash-attn's varlen functions) and ``varlen`` (flash-attn's).

    Imports ring-flash-attn's kernel modules under a bare parent package, so its ``__init__``
    (and the Hugging Face adapter it imports) never runs; the bare parent is removed again, so a
    later ``import ring_flash_attn`` behaves as without cp-data.
    """
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(
            "the flash attention path needs flash-attn (CUDA) and ring-flash-attn: "
            "pip install 'cp-data[gpu]'"
        ) from err
    package = sys.modules.get("ring_flash_attn")
    if package is not None and hasattr(package, "zigzag_ring_flash_attn_varlen_func"):
        modules = [getattr(package, name) for name in _RING_MODULES]
    else:
        spec = importlib.util.find_spec("ring_flash_attn")
        if spec is None:
            raise ImportError("the flash attention path needs ring-flash-attn: pip install 'cp-data[gpu]'")
        sys.modules["ring_flash_attn"] = importlib.util.module_from_spec(spec)  # __init__ not run
        try:
            modules = [importlib.import_module(f"ring_flash_attn.{name}") for name in _RING_MODULES]
        finally:
            del sys.modules["ring_flash_attn"]
    zigzag, llama3 = modules
    return SimpleNamespace(
        zigzag=zigzag.zigzag_ring_flash_attn_varlen_func,
        llama3=llama3.llama3_flash_attn_varlen_func,
        varlen=flash_attn_varlen_func,
    )


def _int32(cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """flash-attn takes int32 cumulative lengths on the device of q."""
    return cu.to(device=device, dtype=torch.int32, non_blocking=True)


def _zig_zag(q, k, v, cu_doc_lens, max_doc_len, *, group, rank, size, scale):
    check_qkv(q, k, v, "zig_zag ring")
    cu = check_cu(cu_doc_lens, q.shape[0], "cu_doc_lens")
    check_max_len(max_doc_len, cu, "max_doc_len")
    lengths = cu.diff()
    odd = (lengths % 2).nonzero().flatten()
    if len(odd):
        j = int(odd[0])
        raise ValueError(
            f"local document {j} has odd length {int(lengths[j])}: ring-flash-attn's zigzag kernel "
            "halves cu_doc_lens, so give zig_zag an even length_multiple (or none)"
        )
    longest = int(lengths.max()) if max_doc_len is None else int(max_doc_len)
    return ring_flash_attn_functions().zigzag(
        q, k, v, _int32(cu_doc_lens, q.device), longest, softmax_scale=scale, causal=True,
        group=group,
    )


def _llama3(q, k, v, cu_q, cu_k, max_q, max_k, local_k_slice, *, group, rank, size, scale, stride):
    cu_q_, cu_k_, k_slice = check_llama3(q, k, v, cu_q, cu_k, max_q, max_k, local_k_slice, rank, size)
    stride = k.shape[1] if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or k.shape[1] % stride:
        raise ValueError(
            f"heads_k_stride must be a positive divisor of the {k.shape[1]} key/value heads, "
            f"got {stride!r}"
        )
    longest_q = int(cu_q_.diff().max()) if max_q is None else int(max_q)
    longest_k = int(cu_k_.diff().max()) if max_k is None else int(max_k)
    return ring_flash_attn_functions().llama3(
        q, k, v, _int32(cu_q, q.device), _int32(cu_k, q.device), longest_q, longest_k, stride,
        k_slice, softmax_scale=scale, causal=True, group=group,
    )


def _ulysses(q, k, v, cu_doc_lens, max_doc_len, *, group, rank, size, scale):
    cu = check_ulysses(q, k, v, cu_doc_lens, max_doc_len, size)
    longest = int(cu.diff().max()) if max_doc_len is None else int(max_doc_len)
    varlen = ring_flash_attn_functions().varlen
    q_h, k_h, v_h = heads_to_ranks(q, k, v, group, size)
    cu = _int32(cu_doc_lens, q.device)
    out = varlen(q_h, k_h, v_h, cu, cu, longest, longest, softmax_scale=scale, causal=True)
    return sequence_to_ranks(out, group)


_SCHEMES = {
    RingAttentionLoadBalancerType.zig_zag: _zig_zag,
    RingAttentionLoadBalancerType.llama3: _llama3,
    RingAttentionLoadBalancerType.ulysses: _ulysses,
}


def flash_cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_metadata: Mapping[str, Any],
    *,
    load_balancer: RingAttentionLoadBalancerType | str | RingAttentionLoadBalancer,
    group: Any,
    softmax_scale: float | None = None,
    heads_k_stride: int | None = None,
    verify: bool = False,
) -> torch.Tensor:
    """:func:`cp_data.attention.cp_attention` on flash-attn kernels (GPU); returns ``[T_local, H, D]``.

    Same arguments and checks: ``q [T_local, H, D]`` and ``k, v [T_local, H_kv, D]`` in
    bfloat16 or float16 (float32 raises: flash-attn rejects it, and ring-flash-attn's zigzag
    backward returns wrong gradients for it), the batch's metadata, the balancer, the required
    CP ``group``; ``heads_k_stride`` for llama3 only; ``verify`` cross-checks the metadata over
    the group first. Metadata tensors may live on the CPU or the GPU.
    """
    group, rank, size = resolve_group(group)
    kind = balancer_kind(load_balancer, rank, size)
    metadata = scheme_metadata(kind, batch_metadata)
    if isinstance(q, torch.Tensor) and q.dtype == torch.float32:
        raise ValueError(
            "flash attention takes bfloat16 or float16 q, k, v, got float32 (ring-flash-attn's "
            "zigzag backward also returns wrong gradients for float32); run the model in bf16 or "
            "under autocast"
        )
    if verify:
        tokens = q.shape[0] if isinstance(q, torch.Tensor) and q.ndim else 0
        verify_metadata(kind, metadata, tokens, group=group, rank=rank, size=size)
    llama3 = kind == RingAttentionLoadBalancerType.llama3
    if heads_k_stride is not None and not llama3:
        raise ValueError(f"heads_k_stride is a llama3 setting; {kind.value} takes none")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    extra = dict(stride=heads_k_stride) if llama3 else {}
    return _SCHEMES[kind](
        q, k, v, *metadata.values(), group=group, rank=rank, size=size, scale=scale, **extra
    )
