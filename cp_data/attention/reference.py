"""Single-process causal document-masked (varlen) attention, the ground truth for CP attention.

Layout as in flash-attn's varlen functions: packed ``q`` of shape ``[T, H, D]`` and ``k, v`` of
shape ``[T, H_kv, D]`` without a batch dimension (grouped-query attention when ``H_kv`` divides
``H``: query head ``h`` uses key/value head ``h // (H / H_kv)``, as flash-attn and transformers'
``repeat_kv``), documents delimited by ``cu_seqlens``; the log-sum-exp comes back as ``[H, T]``.
Everything here is plain torch, vectorised over documents with a mask built from document ids,
and differentiable by autograd. float64 is computed in float64; float32, bfloat16 and float16 in
float32 (outputs return in the input dtype, the log-sum-exp stays in the compute dtype).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "compute_dtype",
    "masked_attention",
    "masked_attention_backward",
    "repeat_kv",
    "varlen_attention",
    "varlen_mask",
]


FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str | None = None) -> None:
    """``q`` is ``[Tq, H, D]``; ``k`` and ``v`` are ``[Tk, H_kv, D]`` with ``H_kv`` dividing ``H``.

    A CP ``scheme`` (named in the message) shards q, k and v alike, so it needs ``Tq == Tk``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [tokens, heads, head_dim] tensor, got {shape}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float64, float32, bfloat16 or float16, got {x.dtype}")
    if k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % max(k.shape[1], 1):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree on head_dim, "
            "k and v on tokens and heads, and the k/v heads must divide the q heads"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if scheme is not None and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"{scheme} attention needs q and k with the same tokens, got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[T, H_kv, D]`` -> ``[T, heads, D]``: each key/value head serves ``heads / H_kv`` query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def sum_kv_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The inverse of :func:`repeat_kv` for gradients: sum each group of query heads."""
    tokens, heads, dim = grad.shape
    return grad if heads == kv_heads else grad.view(tokens, kv_heads, heads // kv_heads, dim).sum(2)


def check_cu(
    cu: torch.Tensor, length: int, name: str, what: str = "the tokens of q"
) -> torch.Tensor:
    """Validate cumulative lengths that must end at ``length`` (``what``); return them as int64."""
    if not isinstance(cu, torch.Tensor) or cu.ndim != 1 or not len(cu):
        shape = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got {shape}")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {cu.dtype}")
    values = cu.detach().cpu().long()
    if values[0] != 0 or bool((values.diff() < 0).any()):
        raise ValueError(
            f"{name} must start at 0 and be non-decreasing, got {values[:12].tolist()}"
        )
    if values[-1] != length:
        raise ValueError(f"{name} ends at {int(values[-1])} but must end at {length} ({what})")
    return values


def check_max_len(max_len: int | None, cu: torch.Tensor, name: str) -> None:
    """flash-attn needs ``max_seqlen`` at least the longest document; ``None`` skips the check."""
    if max_len is None:
        return
    longest = int(cu.diff().max()) if len(cu) > 1 else 0
    if int(max_len) < longest:
        raise ValueError(f"{name}={max_len} is smaller than the longest document ({longest})")


def doc_offsets(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its document id, and its offset from the end of its document (always < 0)."""
    lengths = cu.diff()
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    from_end = torch.arange(int(cu[-1])) - cu[1:][doc]
    return doc, from_end


def varlen_mask(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool = True
) -> torch.Tensor:
    """bool ``[Tq, Tk]``: which keys each query sees, as flash-attn's varlen kernels decide.

    Query ``i`` of document ``j`` sees the keys of document ``j``; when causal, only those at most
    as far from the end of the document as the query is (bottom-right alignment: with
    ``len_q == len_k`` this is plain causal masking).
    """
    doc_q, end_q = doc_offsets(cu_seqlens_q)
    doc_k, end_k = doc_offsets(cu_seqlens_k)
    mask = doc_q[:, None] == doc_k[None, :]
    if causal:
        mask &= end_k[None, :] <= end_q[:, None]
    return mask


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked scaled scores ``[H, Tq, Tk]`` (-inf where masked); ``k`` has all ``H`` heads."""
    return torch.einsum("qhd,khd->hqk", q, k).mul(scale).masked_fill(~mask.to(q.device), -math.inf)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under a boolean ``[Tq, Tk]`` mask: ``(out [Tq, H, D], lse [H, Tq])``.

    ``k, v`` may have fewer heads (grouped-query attention). A query that sees no key gets output
    0 and log-sum-exp -inf, never NaN. Runs in the dtype it is given.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = _scores(q, k, mask, scale)
    # The row maximum only stabilises exp(); softmax does not depend on it, so no gradient.
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = row_max.masked_fill(~torch.isfinite(row_max), 0.0)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / denom.masked_fill(denom == 0, 1.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def masked_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one key block's share of attention, given the final ``out`` and ``lse``.

    This is flash attention's backward: with the final log-sum-exp the probabilities of any key
    block are exact, so ``dq`` summed over blocks and ``dk``/``dv`` of each block are the full
    gradients. ``dk``/``dv`` have the heads of ``k``/``v``.
    """
    kv_heads = k.shape[1]
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    finite_lse = lse.masked_fill(~torch.isfinite(lse), math.inf)  # unseen rows: all probs 0
    probs = torch.exp(_scores(q, k, mask, scale) - finite_lse[..., None])
    dv = torch.einsum("hqk,qhd->khd", probs, dout)
    dprobs = torch.einsum("qhd,khd->hqk", dout, v)
    delta = (dout * out).sum(-1).transpose(0, 1)  # [H, Tq]
    dscores = probs * (dprobs - delta[..., None]) * scale
    dq = torch.einsum("hqk,khd->qhd", dscores, k)
    dk = torch.einsum("hqk,qhd->khd", dscores, q)
    return dq, sum_kv_groups(dk, kv_heads), sum_kv_groups(dv, kv_heads)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-masked attention over packed tokens: ``(out [Tq, H, D], lse [H, Tq])``.

    The semantics of ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...,
    causal=causal)``: document ``j`` is ``q[cu_q[j]:cu_q[j+1]]`` against
    ``k[cu_k[j]:cu_k[j+1]]``; with ``causal`` the mask is aligned to the bottom right when the q
    and k documents differ in length. ``cu_seqlens_k`` defaults to ``cu_seqlens_q``;
    ``softmax_scale`` to ``head_dim ** -0.5``.
    """
    check_qkv(q, k, v)
    cu_q = check_cu(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    cu_k = (
        cu_q
        if cu_seqlens_k is None
        else check_cu(cu_seqlens_k, k.shape[0], "cu_seqlens_k", "the tokens of k")
    )
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q has {len(cu_q) - 1} documents but cu_seqlens_k has {len(cu_k) - 1}"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    compute = compute_dtype(q.dtype)
    out, lse = masked_attention(
        q.to(compute), k.to(compute), v.to(compute), varlen_mask(cu_q, cu_k, causal=causal), scale
    )
    return out.to(q.dtype), lse
