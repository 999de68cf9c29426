"""Streaming packed dataset: exact, chained resume with any worker count or data-parallel size.

Most resume chains run in this process: each reader (one DataLoader worker of one data-parallel
rank) is a copy of the dataset iterated under a simulated worker info, as a DataLoader worker
would. A few tests go through real StatefulDataLoader workers to check the loader's state format.
"""

import collections
import contextlib
import copy
import json
import types
import warnings
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from hypothesis import assume, given
from hypothesis import strategies as st
from test_datasets import check_instance, make_docs, real_tokens, token_dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from cp_data.datasets import PackedIterableDataset, load_stream_state, stream_state
from cp_data.loader import ContextParallelLoaderConfig
from cp_data.packing import PackingConfig
from hypothesis_profiles import few_examples

# these tests drive torchdata's StatefulDataLoader directly, outside cp-data's loader that silences this
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


@contextlib.contextmanager
def as_worker(worker, workers):
    """Run as DataLoader worker ``worker`` of ``workers`` (what get_worker_info() tells the dataset)."""
    info = types.SimpleNamespace(id=worker, num_workers=workers)
    with mock.patch.object(torch.utils.data, "get_worker_info", lambda: info):
        yield


def source_of(docs, kind, shards=4):
    ds = token_dataset(docs)
    return ds if kind == "map" else ds.to_iterable_dataset(num_shards=min(shards, len(docs)))


def docs_of_lengths(lengths):
    """Documents with these lengths whose tokens are unique (1, 2, 3, ...), so any loss or repeat shows."""
    ends = np.cumsum(lengths)
    return [list(range(e - k + 1, e + 1)) for e, k in zip(ends.tolist(), lengths)]


class Readers:
    """The readers of a (dp ranks x workers) topology, in this process; ``state`` is a run state or
    a list of reader states in reader order (rank-major, as :meth:`states` returns them)."""

    def __init__(self, make, dp, workers, state=None):
        self.readers = []
        for rank in range(dp):
            part = make().shard(dp, rank)
            for w in range(workers):
                ds = copy.copy(part)  # a worker gets its own copy; the source is only read
                with as_worker(w, workers):
                    if state is not None:
                        ds.load_state_dict(state if isinstance(state, dict) else state[len(self.readers)])
                    self.readers.append((ds, iter(ds)))
        self.done = set()

    def draw(self, n):
        """Up to ``n`` rows as (reader, row), readers taking turns; fewer once all are exhausted."""
        out = []
        while len(out) < n and len(self.done) < len(self.readers):
            for i, (_, it) in enumerate(self.readers):
                if i in self.done or len(out) == n:
                    continue
                row = next(it, None)
                if row is None:
                    self.done.add(i)
                else:
                    out.append((i, row))
        return out

    def pull(self, turns):
        """A row from reader ``t % len(readers)`` for each ``t`` in ``turns`` (none from a finished one):
        readers that run at different paces, as DataLoader workers do."""
        out = []
        for t in turns:
            i = t % len(self.readers)
            row = next(self.readers[i][1], None)
            if row is not None:
                out.append((i, row))
        return out

    def states(self):
        return [ds.state_dict() for ds, _ in self.readers]


def same_rows(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in y) for x, y in zip(a, b))


corpora = st.lists(st.integers(0, 40), min_size=1, max_size=30).filter(any)
turns = st.lists(st.integers(0, 8), max_size=16)  # which reader emits the next row
packings = st.builds(
    lambda S, algorithm, m: PackingConfig(S, algorithm=algorithm, cp_multiple=m),
    st.sampled_from([8, 16]), st.sampled_from(["bfd", "concat"]), st.sampled_from([None, 2, 4]),
)


@few_examples
@given(
    lengths=corpora, config=packings, buffer_size=st.integers(1, 7), carry_rows=st.integers(0, 3),
    kind=st.sampled_from(["map", "iterable"]), shards=st.integers(1, 5),
    chain=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), turns), min_size=1, max_size=4),
)
def test_resume_chains_across_topologies_emit_every_token_once(lengths, config, buffer_size, carry_rows,
                                                               kind, shards, chain):
    docs = docs_of_lengths(lengths)
    src = source_of(docs, kind, shards)

    def make():
        return PackedIterableDataset(src, config, buffer_size=buffer_size, carry_rows=carry_rows)

    units = make().source.num_units
    emitted, state = [], None
    for n, (dp, workers, steps) in enumerate(chain):
        readers = Readers(make, min(dp, units), workers, state)
        rows = readers.draw(10**9) if n == len(chain) - 1 else readers.pull(steps)
        emitted += [row for _, row in rows]
        state = stream_state(readers.states())
    for row in emitted:
        check_instance(row, config.seq_len)
    assert real_tokens(emitted) == sorted(t for d in docs for t in d)
    # the end stays the end, whoever resumes it
    assert Readers(make, 1, 2, state).draw(10**9) == []
    m = make().metrics(state)
    assert (m["rows"], m["tokens"], m["documents"]) == (len(emitted), sum(lengths), len(lengths))
    assert m["empty_docs_skipped"] == lengths.count(0)


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_every_save_point_of_a_reader_that_took_over_several_buffers(kind):
    # 3 readers -> 1 reader (it replays three handed buffers, carrying pieces from one to the
    # next) -> 2 readers, saved after every possible number of rows
    lengths = [5, 9, 3, 12, 7, 1, 6, 11, 4, 2, 8, 10, 3, 5, 9, 13, 2, 6]
    docs = docs_of_lengths(lengths)
    src = source_of(docs, kind, shards=6)

    def make():
        return PackedIterableDataset(src, PackingConfig(16, cp_multiple=2), buffer_size=3, carry_rows=2)

    first = Readers(make, 1, 3)
    head = [row for _, row in first.draw(3)]
    handed = stream_state(first.states())
    assert sum(len(h["queue"]) for h in handed["handover"]) == 3
    for k in range(0, 16):
        one = Readers(make, 1, 1, handed)
        middle = [row for _, row in one.draw(k)]
        rest = [row for _, row in Readers(make, 2, 1, stream_state(one.states())).draw(10**9)]
        assert real_tokens(head + middle + rest) == sorted(t for d in docs for t in d), k


@few_examples
@given(
    lengths=corpora, config=packings, buffer_size=st.integers(1, 7), carry_rows=st.integers(0, 3),
    kind=st.sampled_from(["map", "iterable"]), dp=st.integers(1, 2), workers=st.integers(1, 3),
    cuts=st.lists(turns, max_size=4), via_run=st.booleans(),
)
def test_resume_with_an_unchanged_topology_repeats_the_rows_bit_for_bit(lengths, config, buffer_size,
                                                                         carry_rows, kind, dp, workers,
                                                                         cuts, via_run):
    src = source_of(docs_of_lengths(lengths), kind)

    def make():
        return PackedIterableDataset(src, config, buffer_size=buffer_size, carry_rows=carry_rows)

    dp = min(dp, make().source.num_units)
    reference = collections.defaultdict(list)
    for i, row in Readers(make, dp, workers).draw(10**9):
        reference[i].append(row)
    got, state = collections.defaultdict(list), None
    for steps in cuts + [None]:
        readers = Readers(make, dp, workers, state)
        for i, row in readers.draw(10**9) if steps is None else readers.pull(steps):
            got[i].append(row)
        state = stream_state(readers.states()) if via_run else readers.states()
    assert sorted(got) == sorted(reference)
    assert all(same_rows(got[i], reference[i]) for i in reference)


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_a_stream_resumed_at_its_end_stays_at_its_end(kind):
    src = source_of([[1, 2, 3], [4, 5], [6]], kind, shards=1)
    a = PackedIterableDataset(src, 4)
    rows = iter(a)
    assert [next(rows)["input_ids"].tolist() for _ in range(2)] == [[1, 2, 3, 6], [4, 5, 0, 0]]
    after_last_row = a.state_dict()
    assert next(rows, None) is None
    for state in (after_last_row, a.state_dict()):  # saved before and after the stream said so
        b = PackedIterableDataset(src, 4)
        b.load_state_dict(state)
        assert list(b) == []
        c = PackedIterableDataset(src, 4)
        c.load_state_dict(b.state_dict())
        assert list(c) == []
        assert c.metrics()["rows"] == 2 and c.metrics()["fill_rate"] == 0.75
    assert [r["input_ids"].tolist() for r in c] == [[1, 2, 3, 6], [4, 5, 0, 0]]  # the next pass


def loader(src, nw, buffer_size=16, config=PackingConfig(32, cp_multiple=4)):
    ds = PackedIterableDataset(src, config, buffer_size=buffer_size, carry_rows=2)
    return StatefulDataLoader(ds, batch_size=3, num_workers=nw, collate_fn=list)


@pytest.mark.parametrize("nw", [0, 2])
@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_loader_resume_chain_is_exact(nw, kind):
    docs = make_docs()
    src = source_of(docs, kind)
    batches = list(loader(src, nw))
    full = [r for batch in batches for r in batch]
    assert real_tokens(full) == sorted(t for d in docs for t in d)
    for row in full:
        check_instance(row, 32)
        assert (row["doc_lens"] % 4 == 0).all()
    rows, state = [], loader(src, nw).state_dict()  # saved before the first batch
    # on to the middle, on to the last batch, then saved again at the end without a step; once
    # through the run state, which must give every worker its own rows back in the same order
    for take, via_run in ((5, False), (len(batches) - 5, True), (0, False)):
        dl = loader(src, nw)
        if via_run:
            load_stream_state(dl, stream_state(state))
        else:
            dl.load_state_dict(state)
        it = iter(dl)
        rows += [r for _, batch in zip(range(take), it) for r in batch]
        state = dl.state_dict()
    assert same_rows(rows, full)
    dl = loader(src, nw)
    dl.load_state_dict(state)
    assert list(dl) == []


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_loader_changes_worker_count_mid_run_and_reports_metrics():
    docs = make_docs(150)
    src = source_of(docs, "map")
    rows, state = [], None
    for nw, steps in ((2, 3), (3, 2), (0, 2), (2, 10**9)):
        dl = loader(src, nw, buffer_size=8)
        if state is not None:
            load_stream_state(dl, state)
        rows += [r for _, batch in zip(range(steps), dl) for r in batch]
        state = dl.state_dict()
    assert real_tokens(rows) == sorted(t for d in docs for t in d)
    again = loader(src, 0, buffer_size=8)
    load_stream_state(again, state)
    assert list(again) == []  # the end stays the end with another worker count
    m = again.dataset.metrics(state)
    assert (m["rows"], m["tokens"], m["documents"]) == (len(rows), sum(map(len, docs)), len(docs))
    assert m["fill_rate"] == sum(map(len, docs)) / (32 * len(rows))


def test_iterable_source_moves_from_two_workers_to_one():
    docs = make_docs(100)
    src = source_of(docs, "iterable", shards=5)
    dl = loader(src, 2, buffer_size=8)
    rows = [r for _, batch in zip(range(4), dl) for r in batch]
    run = json.loads(json.dumps(stream_state(dl.state_dict())))  # JSON-safe, shard positions included
    one = loader(src, 1, buffer_size=8)
    load_stream_state(one, run)
    rows += [r for batch in one for r in batch]
    assert real_tokens(rows) == sorted(t for d in docs for t in d)


def test_data_parallel_resize_through_the_loader_config():
    docs = make_docs(160)
    src = source_of(docs, "map")
    stream = PackedIterableDataset(src, PackingConfig(16), buffer_size=8)
    cfg = ContextParallelLoaderConfig(batch_size=2, load_balancer="ulysses", drop_last=False)

    def build(rank, dp):
        return cfg.build(stream, dp_rank=rank, dp_world_size=dp, cp_rank=0, cp_world_size=1)

    tokens = []
    loaders = [build(r, 2) for r in range(2)]
    for dl in loaders:  # loader.build splits the stream with PackedIterableDataset.shard
        tokens += [t for _, b in zip(range(3), dl) for t in b["input_ids"].flatten().tolist()]
    run = stream_state([dl.state_dict() for dl in loaders])
    assert run == stream_state([dl.state_dict() for dl in reversed(loaders)])  # same on every rank
    for rank in range(3):
        dl = build(rank, 3)
        load_stream_state(dl, run)
        tokens += [t for b in dl for t in b["input_ids"].flatten().tolist()]
    assert sorted(t for t in tokens if t) == sorted(t for d in docs for t in d)  # 0 is padding


def test_resume_errors_say_why():
    src = source_of(make_docs(80), "map")
    stream = PackedIterableDataset(src, 16, buffer_size=8)
    states = Readers(lambda: stream, 2, 1).states()
    with pytest.raises(ValueError, match=r"readers \[0\] of 2 .*every data-parallel rank"):
        stream_state(states[:1])
    with pytest.raises(ValueError, match="belongs to reader 0 of 2.*stream_state"):
        Readers(lambda: stream, 3, 1, [states[0]] * 3)
    with pytest.raises(ValueError, match="another stream.*buffer_size=8 vs 4"):
        PackedIterableDataset(src, 16, buffer_size=4).load_state_dict(states[0])
    with pytest.raises(ValueError, match=r"cannot split 10 blocks of Dataset .* over 11 data-parallel ranks"):
        stream.shard(11, 0)
    # a source split per rank before packing: each rank's stream is its own, they cannot be folded
    parts = [PackedIterableDataset(src.shard(num_shards=2, index=r), 16, buffer_size=8) for r in range(2)]
    with pytest.raises(ValueError, match="different streams.*PackedIterableDataset.shard"):
        stream_state([p.state_dict() for p in parts])
    dl = StatefulDataLoader(stream, batch_size=1, num_workers=0, collate_fn=list)
    with pytest.raises(ValueError, match=r"not a packed stream or loader state"):
        stream_state({"epoch": 0})
    state = {"_snapshot": {}, "_steps_since_snapshot": 2, "_iterator_finished": False}
    with pytest.raises(ValueError, match="2 steps after the loader's last snapshot"):
        load_stream_state(dl, state)


def test_stream_source_errors_and_empty_streams():
    unknown = datasets.Dataset.from_dict({"text": [[1, 2]]}).to_iterable_dataset().map(lambda e: e)
    assert unknown.column_names is None  # only the examples can tell that the column is missing
    with pytest.raises(ValueError, match=r"column 'input_ids' not found; examples have columns \['text'\]"):
        list(PackedIterableDataset(unknown, 8))
    negative = source_of([[1, 2], [3], [4, -5, 6]], "iterable", shards=3)
    with pytest.raises(ValueError, match=r"shard 2: document 0 holds the negative token id -5;"):
        list(PackedIterableDataset(negative, 8))
    empty = source_of([[1]], "iterable", shards=1).filter(lambda e: False)
    stream = PackedIterableDataset(empty, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(stream) == []
    assert [str(w.message) for w in caught] == [
        "the stream source (IterableDataset with columns ['input_ids']) yielded no documents"
    ]


@pytest.mark.parametrize("kind, shards", [("map", 0), ("iterable", 4), ("iterable", 3)])
def test_sources_split_by_node_before_packing(kind, shards):
    # 4 shards over 2 nodes: split by shards; 3 shards: by examples (each node reads its whole stream)
    docs = make_docs(150)
    src = source_of(docs, kind, shards)
    tokens, states = [], []
    for rank in range(2):
        node = split_dataset_by_node(src, rank=rank, world_size=2)

        def make():
            return PackedIterableDataset(node, PackingConfig(24), buffer_size=8)

        head = Readers(make, 1, 2)  # two workers, then three: a worker-count change within a node
        tokens += real_tokens([row for _, row in head.pull([0, 1, 1, 0, 1])])
        states.append(head.states())
        tokens += real_tokens([row for _, row in Readers(make, 1, 3, stream_state(states[-1])).draw(10**9)])
    assert sorted(tokens) == sorted(t for d in docs for t in d)
    with pytest.raises(ValueError, match="different streams"):  # not across nodes
        stream_state(states[0] + states[1])
