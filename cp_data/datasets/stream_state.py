"""Positions of a packed stream: one reader's, a whole run's, and a StatefulDataLoader's.

A pass over the source is dealt to R readers (DataLoader workers x data-parallel ranks; reader
``worker * dp_world_size + dp_rank``). The units (blocks of documents, or shards) form one
sequence; reader r reads entries r, r + R, r + 2R, ... in order, ``buffer_size`` documents at a
time. An entry is ``[unit, documents already read, source state]``, or ``None`` when its
documents are gone (a hole).

- A **reader state** is what one reader saves: the sequence its pass started from (``start``:
  explicit entries ``units``, then units ``frontier, frontier + 1, ...``, and the counts so far),
  its position ``[entry index, offset in that entry]``, the buffers it still has to emit (the one
  in progress first; ``emitted`` rows of it are out), the pieces it carries into its next buffer,
  and its own counts. Everything else is rebuilt on load by re-reading and re-packing.
- A **run state** (:func:`stream_state`) folds the reader states of a whole run into one new
  sequence of what nobody has read, plus the buffers and pieces each reader hands over. Reader r
  of any R takes the handed work of old readers r, r + R, ... and entries r, r + R, ... of the
  sequence, so every document token comes out exactly once; with the same R each reader takes
  exactly its old work and the rows repeat bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import torch
from torchdata.stateful_dataloader.incremental_state import (
    _DATASET_ITER_STATE,
    _DATASET_STATE,
    _FETCHER_ENDED,
    _FETCHER_STATE,
    _WORKER_ID,
)
from torchdata.stateful_dataloader.stateful_dataloader import (
    _INDEX_SAMPLER_STATE,
    _ITERABLEDATASET_LEN_CALLED,
    _ITERATOR_FINISHED,
    _SAMPLER_ITER_STATE,
    _SAMPLER_ITER_YIELDED,
    _SHARED_SEED,
)
from torchdata.stateful_dataloader.stateful_dataloader import _StatefulMultiProcessingDataLoaderIter as _Multi
from torchdata.stateful_dataloader.stateful_dataloader import _StatefulSingleProcessDataLoaderIter as _Single

__all__ = ["load_stream_state", "stream_state"]

COUNTERS = ("documents", "empty_docs_skipped", "docs_split", "docs_truncated", "tokens_truncated",
            "rows", "tokens")
READER, RUN = "reader", "run"
_CHANGE = ("to change the worker count or the data-parallel size, fold the saved states of all ranks "
           "with cp_data.datasets.stream_state and load the result with load_stream_state")


def zero_counts() -> dict:
    return dict.fromkeys(COUNTERS, 0)


def fresh_start() -> dict:
    """The sequence of a pass that starts at the beginning: every unit, in order."""
    return {"units": [], "frontier": 0, "counters": zero_counts()}


def sequence_length(start: dict, num_units: int) -> int:
    return len(start["units"]) + num_units - start["frontier"]


def sequence_entry(start: dict, i: int) -> Optional[list]:
    """Entry ``i`` of a pass's sequence: ``[unit, documents read, source state]`` or ``None``."""
    units = start["units"]
    return units[i] if i < len(units) else [start["frontier"] + i - len(units), 0, None]


def reader_state(header: dict, start: dict, reader: int, readers: int, dp: int, queue=(), carry=()) -> dict:
    """A reader at the beginning of its share of ``start``."""
    return {"stream": READER, **header, "readers": readers, "reader": reader, "dp": dp, "start": start,
            "position": [reader, None], "queue": list(queue), "carry": list(carry),
            "counters": zero_counts()}


def _check_same(states: Sequence[dict], keys: Sequence[str], why: str) -> None:
    for s in states[1:]:
        differ = [k for k in keys if s[k] != states[0][k]]
        if differ:
            raise ValueError(f"the states differ in {differ}: {why}")


def fold(states: Sequence[dict]) -> dict:
    """The run state of one pass from the states of all its readers."""
    _check_same(states, ["config"], "they come from different streams (a source split per rank before "
                "packing cannot move between ranks: pass the whole source and split it with "
                "PackedIterableDataset.shard, as the loader does)")
    _check_same(states, ["epoch", "readers", "dp", "start"], "save every rank at the same step")
    first = states[0]
    R = first["readers"]
    by_reader = {s["reader"]: s for s in states}
    if len(by_reader) != len(states) or set(by_reader) != set(range(R)):
        have = sorted(s["reader"] for s in states)
        raise ValueError(
            f"the states are readers {have} of {R} (dp={first['dp']} ranks x {R // first['dp']} workers): "
            "pass the loader states of every data-parallel rank, once each"
        )
    start = first["start"]
    num_units = first["config"]["units"]
    positions = [by_reader[r]["position"] for r in range(R)]
    at = [j for j, _ in positions]
    lo = min(at) // R * R  # whole rounds only, so every entry keeps its reader
    hi = max(len(start["units"]), min(sequence_length(start, num_units), max(at) + 1))
    units = []
    for i in range(lo, hi):
        j, offset = positions[i % R]
        entry = sequence_entry(start, i)
        if i < j:
            units.append(None)
        elif i == j and offset is not None and entry is not None:
            units.append([entry[0], *offset])
        else:
            units.append(entry)
    frontier = start["frontier"] + max(0, hi - len(start["units"]))
    while units and units[-1] == [frontier - 1, 0, None]:  # an untouched tail folds back
        units.pop()
        frontier -= 1
    counters = dict(start["counters"])
    for s in states:
        for k in COUNTERS:
            counters[k] += s["counters"][k]
    return {
        "stream": RUN, "config": first["config"], "epoch": first["epoch"],
        "start": {"units": units, "frontier": frontier, "counters": counters},
        "handover": [{"queue": by_reader[r]["queue"], "carry": by_reader[r]["carry"]} for r in range(R)],
        "readers": R, "dp": first["dp"], "last_worker": [None] * first["dp"],
    }


def reader_share(run: dict, reader: int, readers: int, dp: int) -> dict:
    """Reader ``reader`` of ``readers``'s state at the beginning of its share of ``run``."""
    start = run["start"]
    handover = run["handover"]
    if len(handover) != readers:  # new dealing: holes only skew it
        start = {**start, "units": [u for u in start["units"] if u is not None]}
    mine = handover[reader :: readers]
    return reader_state(
        {"config": run["config"], "epoch": run["epoch"]}, start, reader, readers, dp,
        queue=[b for h in mine for b in h["queue"]], carry=[p for h in mine for p in h["carry"]],
    )


def _loader_parts(state: dict) -> tuple[list[dict], Optional[int], int]:
    """The reader states in a StatefulDataLoader state, its last worker and its worker count."""
    if _Multi._SNAPSHOT in state:
        if state[_Multi._STEPS_SINCE_SNAPSHOT]:
            raise ValueError(
                f"this loader state was taken {state[_Multi._STEPS_SINCE_SNAPSHOT]} steps after the "
                "loader's last snapshot, so its workers' positions are stale; save with "
                "snapshot_every_n_steps=1 to move it to another topology"
            )
        snap = state[_Multi._SNAPSHOT]
        workers = snap[_Multi._WORKER_SNAPSHOTS]
        states = [w[_DATASET_STATE] for w in workers.values()]
        return states, snap[_Multi._LAST_YIELDED_WORKER_ID], len(workers)
    return [state[_DATASET_STATE]], None, 0


def _is_stream(state: Any) -> bool:
    return isinstance(state, dict) and state.get("stream") in (READER, RUN)


def stream_state(states: Union[dict, Sequence[dict]]) -> dict:
    """The whole run's position, from what every data-parallel rank saved; JSON-safe.

    ``states`` is one state or a list: ``StatefulDataLoader.state_dict()`` of a loader over a
    :class:`PackedIterableDataset` (it holds the state of each worker), the dataset's own
    ``state_dict()``, or a state this function returned. Together they must cover every reader
    (all workers of all data-parallel ranks) once. The result is the same whichever rank computes
    it; :func:`load_stream_state` (or ``PackedIterableDataset.load_state_dict``) resumes it with
    any number of workers and data-parallel ranks.
    """
    if isinstance(states, dict):
        states = [states]
    readers, last = [], {}
    for state in states:
        if _is_stream(state):
            parts, worker = [state], None
        elif isinstance(state, dict) and (_Multi._SNAPSHOT in state or _DATASET_STATE in state):
            parts, worker, _ = _loader_parts(state)
        else:
            raise ValueError(f"not a packed stream or loader state: keys {sorted(state)[:8]}")
        for part in parts:
            if not _is_stream(part):
                raise ValueError("the loader state holds no PackedIterableDataset state")
        if worker is not None:
            last[parts[0]["reader"] % parts[0]["dp"]] = worker
        readers += parts
    runs = [s for s in readers if s["stream"] == RUN]
    if runs:
        if len(readers) != 1:
            raise ValueError("a run state stands alone; do not mix it with other states")
        return copy.deepcopy(runs[0])
    run = fold(readers)
    workers = run["readers"] // run["dp"]
    if last and workers > 1:
        run["last_worker"] = [last.get(rank) for rank in range(run["dp"])]
    return copy.deepcopy(run)


def _fabricate(run: dict, loader) -> dict:
    """A StatefulDataLoader state that hands ``run`` to every worker of ``loader``."""
    # torchdata has no public way to build a state for another worker count: its own key names are
    # imported above, so a change on its side fails here loudly instead of resuming wrongly
    fetcher = {_DATASET_ITER_STATE: None, _FETCHER_ENDED: False}
    num_workers = loader.num_workers
    if not num_workers:
        return {_INDEX_SAMPLER_STATE: None, _SAMPLER_ITER_STATE: None, _SAMPLER_ITER_YIELDED: 0,
                _Single._NUM_YIELDED: 0, _ITERABLEDATASET_LEN_CALLED: None, _SHARED_SEED: None,
                _FETCHER_STATE: fetcher, _DATASET_STATE: run, _ITERATOR_FINISHED: False}
    dataset = loader.dataset
    last = num_workers - 1  # the next batch comes from worker 0
    if run["readers"] == num_workers * dataset.dp_world_size and run["dp"] == dataset.dp_world_size:
        saved = run["last_worker"][dataset.dp_rank]
        last = last if saved is None else saved
    main = {_Multi._NUM_WORKERS: num_workers, _SAMPLER_ITER_STATE: None, _INDEX_SAMPLER_STATE: None,
            _SAMPLER_ITER_YIELDED: 0, _ITERABLEDATASET_LEN_CALLED: None, _SHARED_SEED: None,
            _Multi._BASE_SEED: int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())}
    workers = {f"worker_{i}": {_WORKER_ID: i, _FETCHER_STATE: dict(fetcher), _DATASET_STATE: run}
               for i in range(num_workers)}
    snapshot = {_Multi._SNAPSHOT_STEP: 0, _Multi._LAST_YIELDED_WORKER_ID: last,
                _Multi._MAIN_SNAPSHOT: main, _Multi._WORKER_SNAPSHOTS: workers}
    return {_Multi._SNAPSHOT: snapshot, _Multi._STEPS_SINCE_SNAPSHOT: 0, _ITERATOR_FINISHED: False}


def _fits(state: dict, loader) -> bool:
    """Whether a StatefulDataLoader ``state`` was saved by a loader shaped like ``loader``."""
    if _is_stream(state) or not isinstance(state, dict):
        return False
    multi = _Multi._SNAPSHOT in state
    if multi != bool(loader.num_workers):
        return False
    if multi and len(state[_Multi._SNAPSHOT][_Multi._WORKER_SNAPSHOTS]) != loader.num_workers:
        return False
    parts = (state[_Multi._SNAPSHOT][_Multi._WORKER_SNAPSHOTS].values() if multi else [state])
    dataset = loader.dataset
    readers = max(loader.num_workers, 1) * dataset.dp_world_size
    return all(
        _is_stream(p[_DATASET_STATE]) and p[_DATASET_STATE].get("readers") == readers
        and p[_DATASET_STATE]["reader"] % dataset.dp_world_size == dataset.dp_rank
        for p in parts
    )


def load_stream_state(loader, states: Union[dict, Sequence[dict]]) -> None:
    """Resume ``loader`` (a StatefulDataLoader over a PackedIterableDataset) from saved state(s).

    ``states`` is anything :func:`stream_state` takes. A single loader state saved by a loader of
    the same shape (workers, data-parallel size and rank) is loaded as it is: the rows repeat bit
    for bit. Otherwise the states are folded into the run's position and every worker of
    ``loader`` takes its share: each remaining document token comes out exactly once over the rest
    of the pass.
    """
    if isinstance(states, dict) and _fits(states, loader):
        loader.load_state_dict(states)
        return
    loader.load_state_dict(_fabricate(stream_state(states), loader))


def check_reader(state: dict, reader: int, readers: int) -> None:
    """Raise ``ValueError`` when a reader state belongs to another reader or topology."""
    if state["readers"] != readers or state["reader"] != reader:
        raise ValueError(
            f"this state belongs to reader {state['reader']} of {state['readers']} (dp={state['dp']} ranks "
            f"x {state['readers'] // state['dp']} workers), but it is loaded by reader {reader} of "
            f"{readers}: {_CHANGE}"
        )
