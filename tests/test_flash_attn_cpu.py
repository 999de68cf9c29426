"""The flash-attn CPU stand-in itself: flash-attn 2.x semantics, checked against cp-data's reference.

The stand-in is test code; these tests pin the semantics the multi-process tests rely on
(bottom-right causal alignment, +inf log-sum-exp for queries without keys, GQA, a backward
that uses the ``out`` and ``lse`` it is given and writes dq/dk/dv in place).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flash_attn_cpu
from cp_data.attention import varlen_attention

fwd, bwd = flash_attn_cpu._flash_attn_varlen_forward, flash_attn_cpu._flash_attn_varlen_backward


def cu32(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_causal_masks_align_bottom_right_as_flash_attn_documents():
    # flash-attn's docstring: seqlen_q=2, seqlen_k=5 -> [[1 1 1 1 0], [1 1 1 1 1]];
    # seqlen_q=5, seqlen_k=2 -> [[0 0], [0 0], [0 0], [1 0], [1 1]]
    for lq, lk, seen in ((2, 5, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), (5, 2, [[0, 0]] * 3 + [[1, 0], [1, 1]])):
        q = torch.zeros(lq, 1, lk, dtype=torch.float64)  # equal scores: uniform over the seen keys
        v = torch.eye(lk, dtype=torch.float64)[:, None, :]  # key j's value is the unit vector e_j
        out, lse, _, _ = fwd(q, v, v, cu32([lq]), cu32([lk]), lq, lk, 0.0, 1.0, True)
        seen = torch.tensor(seen, dtype=torch.float64)
        want = seen / seen.sum(1, keepdim=True).clamp(min=1)
        assert torch.equal(out[:, 0], want)
        counts = seen.sum(1)
        want_lse = torch.where(counts > 0, counts.log(), torch.tensor(math.inf, dtype=torch.float64))
        assert torch.equal(lse[0], want_lse.float())  # +inf where a query sees nothing
    assert lse.dtype == torch.float32


@settings(max_examples=15)  # each example loops over documents in Python
@given(
    st.lists(st.tuples(st.integers(1, 7), st.integers(0, 4)), min_size=1, max_size=5),
    st.sampled_from([(4, 4), (4, 2), (4, 1)]),
    st.booleans(),
    st.integers(0, 999),
)
def test_forward_and_backward_equal_the_reference(docs, heads, causal, seed):
    lens_q = [lq for lq, _ in docs]
    lens_k = [lq + extra for lq, extra in docs]  # llama3-like: documents with more keys
    heads_q, heads_kv = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), heads_q, 8, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, sum(lens_k), heads_kv, 8, generator=gen, dtype=torch.float64)
    dout = torch.randn_like(q)
    cu_q, cu_k = cu32(lens_q), cu32(lens_k)
    out, lse, _, _ = fwd(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, 0.3, causal)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want, want_lse = varlen_attention(*leaves, cu_q, cu_k, causal=causal, softmax_scale=0.3)
    want_grads = torch.autograd.grad(want, leaves, dout)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-6, rtol=0)  # float32, as flash-attn
    # into views of larger buffers, as ring-flash-attn passes them
    buffers = [torch.full((x.shape[0] + 3, *x.shape[1:]), 7.0, dtype=x.dtype) for x in (q, k, v)]
    dq, dk, dv = (b[: x.shape[0]] for b, x in zip(buffers, (q, k, v)))
    bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max(lens_q), max(lens_k),
        0.0, 0.3, causal, -1, -1, 0.0, None, False)
    for got, w in zip((dq, dk, dv), want_grads):
        torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-6)  # probabilities from float32 lse
    assert all(bool((b[-3:] == 7.0).all()) for b in buffers)  # nothing written past the views


def test_backward_uses_the_lse_it_is_given():
    """ring-flash-attn hands every block the merged lse: probabilities must come from it."""
    cu = cu32([6])
    q, k, v = torch.randn(3, 6, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, lse, _, _ = fwd(q, k, v, cu, cu, 6, 6, 0.0, 0.5, True)
    grads = []
    for given_lse in (lse, lse + math.log(2.0)):  # twice the normaliser: half the probabilities
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bwd(torch.ones_like(q), q, k, v, out, given_lse, dq, dk, dv, cu, cu, 6, 6,
            0.0, 0.5, True, -1, -1, 0.0, None, False)
        grads.append(dv)
    torch.testing.assert_close(grads[1], grads[0] / 2, atol=0, rtol=1e-6)  # lse is float32


def test_refuses_what_flash_attn_refuses():
    cu = cu32([4])
    x = torch.zeros(4, 2, 8)
    with pytest.raises(RuntimeError, match="only supports fp16 and bf16"):
        fwd(x, x, x, cu, cu, 4, 4, 0.0, 1.0, True)
    x = x.bfloat16()
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        fwd(x, x, x, cu.long(), cu, 4, 4, 0.0, 1.0, True)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        fwd(x, x, x, cu, cu, 4, 4, 0.1, 1.0, True)
