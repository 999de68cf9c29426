"""Zig-zag ring attention over document-sharded batches (ring-flash-attn's zigzag varlen scheme).

Every rank holds chunks ``r`` and ``2W-1-r`` of every document, so the local ``cu_doc_lens``
(the zig_zag balancer's metadata) are the same on all ranks and each local document is the front
half (chunk ``r``) followed by the back half (chunk ``2W-1-r``). K/V blocks travel around the
ring for W steps; at step ``i`` a rank holds the block of rank ``s = (r - i) mod W`` and, per
document:

- step 0 (its own block): causal attention inside each local document;
- ``s < r``: both of its halves come after the sender's front half (chunk ``s``) and before the
  sender's back half, so every query sees the sender's front half;
- ``s > r``: only its back half (chunk ``2W-1-r``) comes after both of the sender's chunks, and
  sees all of them; its front half sees nothing.

Partial results merge by log-sum-exp. The backward pass sends each block around the ring again,
together with the dK/dV accumulated for it, so after W hops the block's owner holds its gradient.

Halves are split at ``(start + end) // 2`` of each local document, as ring-flash-attn's
``get_half_index``. Every balancer document has an even local length; only the final padding
document that an odd ``length_multiple`` adds can be odd. It holds padding only, so real tokens
are unaffected here, but ring-flash-attn's ``half_cu_seqlens = cu_seqlens // 2`` then no longer
matches its half index: use an even ``length_multiple`` with the GPU kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from .comm import RingExchange, resolve_group
from .reference import (
    check_cu,
    check_max_len,
    check_qkv,
    compute_dtype,
    doc_offsets,
    masked_attention,
    masked_attention_backward,
)

__all__ = ["zig_zag_ring_attention"]


def zig_zag_step_masks(cu_doc_lens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three bool ``[T, T]`` masks of the ring: own block, earlier sender, later sender."""
    doc, _ = doc_offsets(cu_doc_lens)
    index = torch.arange(len(doc))
    # the front half of a local document is its first chunk (ring-flash-attn's half_index0)
    front = index < ((cu_doc_lens[:-1] + cu_doc_lens[1:]) // 2)[doc]
    same_doc = doc[:, None] == doc[None, :]
    return {
        "own": same_doc & (index[None, :] <= index[:, None]),
        "earlier": same_doc & front[None, :],
        "later": same_doc & ~front[:, None],
    }


def step_mask(masks: dict[str, torch.Tensor], step: int, rank: int) -> torch.Tensor:
    """The mask of ring step ``step`` on rank ``rank`` (it holds the block of rank ``rank - step``)."""
    if step == 0:
        return masks["own"]
    return masks["earlier"] if step <= rank else masks["later"]


def _merge(out, lse, block_out, block_lse):
    """Combine two normalised partial attentions by their log-sum-exps (lse is [H, T])."""
    new_lse = torch.logaddexp(lse, block_lse)
    old_w = torch.exp(lse - new_lse).transpose(0, 1)[..., None]
    new_w = torch.exp(block_lse - new_lse).transpose(0, 1)[..., None]
    return out * old_w + block_out * new_w, new_lse


class _ZigZagRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, scale, group, rank, size):
        masks = zig_zag_step_masks(cu)
        ring = RingExchange(group)
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(size):
            if step + 1 < size:
                ring.start(kv)  # the next block travels while this one is used
            mask = step_mask(masks, step, rank)
            block_out, block_lse = masked_attention(q, kv[0], kv[1], mask, scale)
            # step 0 includes every query's own key, so lse is finite from then on
            out, lse = (
                (block_out, block_lse) if out is None else _merge(out, lse, block_out, block_lse)
            )
            if step + 1 < size:
                kv = ring.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks, ctx.scale, ctx.group, ctx.rank, ctx.size = masks, scale, group, rank, size
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring = RingExchange(ctx.group)
        dq = torch.zeros_like(q)
        # [k, v, dk, dv] of the block in hand; the gradients ride along with their block
        block = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])
        for step in range(ctx.size):
            mask = step_mask(ctx.masks, step, ctx.rank)
            dq_b, dk_b, dv_b = masked_attention_backward(
                dout, q, block[0], block[1], out, lse, mask, ctx.scale
            )
            dq += dq_b
            block[2] += dk_b
            block[3] += dv_b
            if ctx.size > 1:  # W hops bring every block (and its gradient) home
                ring.start(block)
                block = ring.wait()
        return dq, block[2], block[3], None, None, None, None, None


def zig_zag_ring_attention(
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
    """Causal document-masked ring attention over zig-zag shards; returns this rank's output.

    ``q``: ``[T_local, H, D]`` and ``k, v``: ``[T_local, H_kv, D]`` (this rank's zig-zag shard;
    ``H_kv`` dividing ``H``); ``cu_doc_lens`` and ``max_doc_len``: the zig_zag balancer's metadata;
    ``group``: the CP process group (or 1-D DeviceMesh). With ``return_lse`` also the
    log-sum-exp ``[H, T_local]`` (no gradient). Inputs are validated before any communication,
    so bad metadata raises ``ValueError`` instead of hanging the group.
    """
    check_qkv(q, k, v, "zig_zag ring")
    cu = check_cu(cu_doc_lens, q.shape[0], "cu_doc_lens")
    check_max_len(max_doc_len, cu, "max_doc_len")
    group, rank, size = resolve_group(group)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    compute = compute_dtype(q.dtype)
    out, lse = _ZigZagRing.apply(
        q.to(compute), k.to(compute), v.to(compute), cu, scale, group, rank, size
    )
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
