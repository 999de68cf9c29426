"""SPEC §1 worked examples, API shape and every error case of the balancers."""

import pickle

import pytest
import torch

import cp_data
from cp_data import (
    RingAttentionLlama3LoadBalancer,
    RingAttentionLoadBalancerType,
    RingAttentionZigZagLoadBalancer,
    RingContextParallelStyle,
    UlyssesContextParallelStyle,
    UlyssesLoadBalancer,
)

ZZ, L3, UL = RingAttentionZigZagLoadBalancer, RingAttentionLlama3LoadBalancer, UlyssesLoadBalancer


def row(n):
    return torch.arange(n).unsqueeze(0)


def by_doc(cls, W, r, n, cu, pad=None, **kw):
    pads = None if pad is None else [pad]
    (out,), meta = cls(cp_rank=r, cp_world_size=W).batch_shard_by_document(
        inputs=[row(n)], seq_dims=[1], cu_doc_lens=torch.tensor(cu), pad_values=pads, **kw
    )
    return out[0].tolist(), meta


# --- SPEC worked examples, verbatim -------------------------------------------------------


def test_zig_zag_batch_shard_examples():
    shard = lambda r, n, pads=None: ZZ(cp_rank=r, cp_world_size=4).batch_shard(
        inputs=[row(n)], seq_dims=[1], pad_values=pads
    )[0][0].tolist()
    assert shard(0, 8) == [0, 7]
    assert shard(3, 8) == [3, 4]
    assert shard(0, 6, [-1]) == [0, -1]
    assert shard(3, 6, [-1]) == [3, 4]


def test_zig_zag_by_document_examples():
    assert by_doc(ZZ, 2, 0, 12, [0, 8, 12])[0] == [0, 1, 6, 7, 8, 11]
    assert by_doc(ZZ, 2, 1, 12, [0, 8, 12])[0] == [2, 3, 4, 5, 9, 10]
    out, meta = by_doc(ZZ, 2, 0, 10, [0, 7, 10], pad=-1)
    assert out == [0, 1, 6, -1, 7, -1]
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6]
    assert meta["max_doc_len"] == 4


def test_ulysses_by_document_example():
    expected = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, -1, -1]]
    for r in range(4):
        out, meta = by_doc(UL, 4, r, 10, [0, 6, 10], pad=-1)
        assert out == expected[r]
        assert meta["cu_doc_lens"].tolist() == [0, 6, 10, 12]
        assert meta["max_doc_len"] == 6


def test_llama3_example():
    out, meta = by_doc(L3, 2, 0, 12, [0, 7, 10, 12])
    assert out == list(range(6))
    assert meta["cu_doc_lens_q"].tolist() == [0, 6]
    assert meta["cu_doc_lens_k"].tolist() == [0, 6]
    assert meta["local_k_slice"] == slice(0, 6)
    out, meta = by_doc(L3, 2, 1, 12, [0, 7, 10, 12])
    assert out == list(range(6, 12))
    assert meta["cu_doc_lens_q"].tolist() == [0, 1, 4, 6]
    assert meta["cu_doc_lens_k"].tolist() == [0, 7, 10, 12]
    assert (meta["max_doc_len_q"], meta["max_doc_len_k"]) == (3, 7)
    assert meta["local_k_slice"] == slice(0, 12)


# --- upstream behaviour and the defect we fix ----------------------------------------------


def test_llama3_pads_instead_of_losing_tokens():
    # Upstream computes the padding with the wrong sign; 11 tokens on 2 ranks must become 12.
    outs = [by_doc(L3, 2, r, 11, [0, 7, 11], pad=-1) for r in range(2)]
    assert outs[0][0] + outs[1][0] == list(range(11)) + [-1]
    assert outs[1][1]["cu_doc_lens_k"].tolist() == [0, 7, 11, 12]


def test_zig_zag_length_multiple_appends_a_document_even_when_empty():
    _, meta = by_doc(ZZ, 2, 0, 8, [0, 8], length_multiple=2)
    assert meta["cu_doc_lens"].tolist() == [0, 4, 4]
    out, meta = by_doc(ZZ, 2, 0, 8, [0, 8], pad=-1, length_multiple=3)
    assert out == [0, 1, 6, 7, -1, -1]
    assert meta["cu_doc_lens"].tolist() == [0, 4, 6]


def test_metadata_keeps_cu_dtype_and_python_ints():
    for cls in (ZZ, UL, L3):
        for dtype in (torch.int32, torch.int64):
            b = cls(cp_rank=1, cp_world_size=2)
            _, meta = b.batch_shard_by_document(
                inputs=[row(12)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 5, 12], dtype=dtype), pad_values=[0]
            )
            for key, value in meta.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == dtype, key
                elif key.startswith("max_doc_len"):
                    assert type(value) is int, key
                else:
                    assert type(value.start) is int and type(value.stop) is int


def test_inputs_and_cu_are_not_modified():
    for cls in (ZZ, UL, L3):
        x, cu = row(10), torch.tensor([0, 3, 10])
        x0, cu0 = x.clone(), cu.clone()
        _, meta = cls(cp_rank=0, cp_world_size=2).batch_shard_by_document(
            inputs=[x], seq_dims=[1], cu_doc_lens=cu, pad_values=[0]
        )
        assert torch.equal(x, x0) and torch.equal(cu, cu0)
        for value in meta.values():
            if isinstance(value, torch.Tensor):
                value.add_(1)  # metadata owns its memory
        assert torch.equal(cu, cu0)


def test_pad_method():
    x0 = torch.arange(10.0).reshape(2, 5)
    x, added = ZZ(cp_rank=0, cp_world_size=2).pad(x0, 1, 7)
    assert added == 3 and x.shape == (2, 8)
    assert torch.equal(x[:, :5], x0) and x[:, 5:].eq(7).all()
    x0 = torch.arange(18).reshape(6, 3)
    x, added = UL(cp_rank=0, cp_world_size=4).pad(x0, 0, -1, length_multiple=8)
    assert added == 2 and x.shape == (8, 3)
    assert torch.equal(x[:6], x0) and x[6:].eq(-1).all()
    x, added = UL(cp_rank=0, cp_world_size=4).pad(torch.arange(4), -1, 0)
    assert added == 0 and x.tolist() == [0, 1, 2, 3]
    for cls in (ZZ, UL):  # 0 is a bad multiple, not a request for the default
        with pytest.raises(ValueError, match="length_multiple must be >= 1, got 0"):
            cls(cp_rank=0, cp_world_size=2).pad(torch.ones(5), 0, 0, length_multiple=0)


def test_llama3_batch_shard_not_implemented():
    with pytest.raises(NotImplementedError):
        L3(cp_rank=0, cp_world_size=2).batch_shard(inputs=[row(4)], seq_dims=[1])


def test_enum_build_styles_and_exports():
    assert [m.value for m in RingAttentionLoadBalancerType] == ["zig_zag", "llama3", "ulysses"]
    assert RingAttentionLoadBalancerType("llama3") == "llama3"
    for name, cls in (("zig_zag", ZZ), ("llama3", L3), ("ulysses", UL)):
        b = RingAttentionLoadBalancerType.parse(name).create(cp_rank=1, cp_world_size=3)
        assert type(b) is cls and (b.cp_rank, b.cp_world_size) == (1, 3)
        assert pickle.loads(pickle.dumps(b)) == b
    assert RingContextParallelStyle().load_balancer == RingAttentionLoadBalancerType.zig_zag
    assert RingContextParallelStyle(load_balancer="llama3", head_stride=2).load_balancer is RingAttentionLoadBalancerType.llama3
    assert UlyssesContextParallelStyle().load_balancer == RingAttentionLoadBalancerType.ulysses
    for name in ("RingAttentionLoadBalancer", "RingContextParallelStyle", "UlyssesContextParallelStyle"):
        assert hasattr(cp_data, name)
    with pytest.raises(ValueError, match="ring"):
        RingAttentionLoadBalancerType.parse("ring")


def test_build_from_a_gloo_mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
        b = RingAttentionLoadBalancerType.zig_zag.build(mesh)
        assert type(b) is ZZ and (b.cp_rank, b.cp_world_size) == (0, 1)
        assert type(UlyssesContextParallelStyle().build(mesh)) is UL
    finally:
        dist.destroy_process_group()


# --- errors: ValueError (and RuntimeError), naming the value ----------------------------


def shard_doc(cls=ZZ, W=2, r=0, inputs=None, cu=None, **kw):
    inputs = [row(8)] if inputs is None else inputs
    cu = torch.tensor([0, 4, 8]) if cu is None else cu
    kw.setdefault("seq_dims", [1] * len(inputs))
    return cls(cp_rank=r, cp_world_size=W).batch_shard_by_document(inputs=inputs, cu_doc_lens=cu, **kw)


@pytest.mark.parametrize("cls", [ZZ, UL, L3])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cu=torch.tensor([[0, 4, 8]])), r"1-D.*\(1, 3\)"),
        (dict(cu=torch.tensor([1, 4, 8]), inputs=[row(8)]), r"start with 0.*\[1, 4, 8\]"),
        (dict(cu=torch.tensor([0, 6, 4, 8])), r"non-decreasing.*\[0, 6, 4, 8\]"),
        (dict(cu=torch.tensor([0, 4, 9])), r"ends at 9.*length 8"),
        (dict(cu=torch.tensor([0.0, 4.0, 8.0])), r"integer dtype.*float32"),
        (dict(inputs=[row(8), row(9)]), r"different sequence lengths \[8, 9\]"),
        (dict(pad_values=[0, 0]), r"1 inputs but 2 pad_values"),
        (dict(seq_dims=[1, 1]), r"1 inputs but 2 seq_dims"),
        (dict(seq_dims=[2]), r"seq_dims\[0\]=2 is out of range"),
        (dict(length_multiple=0), r"length_multiple must be >= 1, got 0"),
        (dict(cu=torch.tensor([0, 3, 8])), r"needs \d+ padding positions.*inputs\[0\] has no pad value"),
    ],
)
def test_by_document_errors(cls, kwargs, match):
    if cls is not ZZ and "cu" in kwargs and kwargs["cu"].tolist() == [0, 3, 8]:
        kwargs = dict(kwargs, cu=torch.tensor([0, 3, 9]), inputs=[row(9)])
    for exc in (ValueError, RuntimeError):
        with pytest.raises(exc, match=match):
            shard_doc(cls, **kwargs)


def test_cu_on_meta_device_is_rejected():
    with pytest.raises(ValueError, match="on CPU.*meta"):
        shard_doc(cu=torch.tensor([0, 4, 8], device="meta"))


@pytest.mark.parametrize(
    "cls, W, multiple, match",
    [(ZZ, 2, 6, r"\(6\) must be divisible by 2 x CP degree \(4\)"), (UL, 4, 6, r"\(6\) must be divisible by CP degree \(4\)")],
)
def test_length_multiple_divisibility(cls, W, multiple, match):
    b = cls(cp_rank=0, cp_world_size=W)
    with pytest.raises(ValueError, match=match):
        b.batch_shard(inputs=[row(24)], seq_dims=[1], length_multiple=multiple)
    if cls is UL:
        with pytest.raises(ValueError, match=match):
            shard_doc(UL, W=W, inputs=[row(24)], cu=torch.tensor([0, 24]), length_multiple=multiple)


def test_batch_shard_needs_pad_value():
    with pytest.raises(ValueError, match=r"length 6 needs 2 padding positions over 2 ranks, but inputs\[1\] has no pad value"):
        ZZ(cp_rank=0, cp_world_size=2).batch_shard(inputs=[row(6), row(6)], seq_dims=[1, 1], pad_values=[0, None])
    with pytest.raises(ValueError, match="different sequence lengths"):
        UL(cp_rank=0, cp_world_size=2).batch_shard(inputs=[row(6), row(8)], seq_dims=[1, 1])


@pytest.mark.parametrize("rank, size, match", [(2, 2, r"cp_rank must be in \[0, 2\), got 2"), (-1, 2, "got -1"), (0, 0, "cp_world_size must be >= 1, got 0")])
@pytest.mark.parametrize("cls", [ZZ, UL, L3])
def test_constructor_errors(cls, rank, size, match):
    with pytest.raises(ValueError, match=match):
        cls(cp_rank=rank, cp_world_size=size)


def test_zero_length_documents_are_allowed():
    out, meta = by_doc(ZZ, 2, 0, 8, [0, 0, 4, 4, 8, 8])
    assert out == [0, 3, 4, 7]
    assert meta["cu_doc_lens"].tolist() == [0, 0, 2, 2, 4, 4]
    out, meta = by_doc(L3, 2, 1, 8, [0, 4, 4, 8])
    assert out == [4, 5, 6, 7] and meta["cu_doc_lens_q"].tolist() == [0, 0, 4]


# --- plans and unshard ----------------------------------------------------------------------


def test_plan_index_from_index_and_unshard_checks():
    plans = ZZ(cp_rank=0, cp_world_size=2).plan_all_ranks(10, torch.tensor([0, 7, 10]))
    assert plans[0].index.tolist() == [0, 1, 6, -1, 7, -1]
    assert (plans[0].local_len, plans[0].num_padding, plans[0].group_padding) == (6, 2, 2)
    rebuilt = cp_data.ShardPlan.from_index(plans[0].index, 10, 0, 2, plans[0].metadata)
    assert torch.equal(rebuilt.gather_index, plans[0].gather_index)
    assert torch.equal(rebuilt.pad_positions, plans[0].pad_positions)
    x = torch.arange(10) * 3
    shards = [p.shard(x, 0, -1) for p in plans]
    assert torch.equal(cp_data.unshard(shards, plans, 0), x)
    with pytest.raises(ValueError, match="exactly once"):
        cp_data.unshard([shards[0], shards[0]], [plans[0], plans[0]], 0)
    with pytest.raises(ValueError, match="one shard per plan"):
        cp_data.unshard(shards[:1], plans, 0)
    with pytest.raises(ValueError, match="has size 5 on seq_dim 0"):
        plans[0].shard(torch.arange(5), 0, -1)


def test_metadata_keys_are_what_each_balancer_returns():
    for kind in RingAttentionLoadBalancerType:
        _, meta = kind.create(cp_rank=0, cp_world_size=2).batch_shard_by_document(
            inputs=[row(9)], seq_dims=[1], cu_doc_lens=torch.tensor([0, 4, 9]), pad_values=[0]
        )
        assert tuple(meta) == cp_data.balancers.METADATA_KEYS[kind]
