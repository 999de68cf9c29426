"""CP attention by collectives: llama3 (all-gathered K/V) and Ulysses (all-to-all over heads).

Both gather what a rank needs and then run ordinary varlen attention; gradients flow back
through the collectives' explicit backward passes (reduce to owners, reverse all-to-all).
"""

from __future__ import annotations

from typing import Any

import torch

from .comm import all_gather_with_grad, all_to_all_with_grad, group_rank_size
from .reference import check_cu, check_max_len, check_qkv, varlen_attention

__all__ = ["llama3_attention", "ulysses_attention"]


def _check_llama3(q, k, v, cu_q, cu_k, max_q, max_k, local_k_slice, size):
    check_qkv(q, k, v, "llama3")
    if not isinstance(local_k_slice, slice) or local_k_slice.step not in (None, 1):
        raise ValueError(f"local_k_slice must be a slice with step 1, got {local_k_slice!r}")
    start, stop = local_k_slice.start or 0, local_k_slice.stop
    total = q.shape[0] * size
    if stop is None or not 0 <= start <= stop <= total:
        raise ValueError(
            f"local_k_slice {local_k_slice!r} is not inside the {total} gathered keys "
            f"({size} ranks x {q.shape[0]})"
        )
    cu_q = check_cu(cu_q, q.shape[0], "cu_doc_lens_q")
    cu_k = check_cu(
        cu_k, stop - start, "cu_doc_lens_k", f"the length of local_k_slice {local_k_slice!r}"
    )
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_doc_lens_q has {len(cu_q) - 1} documents but cu_doc_lens_k has {len(cu_k) - 1}"
        )
    short = (cu_k.diff() < cu_q.diff()).nonzero().flatten()
    if len(short):
        j = int(short[0])
        raise ValueError(
            f"document {j} has {int(cu_q[j + 1] - cu_q[j])} queries but only "
            f"{int(cu_k[j + 1] - cu_k[j])} keys; causal llama3 attention needs at least as many keys"
        )
    check_max_len(max_q, cu_q, "max_doc_len_q")
    check_max_len(max_k, cu_k, "max_doc_len_k")
    return cu_q, cu_k, slice(start, stop)


def llama3_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_doc_lens_q: torch.Tensor,
    cu_doc_lens_k: torch.Tensor,
    max_doc_len_q: int | None,
    max_doc_len_k: int | None,
    local_k_slice: slice,
    *,
    softmax_scale: float | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Llama3 CP attention over contiguous shards; returns this rank's output ``[T_local, H, D]``.

    As ring-flash-attn's ``llama3_flash_attn_varlen_func``: K/V of all ranks are all-gathered,
    ``k = gathered[local_k_slice]``, and the local queries attend with ``cu_doc_lens_q`` /
    ``cu_doc_lens_k``, causal, bottom-right aligned (the first local document may have started
    on an earlier rank, so it has more keys than queries). The metadata is the llama3
    balancer's. The gradients of the gathered K/V are summed over ranks and returned to owners.
    """
    _, size = group_rank_size(group)
    cu_q, cu_k, k_slice = _check_llama3(
        q, k, v, cu_doc_lens_q, cu_doc_lens_k, max_doc_len_q, max_doc_len_k, local_k_slice, size
    )
    kv = all_gather_with_grad(torch.stack([k, v], dim=1), group)[k_slice]
    out, _ = varlen_attention(
        q, kv[:, 0], kv[:, 1], cu_q, cu_k, causal=True, softmax_scale=softmax_scale
    )
    return out


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_doc_lens: torch.Tensor,
    max_doc_len: int | None = None,
    *,
    softmax_scale: float | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Ulysses CP attention; returns this rank's output ``[T_local, H, D]``.

    An all-to-all turns the sequence shards ``[T_local, H, D]`` into head shards
    ``[W * T_local, H / W, D]``; attention runs over the whole sequence with the global
    ``cu_doc_lens`` (the ulysses balancer's metadata); a second all-to-all turns the result
    back into sequence shards. ``H`` must be divisible by the group size.
    """
    _, size = group_rank_size(group)
    check_qkv(q, k, v, "ulysses")
    if q.shape[1] % size:
        raise ValueError(
            f"ulysses attention needs heads ({q.shape[1]}) divisible by the CP group size ({size})"
        )
    cu = check_cu(
        cu_doc_lens, q.shape[0] * size, "cu_doc_lens", f"{size} ranks x {q.shape[0]} local tokens"
    )
    check_max_len(max_doc_len, cu, "max_doc_len")
    # heads are dim 2 of the stacked [3, T, H, D]; the sequence comes back along dim 1
    qkv = all_to_all_with_grad(torch.stack([q, k, v]), scatter_dim=2, gather_dim=1, group=group)
    out, _ = varlen_attention(qkv[0], qkv[1], qkv[2], cu, causal=True, softmax_scale=softmax_scale)
    return all_to_all_with_grad(out, scatter_dim=0, gather_dim=1, group=group)
