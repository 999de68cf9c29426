"""Single-process tests of the reference attention and of the CP entry points on one rank."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from hypothesis import given
from hypothesis import strategies as st

from cp_data import RingAttentionLoadBalancerType
from cp_data.attention import cp_attention, llama3_attention, varlen_attention, varlen_mask
from cp_data.attention.launch import free_port, run_gloo
from cp_data.attention.reference import masked_attention, masked_attention_backward
from cp_data.attention.ring import step_mask, zig_zag_step_masks
from hypothesis_profiles import few_examples

H, D = 3, 4


def qkv(total_q: int, total_k: int | None = None, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    total_k = total_q if total_k is None else total_k
    shapes = [(total_q, H, D), (total_k, H, D), (total_k, H, D)]
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)
        for s in shapes
    ]


def cumulative(lengths) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))


def per_document_attention(q, k, v, lens_q, lens_k):
    """The obvious reference: one bottom-right-aligned causal attention per document."""
    outs, lses = [], []
    cq, ck = cumulative(lens_q), cumulative(lens_k)
    for j, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qd, kd, vd = (
            x.transpose(0, 1)
            for x in (q[cq[j] : cq[j + 1]], k[ck[j] : ck[j + 1]], v[ck[j] : ck[j + 1]])
        )
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        scores = (qd @ kd.transpose(1, 2)) * D**-0.5
        scores = scores.masked_fill(~allowed, -torch.inf)
        lses.append(torch.logsumexp(scores, -1))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, dim=1)


doc_lengths = st.lists(st.integers(1, 9), min_size=1, max_size=8)


@few_examples  # each example runs many small torch ops
@given(doc_lengths, st.integers(0, 10_000))
def test_varlen_attention_equals_per_document_attention(lengths, seed):
    cu = cumulative(lengths)
    q, k, v = qkv(int(cu[-1]), seed=seed, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cu)
    want_out, want_lse = per_document_attention(q, k, v, lengths, lengths)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(want_out, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@few_examples  # each example runs many small torch ops
@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=6),
    st.integers(0, 99),
)
def test_bottom_right_alignment_when_documents_have_more_keys(docs, seed):
    lens_q = [lq for lq, _ in docs]
    lens_k = [lq + extra for lq, extra in docs]
    q, k, v = qkv(sum(lens_q), sum(lens_k), seed=seed)
    out, lse = varlen_attention(q, k, v, cumulative(lens_q), cumulative(lens_k))
    want_out, want_lse = per_document_attention(q, k, v, lens_q, lens_k)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)


@few_examples  # each example runs many small torch ops
@given(doc_lengths, st.sampled_from([(4, 1), (4, 2), (6, 3), (6, 2)]), st.integers(0, 999))
def test_grouped_query_attention_equals_attention_with_repeated_kv_heads(lengths, heads, seed):
    """Query head h uses key/value head h // (H / H_kv), as flash-attn and transformers' repeat_kv."""
    heads_q, heads_kv = heads
    cu = cumulative(lengths)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(int(cu[-1]), heads_q, D, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, int(cu[-1]), heads_kv, D, generator=gen, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = varlen_attention(q, k, v, cu)
    owner = torch.arange(heads_q) // (heads_q // heads_kv)
    want_out, want_lse = per_document_attention(q, k[:, owner], v[:, owner], lengths, lengths)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    for g, w in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want_out, (q, k, v), grad)
    ):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    cu = torch.tensor([0, 5, 9])
    q, k, v = (x.to(dtype).requires_grad_() for x in qkv(9, seed=4))
    out, lse = varlen_attention(q, k, v, cu)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = varlen_attention(*(x.detach().float() for x in (q, k, v)), cu)
    assert torch.equal(out, want.to(dtype)) and torch.equal(lse, want_lse)
    out.sum().backward()
    assert q.grad.dtype == dtype and bool(torch.isfinite(k.grad).all())


def test_mask_matches_flash_attn_documented_example():
    # flash-attn's docstring: seqlen_q = 2, seqlen_k = 5, causal -> [[1 1 1 1 0], [1 1 1 1 1]]
    mask = varlen_mask(torch.tensor([0, 2]), torch.tensor([0, 5]))
    assert mask.int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # two documents of lengths 2 and 1: block diagonal, causal inside each
    mask = varlen_mask(torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3]))
    assert mask.int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert varlen_mask(torch.tensor([0, 2]), torch.tensor([0, 2]), causal=False).all()


def test_empty_documents_and_queries_without_keys_give_zero_not_nan():
    cu_q, cu_k = torch.tensor([0, 0, 3, 3, 5]), torch.tensor([0, 0, 3, 3, 4])
    q, k, v = qkv(5, 4, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k)
    # the last document has 2 queries but 1 key: its first query sees nothing
    assert out[3].abs().max() == 0 and torch.isneginf(lse[:, 3]).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@given(
    st.integers(1, 12), st.integers(2, 12), st.integers(1, 4), st.sampled_from([1, H]), st.integers(0, 999)
)
def test_blockwise_backward_with_final_lse_equals_autograd(tq, tk, blocks, kv_heads, seed):
    q, k, v = qkv(tq, tk, seed=seed)
    q, k, v = (x.requires_grad_() for x in (q, k[:, :kv_heads].clone(), v[:, :kv_heads].clone()))
    mask = torch.rand(tq, tk, generator=torch.Generator().manual_seed(seed)) < 0.6
    out, lse = masked_attention(q, k, v, mask, 0.5)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for part in torch.arange(tk).tensor_split(blocks):
        dq_b, dk_b, dv_b = masked_attention_backward(
            dout,
            q.detach(),
            k.detach()[part],
            v.detach()[part],
            out.detach(),
            lse,
            mask[:, part],
            0.5,
        )
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
    for got, w in zip((dq, torch.cat(dks), torch.cat(dvs)), want):
        torch.testing.assert_close(got, w, atol=1e-12, rtol=0)


@few_examples  # each example runs many small torch ops
@given(st.lists(st.integers(1, 15), min_size=1, max_size=8), st.integers(1, 4), st.integers(0, 99))
def test_llama3_metadata_semantics_without_processes(lengths, world, seed):
    """Each rank's queries against gathered[local_k_slice] with cu_q/cu_k give its rows of full attention."""
    total = sum(lengths)
    padded = -(-total // world) * world
    cu = cumulative(lengths + ([padded - total] if padded > total else []))
    q, k, v = qkv(padded, seed=seed)
    want, _ = varlen_attention(q, k, v, cu)
    local = padded // world
    for rank in range(world):
        bal = RingAttentionLoadBalancerType.llama3.create(cp_rank=rank, cp_world_size=world)
        _, meta = bal.batch_shard_by_document(inputs=[q], seq_dims=[0], cu_doc_lens=cu)
        rows = slice(rank * local, (rank + 1) * local)
        ks = meta["local_k_slice"]
        got, _ = varlen_attention(
            q[rows], k[ks], v[ks], meta["cu_doc_lens_q"], meta["cu_doc_lens_k"]
        )
        torch.testing.assert_close(got, want[rows], atol=1e-12, rtol=0)


def test_zig_zag_ring_masks_spec_example():
    # SPEC: W=2, N=12, cu=[0, 8, 12]: r0 holds [0, 1, 6, 7, 8, 11], local cu = [0, 4, 6]
    masks = zig_zag_step_masks(torch.tensor([0, 4, 6]))
    # rank 0 at step 1 holds rank 1's block [2, 3, 4, 5, 9, 10]: only token 6, 7 (back half of
    # document 0) and 11 (back half of document 1) see it, and see all of their document's part
    assert masks["later"].int().tolist() == [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1],
    ]


@few_examples
@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(1, 4))
def test_zig_zag_ring_masks_equal_global_causal_document_mask(chunks, world):
    """For every rank r and sender s, the ring's step mask is the full mask between their tokens."""
    lengths = [2 * world * c for c in chunks]  # no balancer padding: every token has a position
    cu = cumulative(lengths)
    full = varlen_mask(cu, cu)
    plans = RingAttentionLoadBalancerType.zig_zag.create(
        cp_rank=0, cp_world_size=world
    ).plan_all_ranks(int(cu[-1]), cu)
    for rank in range(world):
        masks = zig_zag_step_masks(plans[rank].metadata["cu_doc_lens"])
        for sender in range(world):
            got = step_mask(masks, (rank - sender) % world, rank)
            assert torch.equal(got, full[plans[rank].index][:, plans[sender].index])


@pytest.fixture(scope="module")
def single_rank_group():
    """A gloo world of one process: the CP functions run, with nothing to wait for."""
    assert not dist.is_initialized(), "a test left a process group initialised in this process"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["zig_zag", "llama3", "ulysses"])
def test_single_rank_cp_attention_equals_reference(single_rank_group, kind):
    lengths = [4, 2, 6, 2]  # even: zig_zag with W=1 pads documents to multiples of 2
    cu = cumulative(lengths)
    q, k, v = qkv(int(cu[-1]), seed=3, requires_grad=True)
    balancer = RingAttentionLoadBalancerType(kind).create(cp_rank=0, cp_world_size=1)
    (qs, ks, vs), meta = balancer.batch_shard_by_document(
        inputs=[q, k, v], seq_dims=[0] * 3, cu_doc_lens=cu, pad_values=[0.0] * 3
    )
    out = cp_attention(qs, ks, vs, meta, load_balancer=balancer, group=dist.group.WORLD)
    assert torch.equal(qs, q)  # one rank, even documents: the shard is the whole row
    want, _ = varlen_attention(q, k, v, cu)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    got_grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want_grads = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["zig_zag", "llama3", "ulysses"])
def test_single_rank_cp_attention_returns_lse_for_gqa_bfloat16(single_rank_group, kind):
    cu = cumulative([4, 2, 6, 2])
    q, k, v = (x.bfloat16() for x in qkv(14, seed=5))
    k, v = k[:, :1], v[:, :1]  # one key/value head for all H query heads
    meta = (
        RingAttentionLoadBalancerType(kind)
        .create(cp_rank=0, cp_world_size=1)
        .batch_shard_by_document(inputs=[], seq_dims=[], cu_doc_lens=cu)[1]
    )
    out, lse = cp_attention(
        q, k, v, meta, load_balancer=kind, group=dist.group.WORLD, return_lse=True
    )
    want, want_lse = varlen_attention(q, k, v, cu)
    assert out.dtype == torch.bfloat16 and lse.shape == (H, 14)
    torch.testing.assert_close(out.float(), want.float(), atol=8e-3, rtol=0)  # bf16 rounding
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=0)


LLAMA3_OK = dict(
    cu_doc_lens_q=torch.tensor([0, 2, 6]),
    cu_doc_lens_k=torch.tensor([0, 2, 6]),
    max_doc_len_q=4,
    max_doc_len_k=4,
    local_k_slice=slice(0, 6),
)


@pytest.mark.parametrize(
    "kind, metadata, message",
    [
        (
            "zig_zag",
            dict(cu_doc_lens=torch.tensor([0, 4]), max_doc_len=4),
            "cu_doc_lens ends at 4 but must end at 6",
        ),
        ("zig_zag", dict(cu_doc_lens=torch.tensor([0, 4, 2, 6]), max_doc_len=4), "non-decreasing"),
        (
            "zig_zag",
            dict(cu_doc_lens=torch.tensor([0, 2, 6]), max_doc_len=3),
            "max_doc_len=3 is smaller",
        ),
        ("zig_zag", dict(cu_doc_lens=torch.tensor([0.0, 6.0]), max_doc_len=6), "integer dtype"),
        ("zig_zag", dict(cu_doc_lens=torch.tensor([0, 6])), "needs batch metadata ['max_doc_len']"),
        (
            "ulysses",
            dict(cu_doc_lens=torch.tensor([0, 7]), max_doc_len=7),
            "1 ranks x 6 local tokens",
        ),
        (
            "llama3",
            {**LLAMA3_OK, "cu_doc_lens_q": torch.tensor([0, 2, 5])},
            "cu_doc_lens_q ends at 5",
        ),
        ("llama3", {**LLAMA3_OK, "local_k_slice": slice(0, 7)}, "not inside the 6 gathered keys"),
        ("llama3", {**LLAMA3_OK, "local_k_slice": slice(1, 6)}, "must end at 5"),
        ("llama3", {**LLAMA3_OK, "cu_doc_lens_k": torch.tensor([0, 6])}, "has 2 documents but"),
        (
            "llama3",
            {**LLAMA3_OK, "cu_doc_lens_q": torch.tensor([0, 3, 6]), "max_doc_len_q": 3},
            "document 0 has 3 queries but only 2 keys",
        ),
        ("llama3", {**LLAMA3_OK, "local_k_slice": (0, 6)}, "must be a slice"),
        ("ring", {}, "unknown load balancer 'ring'"),
    ],
)
def test_bad_metadata_raises_value_error_on_one_rank(single_rank_group, kind, metadata, message):
    q, k, v = qkv(6)
    with pytest.raises(ValueError) as err:
        cp_attention(q, k, v, metadata, load_balancer=kind, group=dist.group.WORLD)
    assert message in str(err.value)


def test_bad_tensors_and_balancer_raise_value_error(single_rank_group):
    q, k, v = qkv(6)
    meta = dict(cu_doc_lens=torch.tensor([0, 6]), max_doc_len=6)
    world = dist.group.WORLD
    with pytest.raises(ValueError, match="zig_zag ring attention needs q and k with the same tokens"):
        cp_attention(q, k[:4], v[:4], meta, load_balancer="zig_zag", group=world)
    with pytest.raises(ValueError, match=r"q must be a \[tokens, heads, head_dim\] tensor"):
        cp_attention(q[None], k, v, meta, load_balancer="ulysses", group=world)
    with pytest.raises(ValueError, match="must be float64, float32, bfloat16 or float16, got torch.int64"):
        cp_attention(q.long(), k.long(), v.long(), meta, load_balancer="ulysses", group=world)
    with pytest.raises(ValueError, match="the k/v heads must divide the q heads"):
        cp_attention(q, k[:, :2], v[:, :2], meta, load_balancer="zig_zag", group=world)
    wrong = RingAttentionLoadBalancerType.zig_zag.create(cp_rank=1, cp_world_size=2)
    with pytest.raises(ValueError, match="rank 1 of 2 but this process is rank 0 of 1"):
        cp_attention(q, k, v, meta, load_balancer=wrong, group=world)
    with pytest.raises(ValueError, match="must end at 5"):
        llama3_attention(
            q, k, v, torch.tensor([0, 6]), torch.tensor([0, 6]), 6, 6, slice(1, 6), group=world
        )


def test_the_cp_group_is_required(single_rank_group):
    q, k, v = qkv(6)
    meta = dict(cu_doc_lens=torch.tensor([0, 6]), max_doc_len=6)
    with pytest.raises(ValueError, match="group is required: pass the context-parallel process group"):
        cp_attention(q, k, v, meta, load_balancer="zig_zag", group=None)
    with pytest.raises(TypeError, match="group"):
        cp_attention(q, k, v, meta, load_balancer="zig_zag")  # no silent default to the world
    with pytest.raises(ValueError, match="must be a ProcessGroup or a 1-D DeviceMesh, got 'cp'"):
        cp_attention(q, k, v, meta, load_balancer="zig_zag", group="cp")
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "cp"))
    with pytest.raises(ValueError, match="a 2-D DeviceMesh has no single CP group"):
        cp_attention(q, k, v, meta, load_balancer="zig_zag", group=mesh)
    out = cp_attention(q, k, v, meta, load_balancer="zig_zag", group=mesh["cp"])
    torch.testing.assert_close(out, varlen_attention(q, k, v, torch.tensor([0, 6]))[0])


def _fails_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise KeyError("boom on rank one")
    return rank


def _hangs_on_rank_zero(rank: int, world: int) -> int:
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        time.sleep(60)
    return rank


def test_run_gloo_reports_worker_errors_and_hangs():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_gloo(_fails_on_rank_one, 2, timeout=60)
    # The deadline counts from the start, so 1 s ends the run while the workers still start up.
    with pytest.raises(TimeoutError, match="did not finish in 1 s"):
        run_gloo(_hangs_on_rank_zero, 2, timeout=1)
