"""ContextParallelCollator against a per-token reference written from the SPEC §3 text."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import cp_data.collate
from cp_data import RingAttentionLoadBalancerType, unshard
from cp_data.collate import ContextParallelCollator
from test_balancer_properties import ref_llama3_prepare

KINDS = [k.value for k in RingAttentionLoadBalancerType]
SPEC_KEYS = {"input_ids", "labels", "position_ids"}


def reference_full(instances, document_masking=True):
    """SPEC §3 steps 1-2 with per-token Python loops: (ids, labels, positions, cu) as lists."""
    rows = []
    for inst in instances:
        ids = inst["input_ids"].tolist()
        mask = inst["label_mask"].tolist() if "label_mask" in inst else [True] * len(ids)
        doc_of = [d for d, n in enumerate(inst["doc_lens"].tolist()) for _ in range(n)]
        rows.append((ids, mask, doc_of, inst["doc_lens"].tolist()))
    if document_masking:  # one row; a row boundary is a document boundary
        offsets = np.cumsum([0] + [len(r[3]) for r in rows])
        rows = [(
            sum((r[0] for r in rows), []),
            sum((r[1] for r in rows), []),
            [d + o for r, o in zip(rows, offsets) for d in r[2]],
            sum((r[3] for r in rows), []),
        )]
    out = []
    for ids, mask, doc_of, lens in rows:
        n = len(ids)
        labels, positions = [], []
        for i in range(n):
            same_doc = i + 1 < n and (doc_of[i + 1] == doc_of[i] or not document_masking)
            labels.append(ids[i + 1] if same_doc and mask[i + 1] else -100)
            positions.append(i - doc_of.index(doc_of[i]) if document_masking else i)
        out.append((ids, labels, positions, [0] + np.cumsum(lens).tolist()))
    return out


def reference_batch(instances, kind, rank, world, pad_token_id=0, length_multiple=None, document_masking=True):
    """The SPEC §2 batch: the reference rows sharded with the balancer's public API."""
    balancer = RingAttentionLoadBalancerType(kind).create(cp_rank=rank, cp_world_size=world)
    rows = reference_full(instances, document_masking)
    inputs = [torch.tensor([r[j] for r in rows], dtype=torch.int64) for j in range(3)]
    pads = [pad_token_id, -100, 0]
    if document_masking:
        cu = torch.tensor(rows[0][3], dtype=torch.int32)
        shards, metadata = balancer.batch_shard_by_document(
            inputs=inputs, seq_dims=[1, 1, 1], cu_doc_lens=cu, pad_values=pads, length_multiple=length_multiple
        )
    else:
        shards = balancer.batch_shard(inputs=inputs, seq_dims=[1, 1, 1], pad_values=pads, length_multiple=length_multiple)
        metadata = {}
    return dict(zip(["input_ids", "labels", "position_ids"], shards), **metadata)


def assert_batches_equal(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype, key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def make_instance(rng, seq_len, max_docs=6, with_mask=True, **extra):
    n = int(rng.integers(1, min(max_docs, seq_len) + 1))
    cuts = np.sort(rng.choice(np.arange(1, seq_len), size=n - 1, replace=False)) if n > 1 else []
    inst = dict(
        input_ids=torch.from_numpy(rng.integers(0, 1000, seq_len)),
        doc_lens=torch.from_numpy(np.diff(np.concatenate([[0], cuts, [seq_len]])).astype(np.int64)),
        **extra,
    )
    if with_mask:
        inst["label_mask"] = torch.from_numpy(rng.random(seq_len) < 0.8)
    return inst


@st.composite
def batches(draw):
    kind = draw(st.sampled_from(KINDS))
    masking = kind == "llama3" or draw(st.booleans())
    world = draw(st.integers(1, 4))
    divisor = {"ulysses": world, "zig_zag": 1 if masking else 2 * world, "llama3": 1}[kind]
    length_multiple = draw(st.none() | st.integers(1, 5).map(lambda k: k * divisor))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    seq_len = draw(st.integers(1, 64))
    instances = [  # label_mask may be absent from some instances only (absent = all True)
        make_instance(rng, seq_len, max_docs=draw(st.integers(1, 12)), with_mask=draw(st.booleans()), idx=i)
        for i in range(draw(st.integers(1, 4)))
    ]
    return kind, masking, world, length_multiple, instances


@given(batches(), st.integers(0, 3))
def test_matches_reference_on_every_rank_and_is_lossless(case, pad_token_id):
    kind, masking, world, length_multiple, instances = case
    shards = []
    for rank in range(world):
        collator = ContextParallelCollator(
            load_balancer=kind, cp_rank=rank, cp_world_size=world, pad_token_id=pad_token_id,
            length_multiple=length_multiple, document_masking=masking,
        )
        got = collator(instances)
        expected = reference_batch(instances, kind, rank, world, pad_token_id, length_multiple, masking)
        expected["idx"] = torch.arange(len(instances))
        assert_batches_equal(got, expected)
        assert got["input_ids"].shape[0] == (1 if masking else len(instances))
        for key in SPEC_KEYS:  # never a view that keeps the whole flattened row alive
            assert got[key].untyped_storage().nbytes() == got[key].numel() * got[key].element_size(), key
        for key in ("cu_doc_lens", "cu_doc_lens_q", "cu_doc_lens_k"):
            assert key not in got or got[key].dtype == torch.int32
        shards.append(got)
    # Lossless: the shards of all ranks unshard to the full-row tensors of the reference.
    plans = collator.plans_all_ranks(collator.full_batch(instances))
    rows = reference_full(instances, masking)
    for j, key in enumerate(["input_ids", "labels", "position_ids"]):
        rebuilt = unshard([s[key][0] if masking else s[key] for s in shards], plans, seq_dim=-1)
        assert rebuilt.tolist() == (rows[0][j] if masking else [r[j] for r in rows])


def test_spec_worked_examples():
    inst = [dict(input_ids=torch.arange(12), doc_lens=torch.tensor([8, 4]))]
    batch = ContextParallelCollator(load_balancer="zig_zag", cp_rank=0, cp_world_size=2)(inst)
    assert batch["input_ids"].tolist() == [[0, 1, 6, 7, 8, 11]]
    assert batch["labels"].tolist() == [[1, 2, 7, -100, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 6, 7, 0, 3]]
    assert batch["cu_doc_lens"].tolist() == [0, 4, 6] and batch["max_doc_len"] == 4
    assert set(batch) == SPEC_KEYS | {"cu_doc_lens", "max_doc_len"}

    inst = [dict(input_ids=torch.arange(12), doc_lens=torch.tensor([7, 3, 2]))]
    batch = ContextParallelCollator(load_balancer="llama3", cp_rank=1, cp_world_size=2)(inst)
    assert batch["input_ids"].tolist() == [list(range(6, 12))]
    assert batch["labels"].tolist() == [[-100, 8, 9, -100, 11, -100]]
    assert batch["position_ids"].tolist() == [[6, 0, 1, 2, 0, 1]]
    assert batch["cu_doc_lens_q"].tolist() == [0, 1, 4, 6] and batch["cu_doc_lens_k"].tolist() == [0, 7, 10, 12]
    assert (batch["max_doc_len_q"], batch["max_doc_len_k"], batch["local_k_slice"]) == (3, 7, slice(0, 12))

    # Two rows flatten into one: the row boundary is a document boundary; padding gets pad values.
    inst = [dict(input_ids=torch.tensor([5, 6, 7]), doc_lens=torch.tensor([3]))] * 2
    batch = ContextParallelCollator(load_balancer="ulysses", cp_rank=1, cp_world_size=4, pad_token_id=9)(inst)
    assert batch["input_ids"].tolist() == [[7, 5]]
    assert batch["labels"].tolist() == [[-100, 6]]
    assert batch["cu_doc_lens"].tolist() == [0, 3, 6, 8]

    batch = ContextParallelCollator(
        load_balancer="zig_zag", cp_rank=0, cp_world_size=2, document_masking=False, pad_token_id=9
    )([dict(input_ids=torch.arange(6), doc_lens=torch.tensor([2, 4]), label_mask=torch.tensor([True] * 5 + [False]))])
    assert set(batch) == SPEC_KEYS
    assert batch["input_ids"].tolist() == [[0, 1, 9, 9]]  # chunks 0 and 3 of [0..5, pad, pad]
    assert batch["labels"].tolist() == [[1, 2, -100, -100]]  # crosses the document boundary at 2
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0]]


def test_pass_through_keys_are_default_collated():
    rng = np.random.default_rng(0)
    instances = [make_instance(rng, 16, index=i, meta={"src": f"f{i}"}, emb=torch.ones(2) * i) for i in range(3)]
    batch = ContextParallelCollator(load_balancer="zig_zag", cp_rank=0, cp_world_size=2)(instances)
    assert set(batch) == SPEC_KEYS | {"cu_doc_lens", "max_doc_len", "index", "meta", "emb"}
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["meta"] == {"src": ["f0", "f1", "f2"]}
    assert batch["emb"].tolist() == [[0, 0], [1, 1], [2, 2]]


def _instances(seq_len=8, n=2, **overrides):
    insts = [dict(input_ids=torch.arange(seq_len), doc_lens=torch.tensor([seq_len - 3, 3])) for _ in range(n)]
    insts[-1].update(overrides)
    return insts


BAD = [
    ([], "empty batch"),
    ({"input_ids": torch.arange(4)}, "list of packed instances"),
    (["x"], "instance 0 must be a dict"),
    ([{"doc_lens": torch.tensor([4])}], "instance 0: missing required key 'input_ids'"),
    ([{"input_ids": torch.arange(4)}], "instance 0: missing required key 'doc_lens'"),
    (_instances(input_ids=torch.arange(8).int()), "instance 1: 'input_ids' must have dtype torch.int64"),
    (_instances(input_ids=list(range(8))), "instance 1: 'input_ids' must be a torch.Tensor"),
    (_instances(input_ids=torch.arange(8)[None]), r"instance 1: 'input_ids' must be 1-D"),
    (_instances(input_ids=torch.arange(9)), "instance 1: 'input_ids' has length 9 but instance 0 has 8"),
    (_instances(doc_lens=torch.tensor([5, 2])), "instance 1: 'doc_lens' sums to 7"),
    (_instances(doc_lens=torch.tensor([9, -1])), r"instance 1: 'doc_lens' must be non-empty and all > 0"),
    (_instances(doc_lens=torch.tensor([8, 0])), r"instance 1: 'doc_lens' must be non-empty and all > 0"),
    (_instances(doc_lens=torch.tensor([5.0, 3.0])), "instance 1: 'doc_lens' must have dtype torch.int64"),
    (_instances(doc_lens=torch.tensor([], dtype=torch.int64)), "instance 1: 'doc_lens' must be non-empty"),
    (_instances(label_mask=torch.ones(8, dtype=torch.int64)), "instance 1: 'label_mask' must have dtype torch.bool"),
    (_instances(label_mask=torch.ones(8, dtype=torch.bool)[None]), "instance 1: 'label_mask' must be 1-D"),
    (_instances(label_mask=torch.ones(7, dtype=torch.bool)), "instance 1: 'label_mask' has length 7"),
    (_instances(extra=1), "instance 1: key 'extra' is not in every instance"),
    ([dict(input_ids=torch.arange(0), doc_lens=torch.tensor([], dtype=torch.int64))], "'input_ids' is empty"),
    (_instances(n=1, labels=torch.arange(8)), "key 'labels' is produced by the collator"),
]


@pytest.mark.parametrize("instances, message", BAD)
@pytest.mark.parametrize("masking", [True, False])
def test_malformed_instances_raise_value_error(instances, message, masking):
    collator = ContextParallelCollator(load_balancer="ulysses", cp_rank=0, cp_world_size=2, document_masking=masking)
    with pytest.raises(ValueError, match=message):
        collator(instances)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(load_balancer="ring"), r"unknown load balancer 'ring'; expected one of \['zig_zag', 'llama3', 'ulysses'\]"),
        (dict(load_balancer="llama3", document_masking=False), "llama3.*document_masking=True"),
        (dict(load_balancer="zig_zag", reorder_documents=True), "reorder_documents=True needs"),
        (dict(load_balancer="llama3", document_masking=False, reorder_documents=True), "document_masking"),
        (dict(load_balancer="zig_zag", cp_rank=2), r"cp_rank must be in \[0, 2\)"),
        (dict(load_balancer="ulysses", length_multiple=3), r"length_multiple \(3\) must be divisible"),
        (dict(load_balancer="zig_zag", length_multiple=2, document_masking=False), "must be divisible"),
        (dict(load_balancer="zig_zag", length_multiple=0), "length_multiple must be >= 1"),
        (dict(load_balancer="zig_zag", pad_token_id=1.5), "pad_token_id must be an int"),
        (dict(load_balancer="zig_zag", document_masking=1), "document_masking must be a bool"),
    ],
)
def test_bad_configuration_raises_in_constructor(kwargs, message):
    kwargs = dict(dict(cp_rank=0, cp_world_size=2), **kwargs)
    with pytest.raises(ValueError, match=message):
        ContextParallelCollator(**kwargs)


def test_pickle_roundtrip_gives_same_output():
    rng = np.random.default_rng(1)
    instances = [make_instance(rng, 32, idx=i) for i in range(3)]
    for kind in KINDS:
        collator = ContextParallelCollator(load_balancer=kind, cp_rank=1, cp_world_size=2, length_multiple=4)
        clone = pickle.loads(pickle.dumps(collator))
        assert clone == collator
        assert_batches_equal(clone(instances), collator(instances))


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_torch_dataloader_with_two_workers():
    rng = np.random.default_rng(2)
    items = [make_instance(rng, 24, idx=i) for i in range(8)]
    collator = ContextParallelCollator(load_balancer="zig_zag", cp_rank=1, cp_world_size=2)
    loader = DataLoader(_ListDataset(items), batch_size=2, num_workers=2, collate_fn=collator)
    got = list(loader)
    assert len(got) == 4
    for b, batch in enumerate(got):
        assert_batches_equal(batch, collator(items[2 * b : 2 * b + 2]))


def _segments(full, order):
    cu = full.cu_doc_lens.tolist()
    return [torch.cat([t[cu[d] : cu[d + 1]] for d in order]) for t in full[:3]]


@pytest.mark.parametrize("permute", [lambda n: np.arange(n)[::-1].copy(), lambda n: np.random.default_rng(n).permutation(n)])
def test_reorder_documents_keeps_every_token_label_and_position(monkeypatch, permute):
    calls = []

    def fake_order(doc_lens, cp_world_size, length_multiple):
        calls.append((doc_lens.dtype, cp_world_size, length_multiple))
        return permute(len(doc_lens))

    monkeypatch.setattr(cp_data.collate, "llama3_balanced_order", fake_order)
    rng = np.random.default_rng(3)
    instances = [make_instance(rng, 42, max_docs=8) for _ in range(3)]  # 126 tokens: llama3 pads 2
    plain = ContextParallelCollator(load_balancer="llama3", cp_rank=0, cp_world_size=4).full_batch(instances)
    args = dict(load_balancer="llama3", cp_world_size=4, length_multiple=2, reorder_documents=True)
    reordered = ContextParallelCollator(cp_rank=0, **args).full_batch(instances)
    order = permute(len(plain.cu_doc_lens) - 1)
    for got, want in zip(reordered[:3], _segments(plain, order)):
        assert torch.equal(got, want)
    lens = np.diff(plain.cu_doc_lens.numpy())[order]
    assert reordered.cu_doc_lens.tolist() == [0] + np.cumsum(lens).tolist()
    assert reordered.cu_doc_lens.dtype == torch.int32
    assert calls[0] == (np.int64, 4, 2)
    # The shards of the reordered row are lossless and carry the reordered metadata.
    shards = [ContextParallelCollator(cp_rank=r, **args)(instances) for r in range(4)]
    plans = ContextParallelCollator(cp_rank=0, **args).plans_all_ranks(reordered)
    for key, want in zip(["input_ids", "labels", "position_ids"], reordered):
        assert torch.equal(unshard([s[key][0] for s in shards], plans, seq_dim=-1), want)
    # ring-flash-attn's metadata of the reordered row, padded to a multiple of W x length_multiple
    padded = reordered.cu_doc_lens.tolist()
    padded += [-(-padded[-1] // 8) * 8] if padded[-1] % 8 else []
    for rank, shard in enumerate(shards):
        expected = ref_llama3_prepare(torch.tensor(padded, dtype=torch.int32), rank, 4)
        assert {k: shard[k] for k in expected if not isinstance(shard[k], torch.Tensor)} == {
            k: v for k, v in expected.items() if not isinstance(v, torch.Tensor)
        }
        for key in ("cu_doc_lens_q", "cu_doc_lens_k"):
            assert torch.equal(shard[key], expected[key]), (rank, key)


def test_reorder_rejects_a_non_permutation(monkeypatch):
    monkeypatch.setattr(
        cp_data.collate, "llama3_balanced_order", lambda doc_lens, w, m: np.zeros(len(doc_lens), dtype=np.int64)
    )
    collator = ContextParallelCollator(load_balancer="llama3", cp_rank=0, cp_world_size=2, reorder_documents=True)
    with pytest.raises(RuntimeError, match="not a permutation of 2 documents"):
        collator(_instances(n=1))


def test_reorder_with_the_real_ordering():
    from cp_data.balancers import ordering
    rng = np.random.default_rng(4)
    instances = [make_instance(rng, 64, max_docs=10) for _ in range(4)]
    plain = ContextParallelCollator(load_balancer="llama3", cp_rank=0, cp_world_size=4).full_batch(instances)
    args = dict(load_balancer="llama3", cp_rank=0, cp_world_size=4, reorder_documents=True)
    reordered = ContextParallelCollator(**args).full_batch(instances)
    order = ordering.llama3_balanced_order(np.diff(plain.cu_doc_lens.numpy()).astype(np.int64), 4, None)
    for got, want in zip(reordered[:3], _segments(plain, order)):
        assert torch.equal(got, want)
