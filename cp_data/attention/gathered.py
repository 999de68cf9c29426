"""CP attention by collectives: llama3 (all-gathered K/V) and Ulysses (all-to-all over heads).

Both gather what a rank needs and then run ordinary varlen attention; gradients flow back
through the collectives' explicit backward passes (reduce to owners, reverse all-to-all).
"""

from __future__ import annotations

from typing import Any

import torch

from .comm import all_gather_with_grad, all_to_all, all_to_all_with_grad, resolve_group
from .reference import check_cu, check_max_len, check_qkv, repeat_kv, varlen_attention

__all__ = ["llama3_attention", "ulysses_attention"]


def check_llama3(q, k, v, cu_q, cu_k, max_q, max_k, local_k_slice, rank, size):
    """Validate llama3 metadata against this rank's shard; return int64 ``cu_q, cu_k`` and the slice.

    Causal llama3 metadata ends rank r's key slice at ``(r + 1) * T_local``, so a batch sharded
    for another rank or another group size is caught here.
    """
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
    if stop != (rank + 1) * q.shape[0]:
        raise ValueError(
            f"local_k_slice {local_k_slice!r} ends at {stop}, but rank {rank} of {size} with "
            f"{q.shape[0]} local tokens ends at {(rank + 1) * q.shape[0]}: the batch was sharded "
            "for another rank or CP group size"
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
    group: Any,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Llama3 CP attention over contiguous shards; returns this rank's output ``[T_local, H, D]``.

    As ring-flash-attn's ``llama3_flash_attn_varlen_func``: K/V of all ranks are all-gathered,
    ``k = gathered[local_k_slice]``, and the local queries attend with ``cu_doc_lens_q`` /
    ``cu_doc_lens_k``, causal, bottom-right aligned (the first local document may have started
    on an earlier rank, so it has more keys than queries). The metadata is the llama3
    balancer's; ``group`` the CP process group (or 1-D DeviceMesh). The gradients of the
    gathered K/V are summed over ranks and returned to owners. ``k, v`` may have fewer heads;
    with ``return_lse`` also the log-sum-exp ``[H, T_local]`` (no gradient).
    """
    group, rank, size = resolve_group(group)
    cu_q, cu_k, k_slice = check_llama3(
        q, k, v, cu_doc_lens_q, cu_doc_lens_k, max_doc_len_q, max_doc_len_k, local_k_slice,
        rank, size,
    )
    kv = all_gather_with_grad(torch.stack([k, v], dim=1), group)[k_slice]
    out, lse = varlen_attention(
        q, kv[:, 0], kv[:, 1], cu_q, cu_k, causal=True, softmax_scale=softmax_scale
    )
    return (out, lse.detach()) if return_lse else out


def check_ulysses(q, k, v, cu_doc_lens, max_doc_len, size):
    """Validate a Ulysses shard and its (global) metadata; return ``cu_doc_lens`` as int64."""
    check_qkv(q, k, v, "ulysses")
    if q.shape[1] % size:
        raise ValueError(
            f"ulysses attention needs heads ({q.shape[1]}) divisible by the CP group size ({size})"
        )
    cu = check_cu(
        cu_doc_lens, q.shape[0] * size, "cu_doc_lens", f"{size} ranks x {q.shape[0]} local tokens"
    )
    check_max_len(max_doc_len, cu, "max_doc_len")
    return cu


def heads_to_ranks(q, k, v, group, size):
    """All-to-all: sequence shards -> the whole sequence for ``H / W`` heads, ``[W * T, H / W, D]``.

    Rank r gets query heads ``[r H/W, (r+1) H/W)`` and the key/value heads they use; k and v are
    repeated up to ``H`` heads first when their heads do not split evenly over the ranks.
    """
    if k.shape[1] % size:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    q = all_to_all_with_grad(q, scatter_dim=1, gather_dim=0, group=group)
    kv = all_to_all_with_grad(torch.stack([k, v]), scatter_dim=2, gather_dim=1, group=group)
    return q, kv[0], kv[1]


def sequence_to_ranks(out: torch.Tensor, group) -> torch.Tensor:
    """The inverse all-to-all: ``[W * T, H / W, D]`` head shards -> ``[T, H, D]`` sequence shards."""
    return all_to_all_with_grad(out, scatter_dim=0, gather_dim=1, group=group)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_doc_lens: torch.Tensor,
    max_doc_len: int | None = None,
    *,
    group: Any,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ulysses CP attention; returns this rank's output ``[T_local, H, D]``.

    An all-to-all turns the sequence shards ``[T_local, H, D]`` into head shards
    ``[W * T_local, H / W, D]``; attention runs over the whole sequence with the global
    ``cu_doc_lens`` (the ulysses balancer's metadata); a second all-to-all turns the result
    back into sequence shards. ``H`` must be divisible by the size of ``group`` (the CP process
    group or 1-D DeviceMesh). With ``return_lse`` also the log-sum-exp ``[H, T_local]``.
    """
    group, _, size = resolve_group(group)
    cu = check_ulysses(q, k, v, cu_doc_lens, max_doc_len, size)
    q_h, k_h, v_h = heads_to_ranks(q, k, v, group, size)
    out, lse = varlen_attention(q_h, k_h, v_h, cu, causal=True, softmax_scale=softmax_scale)
    out = sequence_to_ranks(out, group)
    if not return_lse:
        return out
    return out, all_to_all(lse.detach().T.contiguous(), 0, 1, group).T
