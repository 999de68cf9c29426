"""A CPU stand-in for flash-attn 2.x's varlen kernels, for tests only.

ring-flash-attn's ring logic is plain torch + torch.distributed; only
``flash_attn.flash_attn_interface._flash_attn_varlen_forward`` and ``_flash_attn_varlen_backward``
need CUDA. :func:`install` puts a ``flash_attn`` package holding these two kernels (plus the public
``flash_attn_varlen_func`` built on them) into ``sys.modules``, so the unmodified ring-flash-attn
package — and cp-data's GPU code path — run on CPU over gloo.

flash-attn 2.x semantics reproduced here, with an obvious per-document loop (not cp-data's code):

- packed ``q [total_q, H, D]``, ``k, v [total_k, H_kv, D]`` (``H_kv`` divides ``H``; query head h
  uses key/value head ``h // (H / H_kv)``), int32 ``cu_seqlens_q / cu_seqlens_k``;
- causal masks aligned to the bottom right: query i of a document with ``lq`` queries and ``lk``
  keys sees keys ``j <= i + lk - lq``; a query that sees no key gets output 0 and log-sum-exp +inf;
- the forward returns ``(out, softmax_lse [H, total_q], S_dmask, rng_state)``;
- the backward recomputes the probabilities from the ``out`` and ``softmax_lse`` it is given and
  writes ``dq, dk, dv`` in place (dk, dv summed over the query heads of each key/value head).

Dtypes: bfloat16 and float16 are computed in float32, as flash-attn. float32 is refused as
flash-attn refuses it (ring-flash-attn's zigzag backward also aliases its gradient buffers for
float32 inputs and returns wrong gradients). float64 — which flash-attn does not take — is
computed in float64, so tests compare at tighter tolerances than bf16 allows. The log-sum-exp is
float32 whatever the input, as flash-attn's (ring-flash-attn merges its blocks in float32).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch

VERSION = "2.7.4.post1+cpu-stand-in"


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **unsupported):
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float64):
        raise RuntimeError(
            f"FlashAttention only supports fp16 and bf16 data type (stand-in: and float64), got {q.dtype}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError("query, key and value must have the same dtype")
    if q.shape[1] % k.shape[1] or k.shape != v.shape:
        raise RuntimeError(f"bad GQA shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, cu, total, longest in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        if cu.dtype != torch.int32:
            raise RuntimeError(f"{name} must have dtype int32, got {cu.dtype}")
        if int(cu[-1]) > total:
            raise RuntimeError(f"{name} ends at {int(cu[-1])} beyond {total} tokens")
        if len(cu) > 1 and int(cu.diff().max()) > longest:
            raise RuntimeError(f"{name}: a sequence is longer than max_seqlen {longest}")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k hold different batch sizes")
    defaults = dict(
        dropout_p=0.0, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None
    )
    for name, value in unsupported.items():
        if value != defaults[name]:
            raise NotImplementedError(f"the CPU stand-in does not implement {name}={value!r}")


def _documents(cu_seqlens_q, cu_seqlens_k, causal, device):
    """Per document: query rows, key rows, and the bool mask ``[lq, lk]`` of what each query sees."""
    for j in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[j]), int(cu_seqlens_q[j + 1])
        k0, k1 = int(cu_seqlens_k[j]), int(cu_seqlens_k[j + 1])
        lq, lk = q1 - q0, k1 - k0
        seen = torch.ones(lq, lk, dtype=torch.bool, device=device)
        if causal:
            seen = seen.tril(diagonal=lk - lq)  # bottom-right: the last query sees every key
        yield slice(q0, q1), slice(k0, k1), seen


def _probs(q, k, scale, seen, lse=None):
    """Probabilities ``[H, lq, lk]`` and log-sum-exp ``[H, lq]`` (+inf where a query sees nothing)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~seen, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    return torch.exp(scores - lse[..., None]), lse


def _flash_attn_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
):
    _check(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=dropout_p, window_size_left=window_size_left,
        window_size_right=window_size_right, softcap=softcap, alibi_slopes=alibi_slopes,
    )
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    for rows, keys, seen in _documents(cu_seqlens_q, cu_seqlens_k, causal, q.device):
        probs, lse[:, rows] = _probs(q[rows].to(compute), k[keys].to(compute), softmax_scale, seen)
        values = v[keys].to(compute).repeat_interleave(group, dim=1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, values)
    empty = torch.empty(0, dtype=q.dtype, device=q.device)
    return out.to(q.dtype), lse, empty, torch.empty(2, dtype=torch.int64, device=q.device)


def _flash_attn_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    _check(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=dropout_p, window_size_left=window_size_left,
        window_size_right=window_size_right, softcap=softcap, alibi_slopes=alibi_slopes,
    )
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, heads_kv = q.shape[1], k.shape[1]
    group = heads // heads_kv
    grad_q = torch.zeros(q.shape, dtype=compute, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=compute, device=q.device)
    grad_v = torch.zeros(v.shape, dtype=compute, device=q.device)
    # delta_i = dout_i . out_i: the softmax backward's row term, from the given out
    delta = (dout.to(compute) * out.to(compute)).sum(-1).T  # [H, total_q]
    for rows, keys, seen in _documents(cu_seqlens_q, cu_seqlens_k, causal, q.device):
        q_d, k_d, do_d = q[rows].to(compute), k[keys].to(compute), dout[rows].to(compute)
        v_d = v[keys].to(compute).repeat_interleave(group, dim=1)
        probs, _ = _probs(q_d, k_d, softmax_scale, seen, softmax_lse[:, rows].to(compute))
        dprobs = torch.einsum("qhd,khd->hqk", do_d, v_d)
        dscores = probs * (dprobs - delta[:, rows, None]) * softmax_scale
        grad_q[rows] = torch.einsum("hqk,khd->qhd", dscores, k_d.repeat_interleave(group, dim=1))
        per_head_k = torch.einsum("hqk,qhd->khd", dscores, q_d)
        per_head_v = torch.einsum("hqk,qhd->khd", probs, do_d)
        grad_k[keys] = per_head_k.unflatten(1, (heads_kv, group)).sum(2)
        grad_v[keys] = per_head_v.unflatten(1, (heads_kv, group)).sum(2)
    dq.copy_(grad_q)
    dk.copy_(grad_k)
    dv.copy_(grad_v)
    return delta


class _FlashAttnVarlenFunc(torch.autograd.Function):
    """flash-attn's public varlen function over the two kernels (no dropout, no window)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        out, lse, _, _ = _flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale, causal
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, softmax_scale, causal)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, softmax_scale, causal = ctx.args
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(
            dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
            0.0, softmax_scale, causal, -1, -1, 0.0, None, False,
        )
        return dq, dk, dv, None, None, None, None, None, None


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    if dropout_p or window_size != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("the CPU stand-in has no dropout, window, softcap, alibi or probs")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _FlashAttnVarlenFunc.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal
    )


def install() -> None:
    """Make ``import flash_attn`` and ``flash_attn.flash_attn_interface`` find this stand-in."""
    current = sys.modules.get("flash_attn")
    if current is not None:
        if getattr(current, "__version__", "") == VERSION:
            return
        raise RuntimeError("a real flash_attn is already imported; the stand-in is for CPU tests")
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface.__spec__ = importlib.machinery.ModuleSpec(interface.__name__, None)
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    package.__path__ = []
    package.__version__ = VERSION
    for module in (interface, package):
        module._flash_attn_varlen_forward = _flash_attn_varlen_forward
        module._flash_attn_varlen_backward = _flash_attn_varlen_backward
        module.flash_attn_varlen_func = flash_attn_varlen_func
    package.flash_attn_interface = interface
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = interface


def uninstall() -> None:
    """Remove the stand-in from ``sys.modules`` (modules that imported its functions keep them)."""
    if getattr(sys.modules.get("flash_attn"), "__version__", "") == VERSION:
        del sys.modules["flash_attn"], sys.modules["flash_attn.flash_attn_interface"]
