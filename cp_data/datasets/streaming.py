"""Streaming packed dataset: a bounded buffer of documents packed as they arrive, resumable exactly."""

from __future__ import annotations

import copy
from typing import Iterator, Optional, Union

import datasets
import numpy as np
import torch

from cp_data.packing import PackingConfig, PackingPlan, assemble_row
from cp_data.packing.plan import fill_rates

from .packed import as_config, open_store, to_instance
from .store import TokenStore, check_column

__all__ = ["PackedIterableDataset"]

_COUNTERS = ("documents", "empty_docs_skipped", "docs_split", "docs_truncated", "tokens_truncated",
             "rows", "tokens")


def _fresh_state() -> dict:
    """The state of a stream that has emitted nothing yet."""
    return {"source": None, "carry": [], "emitted": 0, "counters": dict.fromkeys(_COUNTERS, 0)}


class _ArrowReader:
    """Documents ``worker, worker + num_workers, ...`` of a map-style HF dataset."""

    def __init__(self, store: TokenStore, worker: int, num_workers: int, state: Optional[dict]):
        self.store = store
        self.docs = np.arange(worker, len(store), num_workers)
        self.pos = state["position"] if state else 0

    def state(self) -> dict:
        return {"position": self.pos}

    def read(self, k: int) -> list[np.ndarray]:
        idx = self.docs[self.pos : self.pos + k].tolist()
        self.pos += len(idx)
        return [self.store.tokens(d) for d in idx]


class _StreamReader:
    """Documents of a HF ``IterableDataset``; it splits itself across DataLoader workers and nodes."""

    def __init__(self, source: datasets.IterableDataset, column: str, state: Optional[dict]):
        # a new dataset object per pass: loading a state into the user's one would stick to it
        self.source = source.select_columns([column])
        self.source.set_epoch(source.epoch)
        if state is not None:
            self.source.load_state_dict(state)
        self.column = column
        self.start_state = state
        self.it = None

    def state(self) -> Optional[dict]:
        # before the first example the generator has not set up its state yet
        return self.start_state if self.it is None else self.source.state_dict()

    def read(self, k: int) -> list[np.ndarray]:
        if self.it is None:
            self.it = iter(self.source)
        out = []
        for example in self.it:
            if self.column not in example:
                raise ValueError(
                    f"column {self.column!r} not found; examples have columns {sorted(example)}"
                )
            tokens = np.asarray(example[self.column] if example[self.column] is not None else [])
            if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(
                    f"column {self.column!r} must hold integer token ids, got dtype {tokens.dtype}"
                )
            out.append(tokens.astype(np.int64, copy=False).reshape(-1))
            if len(out) == k:
                break
        return out


class PackedIterableDataset(torch.utils.data.IterableDataset):
    """Packed rows from a stream of documents, for ``DataLoader`` / ``StatefulDataLoader``.

    ``source`` is a HF ``Dataset`` (documents are dealt to DataLoader workers round-robin) or a HF
    ``IterableDataset`` (which splits itself by shards across workers, and across nodes after
    ``datasets.distributed.split_dataset_by_node``). ``buffer_size`` documents are read, packed
    with ``config`` and emitted; up to ``carry_rows`` of the least-filled rows go back into the
    next buffer instead (all rows are emitted at the end of the stream), so state stays bounded.

    ``state_dict()`` holds the source position at the start of the current buffer, the carried
    tokens, and the rows already emitted from it; ``load_state_dict`` re-reads that one buffer and
    resumes at the exact next row.
    """

    def __init__(
        self,
        source: Union[datasets.Dataset, datasets.IterableDataset],
        config: Union[PackingConfig, int],
        column: str = "input_ids",
        buffer_size: int = 1024,
        carry_rows: int = 4,
    ) -> None:
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not isinstance(carry_rows, int) or carry_rows < 0:
            raise ValueError(f"carry_rows must be an integer >= 0, got {carry_rows!r}")
        self.config = as_config(config)
        self.packer = self.config.build()
        self.column = column
        self.buffer_size = buffer_size
        self.carry_rows = carry_rows
        if isinstance(source, datasets.Dataset):
            self.store: Optional[TokenStore] = open_store(source, column)
            self.source = None
        elif isinstance(source, datasets.IterableDataset):
            if source.column_names is not None:
                check_column(source, column)
            self.store, self.source = None, source
        else:
            raise ValueError(
                f"source must be a datasets.Dataset or datasets.IterableDataset, got {type(source)}"
            )
        self._resume: Optional[dict] = None
        self._snapshot: Optional[dict] = None
        self.counters = dict.fromkeys(_COUNTERS, 0)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to a HF ``IterableDataset`` source (its shuffling depends on it)."""
        if self.source is not None:
            self.source.set_epoch(epoch)

    def state_dict(self) -> dict:
        """Position to resume from: the next row of this worker's stream."""
        if self._resume is not None:  # loaded but not started yet
            return copy.deepcopy(self._resume)
        if self._snapshot is None:  # never iterated
            return _fresh_state()
        return copy.deepcopy(self._snapshot)

    def load_state_dict(self, state: dict) -> None:
        """Resume the next iteration exactly where ``state`` was taken."""
        missing = set(_fresh_state()) - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        self._resume = copy.deepcopy(state)

    def metrics(self) -> dict:
        """Counts of this worker's current pass, plus fill rate and padding fraction."""
        c = self.counters
        return {**c, **fill_rates(c["tokens"], c["rows"], self.config.seq_len)}

    def _reader(self, source_state: Optional[dict]):
        info = torch.utils.data.get_worker_info()
        if self.store is not None:
            worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
            return _ArrowReader(self.store, worker, num_workers, source_state)
        return _StreamReader(self.source, self.column, source_state)

    def _select(self, plan: PackingPlan, final: bool) -> tuple[np.ndarray, np.ndarray]:
        """Rows to emit now (in plan order) and rows to carry into the next buffer."""
        if final or not self.carry_rows:
            return np.arange(plan.num_rows), np.zeros(0, dtype=np.int64)
        used = plan.row_used()
        partial = np.flatnonzero(used < plan.seq_len)
        carry = partial[np.argsort(used[partial], kind="stable")[: self.carry_rows]]
        keep = np.ones(plan.num_rows, dtype=bool)
        keep[carry] = False
        return np.flatnonzero(keep), np.sort(carry)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        state, self._resume = self._resume, None
        if state is None:
            state = _fresh_state()
        reader = self._reader(state["source"])
        carry = [np.asarray(c, dtype=np.int64) for c in state["carry"]]
        skip = state["emitted"]
        self.counters = dict(state["counters"])
        S, pad_id = self.config.seq_len, self.config.pad_token_id
        while True:
            self._snapshot = {
                "source": reader.state(),
                "carry": [c.tolist() for c in carry],
                "emitted": 0,
                "counters": dict(self.counters),
            }
            docs = reader.read(self.buffer_size)
            final = len(docs) < self.buffer_size
            buf = carry + docs
            if not buf:
                return
            plan = self.packer.plan(np.fromiter(map(len, buf), dtype=np.int64, count=len(buf)))
            c = self.counters
            c["documents"] += len(docs)
            c["empty_docs_skipped"] += plan.empty_docs
            c["docs_split"] += plan.split_docs  # carried pieces are <= S: never split twice
            c["docs_truncated"] += plan.truncated_docs
            c["tokens_truncated"] += plan.truncated_tokens
            emit, carried = self._select(plan, final)
            piece_row = np.repeat(np.arange(plan.num_rows), np.diff(plan.row_offsets))
            pieces = np.flatnonzero(np.isin(piece_row, carried))
            carry = [
                buf[d][s : s + n]
                for d, s, n in zip(
                    plan.doc[pieces].tolist(), plan.start[pieces].tolist(), plan.length[pieces].tolist()
                )
            ]

            def tokens_of(d: int, s: int, n: int) -> np.ndarray:
                return buf[d][s : s + n]

            for k, r in enumerate(emit.tolist()):
                a, b = plan.row_offsets[r], plan.row_offsets[r + 1]
                c["rows"] += 1
                c["tokens"] += int(plan.length[a:b].sum())
                if k < skip:  # replaying a resumed buffer up to the saved row
                    continue
                self._snapshot["emitted"] = k + 1
                yield to_instance(assemble_row(plan, r, tokens_of, pad_id))
            skip = 0
            if final:
                return
