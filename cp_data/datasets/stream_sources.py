"""Where a packed stream reads documents: units that readers take in turn, each readable from a position.

A unit is a block of consecutive documents of a map-style source, or one shard of a Hugging Face
``IterableDataset``. A position inside a unit is ``[documents read, source state]`` (the source
state is the shard's own ``state_dict()``; ``None`` for blocks), so any reader can open any unit
where another one stopped.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from typing import Optional

import datasets
import numpy as np

from .packed import open_store
from .store import check_column, check_token_ids, describe_source

__all__ = ["DocumentBlocks", "StreamShards"]


class DocumentBlocks:
    """A map-style source read in blocks of ``block`` documents, one unit each.

    Items are ``(doc, start, length)`` references into the store, so a carried piece is three ints.
    Uses only the store's ``lengths``, ``tokens(doc, start, length)`` and ``len``.
    """

    def __init__(self, source, column: str, block: int) -> None:
        self.store = open_store(source, column)
        self.block = block
        self.description = describe_source(source)
        self.num_units = -(-len(self.store) // block)

    def fingerprint(self) -> dict:
        """What identifies the documents: count, tokens and a digest of the lengths."""
        lengths = np.ascontiguousarray(self.store.lengths, dtype=np.int64)
        digest = hashlib.sha1(lengths.tobytes()).hexdigest()[:16]
        return {"documents": int(lengths.size), "tokens": int(lengths.sum()), "lengths_sha1": digest}

    def open(self, unit: int, offset: list, epoch: int) -> "_BlockCursor":
        return _BlockCursor(self, unit, offset[0])

    def length(self, item) -> int:
        return item[2]

    def tokens(self, item, start: int, length: int) -> np.ndarray:
        return self.store.tokens(item[0], item[1] + start, length)

    def piece(self, item, start: int, length: int) -> list:
        return [item[0], item[1] + start, length]

    def item(self, piece: list):
        return tuple(piece)


class _BlockCursor:
    def __init__(self, blocks: DocumentBlocks, unit: int, done: int) -> None:
        self.lengths = blocks.store.lengths
        self.first = unit * blocks.block
        self.next = self.first + done
        self.end = min(self.first + blocks.block, len(blocks.store))

    def take(self, n: int) -> list:
        docs = range(self.next, min(self.next + n, self.end))
        self.next = docs.stop
        return [(d, 0, int(self.lengths[d])) for d in docs]

    def position(self) -> list:
        return [self.next - self.first, None]


def _whole(source: datasets.IterableDataset) -> datasets.IterableDataset:
    """``source`` with ``split_dataset_by_node``'s split undone, so its shards can be dealt by index."""
    # the split lives in a private field; rebuilding through the pickling hook keeps everything else
    whole = object.__new__(type(source))
    whole.__setstate__({**source.__dict__, "_distributed": None})
    return whole


class StreamShards:
    """A Hugging Face ``IterableDataset`` read shard by shard, one unit each.

    A source already split with ``split_dataset_by_node`` keeps its node's shards (those
    ``rank, rank + world_size, ...``, as the split gives them) when the shard count allows that
    split; a source split by examples is read as one unit. Items are int64 token arrays, and a
    carried piece holds its token ids.
    """

    def __init__(self, source: datasets.IterableDataset, column: str) -> None:
        self.description = describe_source(source)
        self.column = column
        if source.column_names is not None:
            check_column(source, column)
            source = source.select_columns([column])
        self.node_split: Optional[list] = None
        split = source._distributed
        total = _whole(source).num_shards if split else source.num_shards
        if split is None:
            self.base, self.shards = source, list(range(total))
        elif split.strategy == "shards" or (split.strategy == "auto" and total % split.world_size == 0):
            self.base, self.shards = _whole(source), list(range(split.rank, total, split.world_size))
            self.node_split = [split.rank, split.world_size]
        else:  # split by examples: only the whole node stream knows which examples are its own
            self.base, self.shards = source, None
            self.node_split = [split.rank, split.world_size, "examples"]
        self.total = total
        self.num_units = len(self.shards) if self.shards is not None else 1

    def fingerprint(self) -> dict:
        return {"shards": self.total, "node_split": self.node_split}

    def dataset(self, unit: int) -> datasets.IterableDataset:
        """A new dataset object for ``unit`` (loading a state into a shared one would stick)."""
        if self.shards is None:
            return self.base.shard(num_shards=1, index=0)
        return self.base.shard(num_shards=self.total, index=self.shards[unit], contiguous=True)

    def open(self, unit: int, offset: list, epoch: int) -> "_ShardCursor":
        return _ShardCursor(self, unit, offset, epoch)

    def length(self, item: np.ndarray) -> int:
        return item.size

    def tokens(self, item: np.ndarray, start: int, length: int) -> np.ndarray:
        return item[start : start + length]

    def piece(self, item: np.ndarray, start: int, length: int) -> list:
        return item[start : start + length].tolist()

    def item(self, piece: list) -> np.ndarray:
        return np.asarray(piece, dtype=np.int64)

    def to_tokens(self, batch: dict, where: str, index: int) -> np.ndarray:
        """The token ids of a one-example batch, checked."""
        if self.column not in batch:
            raise ValueError(f"column {self.column!r} not found; examples have columns {sorted(batch)}")
        value = batch[self.column][0]
        tokens = np.asarray(value if value is not None else [])
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"column {self.column!r} must hold integer token ids, got dtype {tokens.dtype}")
        tokens = tokens.astype(np.int64, copy=False).reshape(-1)
        check_token_ids(tokens, np.array([0, tokens.size]), index, where=f"{where}: document")
        return tokens


class _ShardCursor:
    def __init__(self, shards: StreamShards, unit: int, offset: list, epoch: int) -> None:
        self.shards, self.done = shards, offset[0]
        self.where = f"{shards.description}, shard {shards.shards[unit] if shards.shards else 'stream'}"
        self.dataset = shards.dataset(unit)
        self.dataset.set_epoch(epoch)
        if offset[1] is not None:
            self.dataset.load_state_dict(offset[1])
        # iter() reads this one shard in full even inside a DataLoader worker (iter(dataset) would
        # split it across workers again)
        self.examples = self.dataset.iter(batch_size=1)

    def take(self, n: int) -> list:
        out = []
        for batch in islice(self.examples, n):
            out.append(self.shards.to_tokens(batch, self.where, self.done))
            self.done += 1
        return out

    def position(self) -> list:
        return [self.done, self.dataset.state_dict()]
