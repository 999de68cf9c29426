"""The result of packing: which piece of which document goes where, as flat numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import numpy as np

from cp_data.balancers.pairs import causal_pairs

__all__ = ["PackingPlan", "assemble_row", "fill_rates"]


def fill_rates(tokens: int, rows: int, seq_len: int) -> dict[str, float]:
    """``fill_rate`` (document tokens / row capacity) and ``padding_fraction``; both 0 with no rows."""
    capacity = rows * seq_len
    if not capacity:
        return {"fill_rate": 0.0, "padding_fraction": 0.0}
    fill = tokens / capacity
    return {"fill_rate": fill, "padding_fraction": 1.0 - fill}


@dataclass(frozen=True)
class PackingPlan:
    """Rows of length ``seq_len`` made of document pieces, stored as flat arrays.

    Row ``r`` holds pieces ``row_offsets[r]:row_offsets[r + 1]``, in order. A piece is the tokens
    ``[start, start + length)`` of document ``doc``, followed by ``pad`` padding tokens that belong
    to the same piece (the CP-aware budget rounds every piece up to ``cp_multiple``). Whatever a
    row leaves free at its end is one trailing padding document.
    """

    seq_len: int
    row_offsets: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    pad: np.ndarray
    num_docs: int = 0
    empty_docs: int = 0
    split_docs: int = 0
    truncated_docs: int = 0
    truncated_tokens: int = 0

    @property
    def num_rows(self) -> int:
        """Number of packed rows."""
        return self.row_offsets.size - 1

    @property
    def num_tokens(self) -> int:
        """Document tokens placed in the rows (padding excluded)."""
        return int(self.length.sum())

    def row_used(self) -> np.ndarray:
        """Positions taken by pieces (tokens plus their padding) in every row, int64 [rows]."""
        if not self.doc.size:
            return np.zeros(self.num_rows, dtype=np.int64)
        # every row holds at least one piece, so no reduceat segment is empty
        return np.add.reduceat(self.length + self.pad, self.row_offsets[:-1])

    def row_doc_lens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's ``doc_lens`` (pieces, then the trailing padding document where a row has one):
        ``(doc_lens, row_offsets)``, row ``r`` holding ``doc_lens[row_offsets[r]:row_offsets[r + 1]]``."""
        free = self.seq_len - self.row_used()
        ends = self.row_offsets[1:]
        lens = np.insert(self.length + self.pad, ends[free > 0], free[free > 0])
        offsets = np.concatenate([[0], ends + np.cumsum(free > 0)])
        return lens.astype(np.int64), offsets.astype(np.int64)

    def row_pairs(self) -> np.ndarray:
        """Causal query-key pairs of the documents of every row (float64 [rows]).

        A piece of ``length + pad`` tokens is one document to the attention kernel; the row's
        trailing padding is not counted.
        """
        if not self.doc.size:
            return np.zeros(self.num_rows)
        return np.add.reduceat(causal_pairs(self.length + self.pad), self.row_offsets[:-1])

    def reorder_rows(self, order: np.ndarray) -> "PackingPlan":
        """The same rows in the order ``order`` (a permutation of the row indices)."""
        order = np.asarray(order, dtype=np.int64)
        if order.shape != (self.num_rows,) or not np.array_equal(np.sort(order), np.arange(self.num_rows)):
            raise ValueError(f"order must be a permutation of {self.num_rows} rows, got {order[:8].tolist()}")
        counts = np.diff(self.row_offsets)[order]
        pieces = np.repeat(self.row_offsets[:-1][order] - np.cumsum(counts) + counts, counts)
        pieces += np.arange(pieces.size)
        offsets = np.zeros(self.num_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return replace(
            self, row_offsets=offsets, doc=self.doc[pieces], start=self.start[pieces],
            length=self.length[pieces], pad=self.pad[pieces],
        )

    def metrics(self) -> dict:
        """Rows, fill rate, padding fraction and the per-document outcome counts."""
        return {
            "rows": self.num_rows,
            "documents": self.num_docs,
            "pieces": int(self.doc.size),
            "tokens": self.num_tokens,
            **fill_rates(self.num_tokens, self.num_rows, self.seq_len),
            "docs_split": self.split_docs,
            "docs_truncated": self.truncated_docs,
            "tokens_truncated": self.truncated_tokens,
            "empty_docs_skipped": self.empty_docs,
        }


def assemble_row(
    plan: PackingPlan,
    row: int,
    tokens_of: Callable[[int, int, int], np.ndarray],
    pad_token_id: int = 0,
    *,
    gather: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = None,
) -> dict[str, np.ndarray]:
    """Build packed row ``row`` (numpy ``input_ids``, ``doc_lens``, ``label_mask``) in O(row length).

    ``tokens_of(doc, start, length)`` returns that slice of a document's token ids. A source that
    can fetch all pieces at once passes ``gather(docs, starts, lengths)`` (arrays) returning their
    tokens concatenated; it replaces the per-piece calls (rows of many short documents).
    """
    if not 0 <= row < plan.num_rows:
        raise IndexError(f"row {row} out of range for a plan of {plan.num_rows} rows")
    a, b = int(plan.row_offsets[row]), int(plan.row_offsets[row + 1])
    S = plan.seq_len
    input_ids = np.full(S, pad_token_id, dtype=np.int64)
    label_mask = np.zeros(S, dtype=bool)
    lengths = plan.length[a:b]
    doc_lens = lengths + plan.pad[a:b]
    ends = np.cumsum(doc_lens)
    begins = ends - doc_lens
    if gather is not None:
        tokens = gather(plan.doc[a:b], plan.start[a:b], lengths)
        slots: Union[slice, np.ndarray] = slice(0, tokens.size)
        if plan.pad[a:b].any():  # pieces padded to cp_multiple: each run starts at its own slot
            slots = np.repeat(begins - (np.cumsum(lengths) - lengths), lengths) + np.arange(tokens.size)
        input_ids[slots] = tokens
        label_mask[slots] = True
    else:  # a row holds a handful of pieces; one slice copy each
        for d, st, ln, pos in zip(
            plan.doc[a:b].tolist(), plan.start[a:b].tolist(), lengths.tolist(), begins.tolist()
        ):
            input_ids[pos : pos + ln] = tokens_of(d, st, ln)
            label_mask[pos : pos + ln] = True
    used = int(ends[-1]) if ends.size else 0
    if used < S:
        doc_lens = np.append(doc_lens, S - used)
    return {"input_ids": input_ids, "doc_lens": doc_lens.astype(np.int64), "label_mask": label_mask}
