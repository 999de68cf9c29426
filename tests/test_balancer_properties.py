"""Property tests: the balancers against straightforward per-document, per-rank references."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_data import RingAttentionLoadBalancerType, ShardPlan, llama3_cu_seqlens, unshard
from hypothesis_profiles import many_examples

KINDS = [k.value for k in RingAttentionLoadBalancerType]


# --- references: Python loops over documents and ranks, written from the SPEC text ----------


def ref_zig_zag(cu, W, r, multiple=None, by_document=True):
    """Source positions (-1 = padding) and local cu of zig_zag rank r."""
    docs = list(zip(cu[:-1], cu[1:])) if by_document else [(0, cu[-1])]
    index, local_cu = [], [0]
    for start, end in docs:
        doc = list(range(start, end))
        step = 2 * W if by_document else (multiple or 2 * W)
        doc += [-1] * ((-len(doc)) % step)
        c = len(doc) // (2 * W)
        index += doc[r * c : (r + 1) * c] + doc[(2 * W - 1 - r) * c : (2 * W - r) * c]
        local_cu.append(local_cu[-1] + 2 * c)
    if by_document and multiple is not None:
        extra = (-len(index)) % multiple
        index += [-1] * extra
        local_cu.append(local_cu[-1] + extra)
    return index, local_cu


def ref_contiguous(n, W, r, multiple):
    padded = list(range(n)) + [-1] * ((-n) % multiple)
    size = len(padded) // W
    return padded[r * size : (r + 1) * size]


def ref_llama3_prepare(cu_seqlens, rank, world_size):
    """ring-flash-attn's llama3_flash_attn_prepare_cu_seqlens(causal=True), line by line."""
    total_length = cu_seqlens[-1].item()
    length_per_rank = total_length // world_size
    left = torch.searchsorted(cu_seqlens, rank * length_per_rank)
    right = torch.searchsorted(cu_seqlens, (rank + 1) * length_per_rank)
    if cu_seqlens[left] != rank * length_per_rank:
        left -= 1
    left, right = int(left), int(right)
    cu_q = cu_seqlens[left : right + 1].clone()
    cu_q -= rank * length_per_rank
    cu_q[0] = 0
    cu_q[-1] = length_per_rank
    cu_k = cu_seqlens[left : right + 1].clone()
    slice_right = (rank + 1) * length_per_rank
    cu_k[-1] = slice_right
    slice_left = cu_seqlens[left].item()
    cu_k -= slice_left
    return dict(
        cu_doc_lens_q=cu_q,
        cu_doc_lens_k=cu_k,
        max_doc_len_q=(cu_q[1:] - cu_q[:-1]).max().item(),
        max_doc_len_k=(cu_k[1:] - cu_k[:-1]).max().item(),
        local_k_slice=slice(slice_left, slice_right),
    )


def expected_tensor(x, dim, index, pad):
    """Gather by a Python loop over positions (independent of index_select)."""
    pieces = [x.select(dim, i) if i >= 0 else torch.full_like(x.select(dim, 0), pad) for i in index]
    if not pieces:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_empty(shape)
    return torch.stack(pieces, dim=dim)


# --- strategies -----------------------------------------------------------------------------


@st.composite
def cases(draw):
    W = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(0, 40), min_size=1, max_size=12))
    if sum(lengths) == 0:
        lengths.append(draw(st.integers(1, 9)))
    cu = [0] + np.cumsum(lengths).tolist()
    ndim = draw(st.integers(1, 3))
    seq_dim = draw(st.integers(0, ndim - 1))
    use_negative = draw(st.booleans())
    multiple_factor = draw(st.none() | st.integers(1, 4))
    return dict(
        W=W,
        cu=cu,
        ndim=ndim,
        seq_dim=seq_dim - ndim if use_negative else seq_dim,
        multiple_factor=multiple_factor,
        cu_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        pad=draw(st.integers(-9, -1)),
    )


def make_input(n, ndim, seq_dim):
    """A tensor whose values encode their position, with the sequence on ``seq_dim``."""
    shape = [2] * ndim
    shape[seq_dim] = n
    return torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape) * 7 + 100


def shard_all_ranks(kind, W, **kwargs):
    bal = RingAttentionLoadBalancerType.parse(kind).create(cp_rank=0, cp_world_size=W)
    return [bal.for_rank(r).batch_shard_by_document(**kwargs) for r in range(W)]


# --- properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@many_examples
@given(case=cases())
def test_by_document_matches_reference_and_unshards(kind, case):
    W, cu, seq_dim = case["W"], case["cu"], case["seq_dim"]
    n = cu[-1]
    x = make_input(n, case["ndim"], seq_dim % case["ndim"])
    y = x.float() / 3  # a second input, other dtype, same plan
    multiple = None if case["multiple_factor"] is None else case["multiple_factor"] * (W if kind == "ulysses" else 1)
    cu_t = torch.tensor(cu, dtype=case["cu_dtype"])
    results = shard_all_ranks(
        kind, W, inputs=[x, y], seq_dims=[seq_dim, seq_dim], cu_doc_lens=cu_t,
        pad_values=[case["pad"], 0.5], length_multiple=multiple,
    )
    dim = seq_dim % case["ndim"]
    local_lens = {out[0].shape[dim] for out, _ in results}
    assert len(local_lens) == 1, "every rank holds the same number of positions"
    for r, ((sx, sy), meta) in enumerate(results):
        if kind == "zig_zag":
            index, local_cu = ref_zig_zag(cu, W, r, multiple)
            assert meta["cu_doc_lens"].tolist() == local_cu
            assert meta["max_doc_len"] == max(np.diff(local_cu), default=0)
            padded_global = [0] + np.cumsum([-(-l // (2 * W)) * 2 * W for l in np.diff(cu)]).tolist()
            assert meta["cu_doc_lens"][: len(cu)].tolist() == [c // W for c in padded_global]
        else:
            step = W * (multiple or 1) if kind == "llama3" else (multiple or W)
            index = ref_contiguous(n, W, r, step)
            padded_cu = cu + ([cu[-1] + (-n) % step] if n % step else [])
            if kind == "ulysses":
                assert meta["cu_doc_lens"].tolist() == padded_cu
                assert meta["max_doc_len"] == max(np.diff(padded_cu))
            else:
                expected = ref_llama3_prepare(torch.tensor(padded_cu, dtype=case["cu_dtype"]), r, W)
                assert meta.keys() == expected.keys()
                for key in expected:
                    if isinstance(expected[key], torch.Tensor):
                        assert torch.equal(meta[key], expected[key]), key
                    else:
                        assert meta[key] == expected[key], key
        for value in meta.values():
            if isinstance(value, torch.Tensor):
                assert value.dtype == case["cu_dtype"]
        assert torch.equal(sx, expected_tensor(x, dim, index, case["pad"]))
        assert torch.equal(sy, expected_tensor(y, dim, index, 0.5))
    plans = RingAttentionLoadBalancerType.parse(kind).create(cp_rank=0, cp_world_size=W).plan_all_ranks(
        n, cu_t, length_multiple=multiple
    )
    assert torch.equal(unshard([out[0] for out, _ in results], plans, seq_dim), x)
    assert torch.equal(unshard([out[1] for out, _ in results], plans, seq_dim), y)


@pytest.mark.parametrize("kind", ["zig_zag", "ulysses"])
@many_examples
@given(case=cases())
def test_batch_shard_matches_reference_and_unshards(kind, case):
    W, n, seq_dim = case["W"], case["cu"][-1], case["seq_dim"]
    base = 2 * W if kind == "zig_zag" else W
    multiple = None if case["multiple_factor"] is None else case["multiple_factor"] * base
    x = make_input(n, case["ndim"], seq_dim % case["ndim"])
    bal = RingAttentionLoadBalancerType.parse(kind).create(cp_rank=0, cp_world_size=W)
    shards = [
        bal.for_rank(r).batch_shard(inputs=[x], seq_dims=[seq_dim], pad_values=[case["pad"]], length_multiple=multiple)[0]
        for r in range(W)
    ]
    for r, shard in enumerate(shards):
        if kind == "zig_zag":
            index, _ = ref_zig_zag([0, n], W, r, multiple, by_document=False)
        else:
            index = ref_contiguous(n, W, r, multiple or W)
        assert torch.equal(shard, expected_tensor(x, seq_dim % case["ndim"], index, case["pad"]))
    assert torch.equal(unshard(shards, bal.plan_all_ranks(n, length_multiple=multiple), seq_dim), x)


@many_examples
@given(case=cases())
def test_every_token_lands_once_and_documents_stay_in_order(case):
    """Across ranks the real positions form a permutation; within a rank, documents keep order."""
    W, cu = case["W"], case["cu"]
    doc_of = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    for kind in KINDS:
        plans = RingAttentionLoadBalancerType.parse(kind).create(cp_rank=0, cp_world_size=W).plan_all_ranks(
            cu[-1], torch.tensor(cu)
        )
        real = [p.index[p.index >= 0].numpy() for p in plans]
        assert sorted(np.concatenate(real).tolist()) == list(range(cu[-1]))
        for positions in real:
            assert (np.diff(doc_of[positions]) >= 0).all()


@many_examples
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=10),
    W=st.integers(1, 8),
    dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_llama3_metadata_matches_ring_flash_attn_definition(lengths, W, dtype):
    total = -(-max(sum(lengths), 1) // W) * W
    cu = [0] + np.cumsum(lengths).tolist()
    if cu[-1] != total:
        cu.append(total)
    cu_t = torch.tensor(cu, dtype=dtype)
    for r in range(W):
        got, expected = llama3_cu_seqlens(cu_t, r, W), ref_llama3_prepare(cu_t, r, W)
        for key in expected:
            value = got[key]
            assert torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]


def shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["llama3", "ulysses"])
@many_examples
@given(case=cases(), by_document=st.booleans())
def test_contiguous_shards_are_views_exactly_where_they_hold_no_padding(kind, case, by_document):
    """A llama3/ulysses shard is a view of the input where that is possible, else a copy; values
    always equal the gather path, the result is contiguous, and the input is never modified."""
    W, cu, seq_dim, pad = case["W"], case["cu"], case["seq_dim"], case["pad"]
    n, dim = cu[-1], seq_dim % case["ndim"]
    by_document = by_document or kind == "llama3"  # llama3 has no batch_shard
    multiple = None if case["multiple_factor"] is None else case["multiple_factor"] * (W if kind == "ulysses" else 1)
    x = make_input(n, case["ndim"], dim)
    original = x.clone()
    cu_t = torch.tensor(cu, dtype=case["cu_dtype"]) if by_document else None
    bal = RingAttentionLoadBalancerType.parse(kind).create(cp_rank=0, cp_world_size=W)
    for r in range(W):
        rank = bal.for_rank(r)
        kwargs = dict(inputs=[x], seq_dims=[seq_dim], pad_values=[pad], length_multiple=multiple)
        out = rank.batch_shard_by_document(cu_doc_lens=cu_t, **kwargs)[0][0] if by_document else rank.batch_shard(**kwargs)[0]
        plan = rank.plan(n, cu_t, length_multiple=multiple)
        assert torch.equal(out, ShardPlan.from_index(plan.index, n, r, W).shard(x, seq_dim, pad))
        assert out.is_contiguous()
        # A slice of a contiguous tensor is contiguous when every dim before it has size 1 or the
        # slice is the whole dim.
        local = out.shape[dim]
        slice_is_contiguous = int(np.prod(x.shape[:dim])) == 1 or local == n
        if local:
            assert shares_memory(out, x) == (plan.num_padding == 0 and slice_is_contiguous)
        copied = plan.shard(x, seq_dim, pad, copy=True)
        assert torch.equal(copied, out) and (not local or not shares_memory(copied, x))
    assert torch.equal(x, original)


@many_examples
@given(case=cases())
def test_sharding_never_modifies_inputs(case):
    W, cu, seq_dim = case["W"], case["cu"], case["seq_dim"]
    x = make_input(cu[-1], case["ndim"], seq_dim % case["ndim"])
    cu_t = torch.tensor(cu, dtype=case["cu_dtype"])
    x_before, cu_before = x.clone(), cu_t.clone()
    for kind in KINDS:
        shard_all_ranks(kind, W, inputs=[x], seq_dims=[seq_dim], cu_doc_lens=cu_t, pad_values=[case["pad"]])
        assert torch.equal(x, x_before) and torch.equal(cu_t, cu_before), kind
