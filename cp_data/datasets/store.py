"""Zero-copy numpy access to a Hugging Face dataset column of token-id lists."""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa

from cp_data.sources import DocumentSource

__all__ = ["TokenStore", "as_token_store", "check_column", "check_token_ids", "describe_source"]


def describe_source(source) -> str:
    """A short name for messages: the type, the dataset name when known, and the columns."""
    name = getattr(getattr(source, "info", None), "dataset_name", None)
    columns = getattr(source, "column_names", None)
    return type(source).__name__ + (f" {name!r}" if name else "") + (f" with columns {columns}" if columns else "")


def check_token_ids(values: np.ndarray, offsets: np.ndarray, first_doc: int = 0, where: str = "document") -> None:
    """Raise ``ValueError`` naming the first document with a negative token id (vectorised).

    ``values[offsets[i]:offsets[i + 1]]`` are the tokens of document ``first_doc + i``. Negative ids
    are never valid, and -100 would be mistaken for the ignored label.
    """
    used = values[offsets[0] : offsets[-1]]
    if not used.size or not np.issubdtype(used.dtype, np.signedinteger) or used.min() >= 0:
        return
    pos = int(np.argmax(used < 0)) + int(offsets[0])
    doc = first_doc + int(np.searchsorted(offsets, pos, side="right")) - 1
    raise ValueError(
        f"{where} {doc} holds the negative token id {int(values[pos])}; token ids must be >= 0 "
        "(-100 marks ignored labels)"
    )


def check_column(dataset, column: str) -> None:
    """Raise ``ValueError`` listing the existing columns when ``column`` is missing."""
    names = list(dataset.column_names or [])
    if column not in names:
        raise ValueError(f"column {column!r} not found; the dataset has columns {names}")


def _check_type(column: str, typ: pa.DataType) -> None:
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_integer(
        typ.value_type
    ):
        hint = " (tokenize the text first, e.g. with tokenize_dataset)" if pa.types.is_string(typ) else ""
        raise ValueError(f"column {column!r} must hold lists of integer token ids, got {typ}{hint}")


class TokenStore:
    """The documents of ``dataset[column]`` as per-chunk numpy views of the arrow buffers.

    Building a row copies only its own tokens; nothing is materialised as Python lists. Index
    mappings (``select``/``shuffle``) are honoured. Pickles as (dataset, column) and rebuilds
    its views on load, so DataLoader workers never receive a copy of the token buffers.
    """

    def __init__(self, dataset, column: str = "input_ids") -> None:
        check_column(dataset, column)
        self.dataset = dataset
        self.column = column
        self._build()

    def _build(self) -> None:
        col = self.dataset.with_format("arrow")[self.column]
        if isinstance(col, pa.Table):
            col = col.column(self.column)
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        _check_type(self.column, col.type)
        self._values: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        lengths = []
        first_doc = 0
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            offsets = np.asarray(chunk.offsets).astype(np.int64)
            values = chunk.values
            if values.null_count and values.slice(offsets[0], offsets[-1] - offsets[0]).null_count:
                raise ValueError(f"column {self.column!r} holds null tokens; token ids must be integers")
            lens = np.diff(offsets)
            if chunk.null_count:  # a missing document is an empty one
                lens[np.asarray(chunk.is_null())] = 0
            self._values.append(values.to_numpy(zero_copy_only=False))
            self._offsets.append(offsets)
            check_token_ids(self._values[-1], offsets, first_doc, where=f"column {self.column!r}: document")
            lengths.append(lens)
            first_doc += lens.size
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        counts = [len(o) - 1 for o in self._offsets]
        self._first_doc = np.concatenate(([0], np.cumsum(counts)))[:-1].tolist()

    def __len__(self) -> int:
        return int(self.lengths.size)

    def tokens(self, doc: int, start: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of document ``doc`` (a view, not a copy)."""
        c = bisect.bisect_right(self._first_doc, doc) - 1
        base = int(self._offsets[c][doc - self._first_doc[c]])
        if length is None:
            length = int(self.lengths[doc]) - start
        return self._values[c][base + start : base + start + length]

    def __getstate__(self) -> dict:
        return {"dataset": self.dataset, "column": self.column}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()


def as_token_store(source, column: str = "input_ids"):
    """A token-file :class:`~cp_data.sources.DocumentSource` as it is, else ``TokenStore(source, column)``."""
    return source if isinstance(source, DocumentSource) else TokenStore(source, column)
