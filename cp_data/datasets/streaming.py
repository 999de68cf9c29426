"""Streaming packed dataset: a bounded buffer of documents packed as they arrive, resumable exactly."""

from __future__ import annotations

import copy
import warnings
from typing import Iterator, Optional, Sequence, Union

import datasets
import numpy as np
import torch

from cp_data.balancers.validation import is_int
from cp_data.packing import PackingConfig, PackingPlan, assemble_row
from cp_data.packing.plan import fill_rates

from .packed import as_config, to_instance
from .stream_sources import DocumentBlocks, StreamShards
from .stream_state import (
    READER,
    RUN,
    check_reader,
    fresh_start,
    reader_share,
    reader_state,
    sequence_entry,
    sequence_length,
    stream_state,
)

__all__ = ["PackedIterableDataset"]


class PackedIterableDataset(torch.utils.data.IterableDataset):
    """Packed rows from a stream of documents, for ``DataLoader`` / ``StatefulDataLoader``.

    ``source`` is a HF ``Dataset`` or a token-file source from ``open_token_files`` (read in
    blocks of ``buffer_size`` documents) or a HF
    ``IterableDataset`` (read shard by shard). Blocks or shards are dealt in turn to the readers:
    every DataLoader worker of every data-parallel rank (see :meth:`shard`). A reader packs
    ``buffer_size`` documents at a time with ``config`` and emits the rows; up to ``carry_rows`` of
    the least-filled rows go back into its next buffer instead (all rows come out at the end), so
    its state stays bounded. Each item is a packed instance: ``input_ids`` int64 [S], ``doc_lens``
    int64 (lengths of the documents in the row, > 0, summing to S; trailing padding counts as one
    document) and ``label_mask`` bool [S] (False on padding).

    Resume: ``state_dict()`` is the reader's position (where it stands in the source, the buffers
    it still has to emit and how many rows of the first are out, the pieces it carries, its
    counts); loading re-reads and re-packs that buffer and continues at the exact next row, and
    saving again at any point (the very end included) describes what is left. A run saved with
    one worker count or data-parallel size resumes with another through
    :func:`~cp_data.datasets.stream_state` and :func:`~cp_data.datasets.load_stream_state`:
    every document token still comes out exactly once. Exact resume needs a source that reads
    the same documents again (HF shuffle buffers are not saved by ``datasets``: shuffle before
    streaming, or use a map-style source).
    """

    def __init__(
        self,
        source: Union[datasets.Dataset, datasets.IterableDataset],
        config: Union[PackingConfig, int],
        column: str = "input_ids",
        buffer_size: int = 1024,
        carry_rows: int = 4,
    ) -> None:
        if not is_int(buffer_size) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not is_int(carry_rows) or carry_rows < 0:
            raise ValueError(f"carry_rows must be an integer >= 0, got {carry_rows!r}")
        self.config = as_config(config)
        self.packer = self.config.build()
        self.column = column
        self.buffer_size = buffer_size
        self.carry_rows = carry_rows
        if isinstance(source, datasets.IterableDataset):
            self.source: Union[DocumentBlocks, StreamShards] = StreamShards(source, column)
            self.stream: Optional[datasets.IterableDataset] = source
        else:
            self.source, self.stream = DocumentBlocks(source, column, buffer_size), None
        self._epoch = 0
        c = self.config
        self.fingerprint = {
            "seq_len": c.seq_len, "algorithm": c.algorithm, "long_docs": c.long_docs,
            "cp_multiple": c.cp_multiple, "pad_token_id": c.pad_token_id, "column": column,
            "buffer_size": buffer_size, "carry_rows": carry_rows, "units": self.source.num_units,
            "source": self.source.fingerprint(),
        }
        self.dp_rank, self.dp_world_size = 0, 1
        self._resume: Optional[dict] = None
        self._reader: Optional[_Reader] = None

    def shard(self, num_shards: int, index: int) -> "PackedIterableDataset":
        """This stream's part for data-parallel rank ``index`` of ``num_shards``.

        The ranks' readers share one dealing of the source's blocks or shards, so a run can later
        resume at another data-parallel size. The loader calls this for you
        (``ContextParallelLoaderConfig(split_iterable=True)``).
        """
        if not is_int(num_shards) or num_shards < 1 or not is_int(index) or not 0 <= index < num_shards:
            raise ValueError(f"need 0 <= index < num_shards, got index={index!r}, num_shards={num_shards!r}")
        if num_shards > self.source.num_units:
            raise ValueError(
                f"cannot split {self.source.num_units} {'blocks' if self.stream is None else 'shards'} of "
                f"{self.source.description} over {num_shards} data-parallel ranks: some would get nothing"
                + (" (use a smaller buffer_size)" if self.stream is None else "")
            )
        part = copy.copy(self)
        part.dp_rank, part.dp_world_size = int(index), int(num_shards)
        part._resume = part._reader = None
        return part

    @property
    def epoch(self) -> int:
        """The epoch of the next pass: a HF ``IterableDataset`` source's own, else the one set here."""
        return self.stream.epoch if self.stream is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next pass (forwarded to a HF ``IterableDataset``: its shuffling uses it)."""
        self._epoch = int(epoch)
        if self.stream is not None:
            self.stream.set_epoch(self._epoch)

    def _reader_index(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker * self.dp_world_size + self.dp_rank, workers * self.dp_world_size

    def _reader_state(self, state: Optional[dict]) -> dict:
        """This reader's state for ``state`` (its own, a run's, or none: the start of the pass)."""
        reader, readers = self._reader_index()
        if state is None:
            header = {"config": self.fingerprint, "epoch": self.epoch}
            return reader_state(header, fresh_start(), reader, readers, self.dp_world_size)
        if state["stream"] == RUN:
            return reader_share(state, reader, readers, self.dp_world_size)
        check_reader(state, reader, readers)
        return copy.deepcopy(state)

    def state_dict(self) -> dict:
        """This reader's position: where it stands in the source and what it has still to emit."""
        if self._resume is not None:  # loaded, not started yet
            return self._reader_state(self._resume)
        if self._reader is not None:  # during a pass, or after it ended
            return self._reader.state()
        return self._reader_state(None)

    def load_state_dict(self, state: dict) -> None:
        """Resume the next pass where ``state`` (a reader's or a run's) was taken."""
        if not isinstance(state, dict) or state.get("stream") not in (READER, RUN):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a PackedIterableDataset state (keys {keys})")
        saved = state.get("config") or {}
        differ = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if differ:
            raise ValueError(
                "the state was saved by another stream: (saved, this one) differ in "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in differ.items())
            )
        self._reader_state(state)  # a state of another reader fails here, not mid-pass
        self._resume = copy.deepcopy(state)
        self.set_epoch(state["epoch"])

    def metrics(self, states: Union[dict, Sequence[dict], None] = None) -> dict:
        """Counts of the run so far, plus fill rate and padding fraction of the rows emitted.

        Without an argument: this process's stream (a run without DataLoader workers on one rank).
        With workers the rows are made in the workers, so pass ``loader.state_dict()`` (or the
        loader states of all data-parallel ranks, or a :func:`stream_state`).
        """
        counts = stream_state(self.state_dict() if states is None else states)["start"]["counters"]
        return {**counts, **fill_rates(counts["tokens"], counts["rows"], self.config.seq_len)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        state, self._resume = self._reader_state(self._resume), None
        self._reader = _Reader(self, state)
        return self._reader.rows()


class _Reader:
    """One reader's pass. Its state is derived from where it stands (see ``state``)."""

    def __init__(self, ds: PackedIterableDataset, state: dict) -> None:
        self.ds, self.source = ds, ds.source
        self.fixed = {k: state[k] for k in ("stream", "config", "epoch", "readers", "reader", "dp", "start")}
        start = state["start"]
        self.start, self.length = start, sequence_length(start, ds.source.num_units)
        self.position = list(state["position"])
        self.queue = [dict(b) for b in state["queue"]]
        self.carry = list(state["carry"])
        self.counters = dict(state["counters"])
        self.from_start = state["position"] == [state["reader"], None] and start == fresh_start()
        self.cursor = None
        self.opened = self.docs_read = 0

    def state(self) -> dict:
        """Where this reader stands: what ``PackedIterableDataset.state_dict`` returns."""
        return {**copy.deepcopy(self.fixed), "position": copy.deepcopy(self.position),
                "queue": [dict(b) for b in self.queue], "carry": list(self.carry), "counters": dict(self.counters)}

    def _open(self) -> bool:
        """Open the unit at this reader's position (skipping holes); False when none is left."""
        if self.cursor is not None:
            return True
        step = self.fixed["readers"]
        j, offset = self.position
        while j < self.length and sequence_entry(self.start, j) is None:
            j, offset = j + step, None
        if j >= self.length:
            self.position = [j, None]
            return False
        unit, done, source_state = sequence_entry(self.start, j)
        offset = offset or [done, source_state]
        self.position, self.unit = [j, offset], unit
        self.cursor = self.source.open(unit, offset, self.fixed["epoch"])
        self.opened += 1
        return True

    def _read(self) -> Optional[list]:
        """Read the next buffer into the queue and return its items; None when nothing is left."""
        docs, segments, need = [], [], self.ds.buffer_size
        while need and self._open():
            done, source_state = self.position[1]
            got = self.cursor.take(need)
            if got:
                segments.append([self.unit, done, source_state, len(got)])
            docs += got
            need -= len(got)
            if need:  # the unit ran out: on to this reader's next entry
                self.position, self.cursor = [self.position[0] + self.fixed["readers"], None], None
            else:
                self.position = [self.position[0], self.cursor.position()]
        if not docs and not self.carry:
            return None
        self.queue.append({"segments": segments, "carry": self.carry, "emitted": 0})
        items = [self.source.item(p) for p in self.carry] + docs
        self.carry = []
        self.counters["documents"] += len(docs)
        self.docs_read += len(docs)
        return items

    def _replay(self, buf: dict) -> list:
        """The items of a saved buffer, read again."""
        items = [self.source.item(p) for p in buf["carry"]]
        for unit, done, source_state, count in buf["segments"]:
            got = self.source.open(unit, [done, source_state], self.fixed["epoch"]).take(count)
            if len(got) != count:
                raise ValueError(
                    f"the source changed since the state was saved: unit {unit} of {self.source.description} "
                    f"holds {len(got)} documents after document {done}, the state read {count}"
                )
            items += got
        return items

    def _select(self, plan: PackingPlan, final: bool) -> tuple[np.ndarray, np.ndarray]:
        """Rows to emit now (in plan order) and rows to carry into the next buffer."""
        carry_rows = self.ds.carry_rows
        if final or not carry_rows:
            return np.arange(plan.num_rows), np.zeros(0, dtype=np.int64)
        used = plan.row_used()
        partial = np.flatnonzero(used < plan.seq_len)
        carry = partial[np.argsort(used[partial], kind="stable")[:carry_rows]]
        keep = np.ones(plan.num_rows, dtype=bool)
        keep[carry] = False
        return np.flatnonzero(keep), np.sort(carry)

    def _count_plan(self, plan: PackingPlan) -> None:
        c = self.counters
        c["empty_docs_skipped"] += plan.empty_docs
        c["docs_split"] += plan.split_docs
        c["docs_truncated"] += plan.truncated_docs
        c["tokens_truncated"] += plan.truncated_tokens

    def rows(self) -> Iterator[dict[str, torch.Tensor]]:
        source, pad_id = self.source, self.ds.config.pad_token_id
        while True:
            fresh = not self.queue
            items = self._read() if fresh else self._replay(self.queue[0])
            if items is None:
                self._warn_if_empty()
                return
            buf = self.queue[0]
            lengths = np.fromiter(map(source.length, items), dtype=np.int64, count=len(items))
            plan = self.ds.packer.plan(lengths)
            if fresh:  # a replayed buffer was counted when it was first read
                self._count_plan(plan)
            final = sum(s[3] for s in buf["segments"]) < self.ds.buffer_size
            emit, carried = self._select(plan, final)

            def tokens_of(d: int, s: int, n: int) -> np.ndarray:
                return source.tokens(items[d], s, n)

            for k in range(buf["emitted"], emit.size):
                r = int(emit[k])
                row = assemble_row(plan, r, tokens_of, pad_id)
                buf["emitted"] = k + 1
                self.counters["rows"] += 1
                self.counters["tokens"] += int(plan.length[plan.row_offsets[r] : plan.row_offsets[r + 1]].sum())
                yield to_instance(row)
            piece_row = np.repeat(np.arange(plan.num_rows), np.diff(plan.row_offsets))
            pieces = np.flatnonzero(np.isin(piece_row, carried))
            self.carry = self.carry + [
                source.piece(items[d], s, n)
                for d, s, n in zip(plan.doc[pieces].tolist(), plan.start[pieces].tolist(), plan.length[pieces].tolist())
            ]
            self.queue.pop(0)

    def _warn_if_empty(self) -> None:
        if self.from_start and self.opened and not self.docs_read:
            who = "" if self.fixed["readers"] == 1 else f" for reader {self.fixed['reader']} of {self.fixed['readers']}"
            warnings.warn(f"the stream source ({self.source.description}) yielded no documents{who}", stacklevel=2)
