"""Inspection metrics against brute-force counts, shard maps, comparisons and plots."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_data.balancers.ordering import llama3_balanced_order, llama3_rank_work
from cp_data.inspect import (
    REORDERED,
    BatchRow,
    compare_balancers,
    row_from_instances,
    shard_map,
    shard_metrics,
)
from hypothesis_profiles import few_examples


def padded_layout(kind, lens, world, multiple):
    """Each rank's slots as (doc, offset in padded doc, is_padding), built token by token.

    Written straight from SPEC §1: zig_zag pads every document to a multiple of 2W and keeps
    chunks r and 2W-1-r; llama3/ulysses pad the row at its end (one more document) and slice it.
    """
    shards = [[] for _ in range(world)]
    if kind == "zig_zag":
        for d, n in enumerate(lens):
            padded = -(-n // (2 * world)) * 2 * world
            chunk = padded // (2 * world)
            slots = [(d, o, o >= n) for o in range(padded)]
            for r in range(world):
                shards[r] += slots[r * chunk : (r + 1) * chunk]
                shards[r] += slots[(2 * world - 1 - r) * chunk : (2 * world - r) * chunk]
        if multiple is not None:
            for r in range(world):
                extra = -(-len(shards[r]) // multiple) * multiple - len(shards[r])
                shards[r] += [(len(lens), o, True) for o in range(extra)]
        return shards
    # llama3 pads to a multiple of W x length_multiple, ulysses to length_multiple (default W).
    step = world * (multiple or 1) if kind == "llama3" else (multiple or world)
    total = sum(lens)
    row = [(d, o, False) for d, n in enumerate(lens) for o in range(n)]
    row += [(len(lens), o, True) for o in range(-(-total // step) * step - total)]
    local = len(row) // world
    return [row[r * local : (r + 1) * local] for r in range(world)]


def brute_force(kind, lens, world, multiple, pad_docs=()):
    shards = padded_layout(kind, lens, world, multiple)
    out = dict(tokens=[], padding=[], documents=[], work=[], padding_work=[])
    for slots in shards:
        tokens = padding = work = pad_work = 0
        docs = set()
        for doc, offset, is_pad in slots:
            is_pad = is_pad or doc in pad_docs
            if is_pad:
                padding += 1
                pad_work += offset + 1
            else:
                tokens += 1
                work += offset + 1
                docs.add(doc)
        for key, value in zip(out, (tokens, padding, len(docs), work, pad_work)):
            out[key].append(value)
    if kind == "ulysses":  # every rank computes all positions for H/W heads
        for key in ("work", "padding_work"):
            out[key] = [sum(out[key]) / world] * world
    return out


lens_st = st.lists(st.integers(1, 23), min_size=1, max_size=7)


@given(
    lens_st,
    st.sampled_from(["zig_zag", "llama3", "ulysses"]),
    st.integers(1, 4),
    st.sampled_from([None, 1, 3, 8]),
)
def test_metrics_match_brute_force(lens, kind, world, multiple):
    if kind == "ulysses" and multiple is not None and multiple % world:
        multiple = world * multiple
    cu = np.concatenate([[0], np.cumsum(lens)])
    m = shard_metrics(cu, kind, world, length_multiple=multiple)
    expected = brute_force(kind, lens, world, multiple)
    for key, value in expected.items():
        assert getattr(m, key).tolist() == pytest.approx(value), key


@given(lens_st, st.sampled_from(["zig_zag", "llama3", "ulysses"]), st.integers(1, 4), st.data())
def test_instance_padding_counts_as_padding(lens, kind, world, data):
    pad_docs = set(data.draw(st.lists(st.integers(0, len(lens) - 1), max_size=2)))
    cu = np.concatenate([[0], np.cumsum(lens)])
    mask = np.repeat(np.isin(np.arange(len(lens)), list(pad_docs)), lens)
    m = shard_metrics(cu, kind, world, padding_mask=mask)
    expected = brute_force(kind, lens, world, None, pad_docs)
    for key, value in expected.items():
        assert getattr(m, key).tolist() == pytest.approx(value), key


def test_spec_example_llama3():
    # SPEC §1: llama3, W=2, cu=[0, 7, 10, 12]: r0 holds 0..5 (doc 0), r1 holds 6..11.
    m = shard_metrics(torch.tensor([0, 7, 10, 12]), "llama3", 2)
    assert m.tokens.tolist() == [6, 6]
    assert m.documents.tolist() == [1, 3]
    assert m.work.tolist() == [21, 7 + 6 + 3]
    assert m.work_imbalance == pytest.approx(21 / 18.5)


def test_llama3_work_agrees_with_ordering_helper():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 300, size=40)
    cu = np.concatenate([[0], np.cumsum(lens)])
    assert shard_metrics(cu, "llama3", 4).work.tolist() == llama3_rank_work(lens, 4).tolist()


def test_comparison_and_reordering():
    rng = np.random.default_rng(1)
    lens = np.clip(rng.lognormal(np.log(150), 1.0, size=30).astype(int), 1, 1000)
    cu = np.concatenate([[0], np.cumsum(lens)])
    comp = compare_balancers(cu, 4)
    assert list(comp.metrics) == ["zig_zag", "llama3", "ulysses", REORDERED]
    assert comp.metrics["ulysses"].work_imbalance == pytest.approx(1.0)
    reordered = comp.metrics[REORDERED]
    assert reordered.work.max() == pytest.approx(
        llama3_rank_work(lens[llama3_balanced_order(lens, 4)], 4).max()
    )
    assert reordered.work_imbalance < comp.metrics["llama3"].work_imbalance
    assert reordered.work.sum() == pytest.approx(comp.metrics["llama3"].work.sum())
    d = json.loads(json.dumps(comp.to_dict()))
    assert d["zig_zag"]["tokens"] == comp.metrics["zig_zag"].tokens.tolist()
    text = comp.render(per_rank=True)
    assert "llama3_reordered" in text and "pad work" in text
    only = compare_balancers(cu, 4, ["zig_zag"])
    assert list(only.metrics) == ["zig_zag"]


def test_reordered_row_keeps_tokens():
    row = BatchRow(np.array([0, 3, 5, 9]), np.array([0, 0, 0, 0, 0, 0, 0, 1, 1], bool), np.arange(9))
    new = row.reordered(np.array([2, 0, 1]))
    assert new.cu_doc_lens.tolist() == [0, 4, 7, 9]
    assert new.input_ids.tolist() == [5, 6, 7, 8, 0, 1, 2, 3, 4]
    assert new.padding_mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert new.doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    only_padding = BatchRow(np.array([0, 3, 5]), np.array([0, 1, 0, 1, 1], bool))
    assert only_padding.real_documents.tolist() == [True, False]


@given(lens_st, st.sampled_from(["zig_zag", "llama3", "ulysses"]), st.integers(1, 4))
@few_examples
def test_shard_map_matches_shards(lens, kind, world):
    cu = np.concatenate([[0], np.cumsum(lens)])
    n = int(cu[-1])
    smap = shard_map(cu, kind, world)
    for r in range(world):
        balancer = (
            __import__("cp_data").RingAttentionLoadBalancerType(kind).create(cp_rank=r, cp_world_size=world)
        )
        (shard,), _ = balancer.batch_shard_by_document(
            inputs=[torch.arange(n)], seq_dims=[0], cu_doc_lens=torch.tensor(cu), pad_values=[-1]
        )
        held = [p for p in shard.tolist() if p >= 0]
        assert sorted(held) == np.flatnonzero(smap.rank == r).tolist()
        assert all(shard[smap.local_position[p]] == p for p in held)
        assert smap.padding[r] == (shard == -1).sum()
    table = smap.doc_rank_tokens()
    assert table.sum(axis=1).tolist() == list(lens)
    starts, run_lens, ranks = smap.runs()
    assert run_lens.sum() == n
    assert all((smap.rank[s : s + k] == rk).all() for s, k, rk in zip(starts, run_lens, ranks))


def test_row_from_instances():
    inst = [
        dict(
            input_ids=torch.tensor([5, 6, 7, 0, 0]),
            doc_lens=torch.tensor([3, 2]),
            label_mask=torch.tensor([True, True, True, False, False]),
        ),
        dict(input_ids=torch.tensor([1, 2, 0, 4, 9]), doc_lens=torch.tensor([5])),
    ]
    row = row_from_instances(inst)
    assert row.cu_doc_lens.tolist() == [0, 3, 5, 10]
    assert row.padding_mask.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    m = shard_metrics(row, "llama3", 2)
    assert shard_metrics(inst, "llama3", 2).to_dict() == m.to_dict()
    assert m.documents.tolist() == [1, 1]  # the padding-only document is not counted
    assert m.padding.tolist() == [2, 0]
    with pytest.raises(ValueError, match="doc_lens"):
        row_from_instances([dict(input_ids=torch.tensor([1, 2]), doc_lens=torch.tensor([3]))])
    with pytest.raises(ValueError, match="input_ids"):
        row_from_instances([dict(doc_lens=torch.tensor([3]))])
    # A document may not run over a row boundary, even when the batch's totals agree.
    crossing = [
        dict(input_ids=torch.tensor([1, 2]), doc_lens=torch.tensor([3])),
        dict(input_ids=torch.tensor([3, 4]), doc_lens=torch.tensor([1])),
    ]
    with pytest.raises(ValueError, match="instance 0: 'doc_lens' sums to 3"):
        row_from_instances(crossing)
    short_mask = dict(input_ids=torch.tensor([1, 2]), doc_lens=torch.tensor([2]), label_mask=torch.tensor([True]))
    with pytest.raises(ValueError, match="'label_mask' has length 1"):
        row_from_instances([short_mask])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown load balancer"):
        shard_metrics([0, 4], "ring", 2)
    with pytest.raises(ValueError, match="start at 0"):
        shard_metrics([1, 4], "llama3", 2)
    with pytest.raises(ValueError, match="padding_mask"):
        shard_metrics([0, 4], "llama3", 2, padding_mask=[True])


def test_plots_draw_the_numbers(tmp_path):
    from cp_data.inspect.plots import plot_doc_lengths, plot_rank_work, plot_shard_map, use_file_backend

    use_file_backend()
    lens = np.array([5, 17, 3, 40, 9, 11])
    cu = np.concatenate([[0], np.cumsum(lens)])
    comp = compare_balancers(cu, 3)
    fig = plot_rank_work(comp, tmp_path / "work.png")
    heights = [p.get_height() for p in fig.axes[0].patches]
    # Per balancer: W work bars, then W padding bars stacked on them.
    for i, m in enumerate(comp.metrics.values()):
        assert heights[6 * i : 6 * i + 3] == pytest.approx(m.work.tolist())
        assert heights[6 * i + 3 : 6 * i + 6] == pytest.approx(m.padding_work.tolist())
    smap = shard_map(cu, "zig_zag", 3)
    fig = plot_shard_map(smap, tmp_path / "map.png")
    bars = fig.axes[0].patches
    widths = np.array([p.get_width() for p in bars])
    rows = np.array([round(p.get_y() + p.get_height() / 2) for p in bars])
    assert [widths[rows == d].sum() for d in range(len(lens))] == pytest.approx(lens.tolist())
    assert widths[rows == len(lens)].tolist() == smap.padding.tolist()
    fig = plot_doc_lengths(lens, tmp_path / "hist.png")
    assert sum(p.get_height() for p in fig.axes[0].patches) == len(lens)
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("work.png", "map.png", "hist.png"))


def test_resolve_files(tmp_path):
    from cp_data.inspect.sources import resolve_files

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "a" / "y.json").write_text('[{"text": "yo"}]')
    saved = tmp_path / "a" / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "dataset_info.json").write_text("{}")
    assert resolve_files([tmp_path / "a"]) == (
        "json",
        [tmp_path / "a" / "x.jsonl", tmp_path / "a" / "y.json"],
    )
    assert resolve_files([saved]) == ("saved", [saved])
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="mixed file formats"):
        resolve_files([tmp_path / "a", tmp_path / "b.txt"])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_files([tmp_path / "nope.txt"])
    (tmp_path / "c.csv").write_text("a\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        resolve_files([tmp_path / "c.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        resolve_files([tmp_path / "empty"])
