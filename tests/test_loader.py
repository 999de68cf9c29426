"""Loader glue: the dp-only split, exact resume with StatefulDataLoader, iterable datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset

from hypothesis_profiles import process_examples

from cp_data.loader import ContextParallelLoaderConfig, DataParallelSampler, IndexedDataset


class Synthetic(Dataset):
    """Packed instances of length ``seq_len`` with random documents, a label mask and an index key."""

    def __init__(self, n=23, seq_len=32, seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            cuts = np.sort(rng.choice(np.arange(1, seq_len), size=int(rng.integers(0, 6)), replace=False))
            self.items.append(dict(
                input_ids=torch.from_numpy(rng.integers(0, 500, seq_len)),
                doc_lens=torch.from_numpy(np.diff(np.concatenate([[0], cuts, [seq_len]])).astype(np.int64)),
                label_mask=torch.from_numpy(rng.random(seq_len) < 0.9),
                index=i,
            ))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def flat(sampler):
    """One pass of a batch sampler, its steps' indices end to end."""
    return [i for step in sampler for i in step]


@given(st.integers(0, 40), st.integers(1, 5), st.booleans(), st.booleans(), st.integers(0, 3))
def test_sampler_splits_every_epoch_across_dp_ranks(n, world, shuffle, drop_last, epoch):
    # batch_size=1: each rank's indices are those of torch's DistributedSampler split
    samplers = [DataParallelSampler(n, dp_rank=r, dp_world_size=world, shuffle=shuffle, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [flat(s) for s in samplers]
    assert all(len(p) == len(samplers[0].order(epoch)) // world + (not drop_last and n % world > 0)
               for p in per_rank)
    both = sum(per_rank, [])
    if drop_last:
        assert len(both) == n - n % world and len(set(both)) == len(both)
    else:
        assert set(both) == set(range(n)) and len(both) == -(-n // world) * world
    if not shuffle:
        assert per_rank[0] == np.resize(np.arange(n), len(both))[::world].tolist()
    # the epoch advances by itself: the next pass is the next epoch's order
    again = DataParallelSampler(n, dp_rank=0, dp_world_size=world, shuffle=shuffle, drop_last=drop_last)
    again.set_epoch(epoch + 1)
    assert flat(samplers[0]) == flat(again)


def test_sampler_shuffles_per_epoch_and_rejects_bad_state():
    s = DataParallelSampler(50, dp_rank=0, dp_world_size=1, seed=3)
    first, second = flat(s), flat(s)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    assert flat(DataParallelSampler(50, dp_rank=0, dp_world_size=1, seed=3)) == first
    with pytest.raises(ValueError, match=r"not a cp-data loader state of version 1 \(keys \['epoch', 'yielded'\]\)"):
        s.load_state_dict({"epoch": 0, "yielded": 51})  # the per-rank state of cp-data 0.1
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, dp_world_size=2\), got 2"):
        DataParallelSampler(5, dp_rank=2, dp_world_size=2)


@pytest.mark.parametrize("kind", ["zig_zag", "llama3", "ulysses"])
def test_cp_ranks_of_a_dp_group_share_the_global_batch(kind):
    data = Synthetic()
    cfg = ContextParallelLoaderConfig(batch_size=3, load_balancer=kind, seed=5, length_multiple=4)
    for dp in range(2):
        loaders = [cfg.build(data, dp_rank=dp, dp_world_size=2, cp_rank=r, cp_world_size=2) for r in range(2)]
        steps = list(zip(*loaders))
        assert len(steps) == (len(data) // 2) // 3
        for step in steps:
            assert step[0]["index"].tolist() == step[1]["index"].tolist()
            for r, batch in enumerate(step):
                instances = [data[i] for i in batch["index"].tolist()]
                assert same(batch, cfg.collator(r, 2)(instances))
    other = cfg.build(data, dp_rank=1, dp_world_size=2, cp_rank=0, cp_world_size=2)
    mine = cfg.build(data, dp_rank=0, dp_world_size=2, cp_rank=0, cp_world_size=2)
    seen = [set(torch.cat([b["index"] for b in loader]).tolist()) for loader in (mine, other)]
    assert not seen[0] & seen[1]


def run_with_resume(cfg, data, stop, total):
    """Batches 0..total-1 of an uninterrupted loader, and the same with a resume after ``stop``."""
    build = lambda: cfg.build(data, dp_rank=1, dp_world_size=2, cp_rank=1, cp_world_size=2)  # noqa: E731

    def take(loader, count):
        out = []
        while len(out) < count:
            out.extend(b for _, b in zip(range(count - len(out)), loader))
        return out

    straight = take(build(), total)
    first = build()
    head, state = [], None
    it = iter(first)
    for _ in range(stop):  # a loader that crosses epochs: a new iterator per epoch
        try:
            head.append(next(it))
        except StopIteration:
            it = iter(first)
            head.append(next(it))
    state = first.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    return straight, head + take(resumed, total - stop)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [2, 3, 5])
def test_resume_mid_epoch_and_at_epoch_end_is_exact(num_workers, stop):
    data = Synthetic(n=20)  # 10 samples per dp rank -> 3 batches of 3 per epoch
    cfg = ContextParallelLoaderConfig(batch_size=3, load_balancer="zig_zag", num_workers=num_workers, seed=1)
    straight, resumed = run_with_resume(cfg, data, stop, total=8)
    assert len(straight) == len(resumed) == 8
    assert all(same(a, b) for a, b in zip(straight, resumed))
    assert straight[0]["index"].tolist() != straight[3]["index"].tolist()  # epochs reshuffle


class ShardableStream(IterableDataset):
    """An iterable dataset of packed instances that splits itself with ``shard``."""

    def __init__(self, items, num_shards=1, index=0):
        self.items, self.num_shards, self.index = items, num_shards, index

    def shard(self, num_shards, index):
        return ShardableStream(self.items, num_shards, index)

    def __iter__(self):
        return iter(self.items[self.index :: self.num_shards])


def test_iterable_datasets_split_by_dp_rank():
    items = Synthetic(n=12).items
    cfg = ContextParallelLoaderConfig(batch_size=2, load_balancer="ulysses")
    got = [[b["index"].tolist() for b in cfg.build(ShardableStream(items), dp_rank=d, dp_world_size=2,
                                                    cp_rank=0, cp_world_size=2)] for d in range(2)]
    assert got == [[[0, 2], [4, 6], [8, 10]], [[1, 3], [5, 7], [9, 11]]]

    plain = lambda: iter(items)  # noqa: E731
    stream = type("Plain", (IterableDataset,), {"__iter__": lambda self: plain()})()
    with pytest.raises(ValueError, match="cannot split Plain by dp rank"):
        cfg.build(stream, dp_rank=0, dp_world_size=2, cp_rank=0, cp_world_size=2)
    unsplit = ContextParallelLoaderConfig(batch_size=4, load_balancer="ulysses", split_iterable=False)
    batches = list(unsplit.build(stream, dp_rank=0, dp_world_size=2, cp_rank=1, cp_world_size=2))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_hf_iterable_dataset_is_split_by_node():
    import datasets

    items = Synthetic(n=8).items
    columns = {k: [item[k].tolist() if isinstance(item[k], torch.Tensor) else item[k] for item in items]
               for k in items[0]}
    features = datasets.Features(
        input_ids=datasets.Sequence(datasets.Value("int64")),
        doc_lens=datasets.Sequence(datasets.Value("int64")),
        label_mask=datasets.Sequence(datasets.Value("bool")),
        index=datasets.Value("int64"),
    )
    hf = datasets.Dataset.from_dict(columns, features=features).to_iterable_dataset(num_shards=4)
    cfg = ContextParallelLoaderConfig(batch_size=2, load_balancer="zig_zag")
    seen = []
    for dp in range(2):
        loader = cfg.build(hf.with_format("torch"), dp_rank=dp, dp_world_size=2, cp_rank=0, cp_world_size=2)
        for batch in loader:
            seen.extend(batch["index"].tolist())
            assert same(batch, cfg.collator(0, 2)([items[i] for i in batch["index"].tolist()]))
    assert sorted(seen) == list(range(8))


def test_indexed_dataset_and_config_errors():
    base = Synthetic(n=3)
    indexed = IndexedDataset([{k: v for k, v in item.items() if k != "index"} for item in base.items])
    assert len(indexed) == 3 and indexed[2]["index"] == 2 and torch.equal(indexed[2]["input_ids"], base[2]["input_ids"])
    cfg = ContextParallelLoaderConfig(batch_size=1)
    with pytest.raises(ValueError, match="dp_rank, dp_world_size, cp_rank and cp_world_size are all required"):
        cfg.build(base, dp_rank=0, dp_world_size=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ContextParallelLoaderConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown load balancer 'ring'"):
        ContextParallelLoaderConfig(batch_size=1, load_balancer="ring")
    with pytest.raises(ValueError, match="cp_rank must be in"):
        cfg.build(base, dp_rank=0, dp_world_size=1, cp_rank=3, cp_world_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_the_streaming_packed_dataset(num_workers):
    import datasets

    from cp_data.datasets import PackedIterableDataset
    from cp_data.packing import PackingConfig

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 300, int(rng.integers(1, 40))).tolist() for _ in range(200)]
    # Split by dp rank before packing (a HF Dataset shards itself), then tell the config so.
    source = datasets.Dataset.from_dict({"input_ids": docs}).shard(num_shards=2, index=1)
    stream = PackedIterableDataset(source, PackingConfig(seq_len=32), buffer_size=16)
    cfg = ContextParallelLoaderConfig(batch_size=2, load_balancer="llama3", num_workers=num_workers,
                                      split_iterable=False)
    straight, resumed = run_with_resume(cfg, stream, stop=3, total=6)
    assert all(same(a, b) for a, b in zip(straight, resumed))
    assert straight[0]["input_ids"].shape == (1, 2 * 32 // 2)


def packed_dataset(seq_len=32, cp_multiple=None, n_docs=300, seed=0):
    datasets = pytest.importorskip("datasets")
    from cp_data.datasets import PackedDataset
    from cp_data.packing import PackingConfig

    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 300, int(rng.lognormal(2.5, 1.0)) + 1).tolist() for _ in range(n_docs)]
    source = datasets.Dataset.from_dict({"input_ids": docs})
    return PackedDataset(source, PackingConfig(seq_len=seq_len, cp_multiple=cp_multiple))


def indices_of(loader, steps=None):
    return [b["index"].tolist() for _, b in zip(range(steps) if steps else iter(int, 1), loader)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_balanced_lookahead_resume_is_exact_and_counts_what_was_handed_out(num_workers):
    data = IndexedDataset(packed_dataset())
    cfg = ContextParallelLoaderConfig(batch_size=2, load_balancer="llama3", num_workers=num_workers, seed=4,
                                      dp_balance=True, lookahead=3, prefetch_factor=4 if num_workers else None)
    build = lambda: cfg.build(data, dp_rank=1, dp_world_size=2, cp_rank=0, cp_world_size=2)  # noqa: E731
    straight = list(build())
    first = build()
    head = indices_of(first, 4)  # the workers prefetched further; the state counts 4 steps
    state = first.state_dict()
    assert state["samples_consumed"] == 4 * 2 * 2 and state["window"]["steps_done"] == 1
    resumed = build()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert len(resumed) == len(straight) - 4
    rest = list(resumed)
    assert head == [b["index"].tolist() for b in straight[:4]]
    assert all(same(a, b) for a, b in zip(straight[4:], rest)) and len(rest) == len(straight) - 4
    assert resumed.state_dict()["epoch"] == 1 and resumed.epoch == 1


def run_ranks(cfg, data, dp, state, stop, **build):
    """Steps of every dp rank (cp rank 0) from ``state`` until ``stop`` or the epoch's end."""
    loaders = [cfg.build(data, dp_rank=r, dp_world_size=dp, cp_rank=0, cp_world_size=2, **build) for r in range(dp)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    seen = []
    for step in zip(range(stop) if stop else iter(int, 1), *loaders):
        assert len({len(b["index"]) for b in step[1:]}) == 1  # every rank the same number of rows
        seen += [i for b in step[1:] for i in b["index"].tolist()]
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)
    return seen, states[0]


@process_examples  # each example starts DataLoader worker processes
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, 2]), st.booleans(),
                          st.integers(1, 4)), min_size=2, max_size=3))
def test_loaders_resume_on_other_dp_batch_size_and_workers_exactly_once(segments):
    data = Synthetic(n=40, seq_len=16)
    seen, state = [], None
    for dp, B, workers, balance, stop in segments:
        cfg = ContextParallelLoaderConfig(batch_size=B, num_workers=workers, seed=2, dp_balance=balance,
                                          lookahead=2)
        work = dict(sample_work=np.arange(40.0) % 7) if balance else {}
        got, state = run_ranks(cfg, data, dp, state, stop, **work)
        seen += got
        if state["epoch"] == 1:
            break
    assert len(seen) == len(set(seen))
    if state["epoch"] == 0:
        assert state["samples_consumed"] == len(seen)
    else:
        assert 40 - 9 < len(seen) <= 40  # at most a tail smaller than the last global batch is left


def test_packed_dataset_fingerprint_and_dp_balance_errors():
    packed = packed_dataset()
    cfg = ContextParallelLoaderConfig(batch_size=2, dp_balance=True, work_model="llama-70b")
    loader = cfg.build(packed, dp_rank=0, dp_world_size=2, cp_rank=0, cp_world_size=2)
    fp = loader.state_dict()["fingerprint"]
    assert fp["num_samples"] == len(packed) and len(fp["row_lengths"]) == len(fp["packing"]) == 16
    assert loader.batch_sampler.row_work.combine == "sum"  # zig_zag: every CP rank does 1/W
    next(iter(loader))
    other_packing = packed_dataset(cp_multiple=4)
    with pytest.raises(ValueError, match="row_lengths: .* in the state, .* here; packing: .* in the state"):
        cfg.build(other_packing, dp_rank=0, dp_world_size=2, cp_rank=0, cp_world_size=2).load_state_dict(
            loader.state_dict())
    with pytest.raises(ValueError, match="Synthetic has no row_doc_lens\\(\\); pass build\\(..., sample_work="):
        cfg.build(Synthetic(), dp_rank=0, dp_world_size=1, cp_rank=0, cp_world_size=1)
    with pytest.raises(ValueError, match="sample_work must hold one number per sample \\(23\\), got shape \\(3,\\)"):
        cfg.build(Synthetic(), dp_rank=0, dp_world_size=1, cp_rank=0, cp_world_size=1, sample_work=[1, 2, 3])
    with pytest.raises(ValueError, match="this config does not balance"):
        ContextParallelLoaderConfig(batch_size=1).build(
            Synthetic(), dp_rank=0, dp_world_size=1, cp_rank=0, cp_world_size=1, sample_work=np.ones(23))
    stream = ShardableStream(Synthetic(n=4).items)
    with pytest.raises(ValueError, match="dp_balance needs a map-style dataset"):
        cfg.build(stream, dp_rank=0, dp_world_size=1, cp_rank=0, cp_world_size=1)
    with pytest.raises(ValueError, match="unknown work model preset 'gpt'"):
        ContextParallelLoaderConfig(batch_size=1, work_model="gpt")
    with pytest.raises(ValueError, match="lookahead must be an int >= 1, got 0"):
        ContextParallelLoaderConfig(batch_size=1, lookahead=0)


@pytest.mark.parametrize("cp_multiple", [None, 4])
def test_row_doc_lens_are_the_rows_doc_lens_without_building_rows(cp_multiple):
    packed = packed_dataset(seq_len=24, cp_multiple=cp_multiple, n_docs=120)
    lens, offsets = packed.row_doc_lens()
    assert len(offsets) == len(packed) + 1
    for i in range(len(packed)):
        assert lens[offsets[i]:offsets[i + 1]].tolist() == packed[i]["doc_lens"].tolist()
