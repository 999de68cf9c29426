"""PackedIterableDataset resumes exactly at every row, buffer boundaries and the very end included.

Only the public ``state_dict`` / ``load_state_dict`` API: a stream stopped after any number of
rows and resumed from its state emits exactly the rows an uninterrupted stream emits next, and a
resumed stream saved and resumed again (a chain) does too.
"""

from dataclasses import dataclass, field

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_data.datasets import PackedIterableDataset
from cp_data.packing import PackingConfig
from hypothesis_profiles import few_examples


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def rows_of(stream):
    """Every row the stream emits, as plain lists to compare by value."""
    return [{k: v.tolist() for k, v in row.items()} for row in stream]


def take(stream, count):
    """The first ``count`` rows; the stream stays suspended after the last one."""
    it = iter(stream)
    return [{k: v.tolist() for k, v in next(it).items()} for _ in range(count)]


@dataclass
class Stream:
    """A document source and the options of the streams to build over it."""

    lengths: list[int]
    seq_len: int
    algorithm: str
    cp_multiple: int | None
    buffer_size: int
    carry_rows: int
    num_shards: int | None  # a datasets.IterableDataset of that many shards; None: a map-style Dataset
    source: object = field(init=False, repr=False)

    def __post_init__(self):
        docs = [list(range(1000 * i + 1, 1000 * i + 1 + n)) for i, n in enumerate(self.lengths)]
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
        self.source = datasets.Dataset.from_dict({"input_ids": docs}, features=features)
        if self.num_shards is not None:
            self.source = self.source.to_iterable_dataset(num_shards=self.num_shards)

    def make(self) -> PackedIterableDataset:
        config = PackingConfig(self.seq_len, algorithm=self.algorithm, cp_multiple=self.cp_multiple)
        return PackedIterableDataset(
            self.source, config, buffer_size=self.buffer_size, carry_rows=self.carry_rows
        )


@st.composite
def streams(draw):
    seq_len = draw(st.integers(4, 12))
    lengths = draw(st.lists(st.integers(0, 2 * seq_len), min_size=1, max_size=14).filter(any))  # some tokens
    return Stream(
        lengths,
        seq_len,
        algorithm=draw(st.sampled_from(["bfd", "concat"])),
        cp_multiple=draw(st.sampled_from([None, 2])) if seq_len % 2 == 0 else None,
        buffer_size=draw(st.integers(1, 5)),
        carry_rows=draw(st.integers(0, 3)),
        num_shards=draw(st.none() | st.integers(1, min(3, len(lengths)))),
    )


@few_examples
@given(streams())
def test_resume_after_every_row(stream):
    whole = stream.make()
    full = rows_of(whole)
    for stop in range(len(full) + 1):
        first = stream.make()
        head = take(first, stop)
        resumed = stream.make()
        resumed.load_state_dict(first.state_dict())
        assert head + rows_of(resumed) == full, stop
        assert resumed.metrics() == whole.metrics(), stop


@few_examples
@given(streams(), st.data())
def test_chained_resume_after_every_row(stream, data):
    full = rows_of(stream.make())
    for stop in range(len(full) + 1):
        first = stream.make()
        head = take(first, stop)
        second = stream.make()
        second.load_state_dict(first.state_dict())
        more = data.draw(st.integers(0, len(full) - stop), label="rows before the second save")
        # Taking every remaining row ends the stream: its state must still say nothing is left.
        middle = rows_of(second) if more == len(full) - stop else take(second, more)
        third = stream.make()
        third.load_state_dict(second.state_dict())
        assert head + middle + rows_of(third) == full, (stop, more)
