"""Packing configuration and the planners: best-fit-decreasing and concat ("wrapped")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from cp_data.balancers.validation import check_lengths, is_int, round_up

from cp_data.balancers.pairs import causal_pairs

from .bfd import best_fit_decreasing, best_fit_decreasing_capped
from .plan import PackingPlan

__all__ = ["PackingConfig", "Packer", "plan_packing", "work_bucket_order"]

ALGORITHMS = ("bfd", "concat")
LONG_DOCS = ("split", "truncate")


@dataclass(frozen=True)
class PackingConfig:
    """How documents become rows of ``seq_len`` tokens.

    - ``algorithm``: ``"bfd"`` (best-fit-decreasing: few rows, documents whole when they fit; a
      document longer than ``seq_len`` is cut from its start into ``seq_len``-token pieces that
      each fill a row, and its remainder is packed like any document) or ``"concat"`` (documents
      end to end, cut every ``seq_len``; a cut piece is its own document in the next row). The
      plan's ``docs_split`` counts documents cut into pieces: with bfd only those longer than
      ``seq_len``, with concat every document that crosses a row boundary.
    - ``long_docs``: documents longer than ``seq_len`` are cut into pieces (``"split"``) or keep
      only their first ``seq_len`` tokens (``"truncate"``).
    - ``cp_multiple``: CP-aware budget, e.g. ``2 * W`` for zig_zag. Every emitted document
      (piece) is padded up to a multiple of it with ``pad_token_id`` tokens that count as part of
      that document (``doc_lens`` includes them, ``label_mask`` is False on them), so
      by-document sharding adds no padding and every rank holds exactly ``seq_len / W`` tokens.
      ``seq_len`` must be divisible by it; the trailing row padding is then a multiple as well.

    Work-aware options (rows hold equal tokens, but causal attention work grows with the square
    of document length; a row's work here is its documents' query-key pairs, ``d (d + 1) / 2``
    for a document of ``d`` tokens, its ``cp_multiple`` padding included — see
    :func:`cp_data.causal_pairs` — which a per-token cost plus a per-pair cost turns into time):

    - ``max_pairs`` (``"bfd"`` only): a row's documents never exceed this many pairs, alongside
      the token cap (best fit among the rows with room and budget left), except a document
      that alone exceeds it, which sits alone. Caps only rows that hold several long documents;
      costs some fill.
    - ``work_buckets``: rows per global batch (``dp × batch_size``). The rows are put in an
      order where every window of that many consecutive rows holds rows of similar work (rows
      sorted by work, cut into windows), windows and the rows inside them shuffled with
      ``bucket_seed``. A plain split of consecutive global batches over data-parallel ranks (the
      loader with ``shuffle=False``) then gives every rank of a step similar work; with
      ``shuffle=True`` the order is lost.
    """

    seq_len: int
    algorithm: Literal["bfd", "concat"] = "bfd"
    long_docs: Literal["split", "truncate"] = "split"
    cp_multiple: Optional[int] = None
    pad_token_id: int = 0
    max_pairs: Optional[int] = None
    work_buckets: Optional[int] = None
    bucket_seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.seq_len) or self.seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {self.seq_len!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.long_docs not in LONG_DOCS:
            raise ValueError(f"long_docs must be one of {LONG_DOCS}, got {self.long_docs!r}")
        if self.cp_multiple is not None:
            if not is_int(self.cp_multiple) or self.cp_multiple < 1:
                raise ValueError(f"cp_multiple must be an integer >= 1, got {self.cp_multiple!r}")
            if self.seq_len % self.cp_multiple:
                raise ValueError(
                    f"cp_multiple={self.cp_multiple} does not divide seq_len={self.seq_len}"
                )
        if not is_int(self.pad_token_id):
            raise ValueError(f"pad_token_id must be an integer, got {self.pad_token_id!r}")
        for name in ("max_pairs", "work_buckets"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_pairs is not None and self.algorithm != "bfd":
            raise ValueError(f"max_pairs needs algorithm='bfd', got algorithm={self.algorithm!r}")
        if not is_int(self.bucket_seed):
            raise ValueError(f"bucket_seed must be an integer, got {self.bucket_seed!r}")

    def build(self) -> "Packer":
        """The planner for this configuration."""
        return Packer(self)


@dataclass(frozen=True)
class Packer:
    """Plans rows for a list of document lengths (see :class:`PackingConfig`)."""

    config: PackingConfig

    def plan(self, lengths) -> PackingPlan:
        """Plan the packing of documents with these token counts (zeros are skipped)."""
        return plan_packing(lengths, self.config)

    __call__ = plan


def _cut(doc: np.ndarray, real: np.ndarray, budget: np.ndarray, offset: np.ndarray, S: int):
    """Cut every document's budget span ``[offset, offset + budget)`` at multiples of ``S``.

    Returns the pieces (doc, start, length, pad, row) and the piece count per document; pieces of
    one document are consecutive. Real tokens come first in a document's budget, padding last.
    """
    first_row = offset // S
    npieces = (offset + budget - 1) // S - first_row + 1
    total = int(npieces.sum())
    piece_first = np.cumsum(npieces) - npieces
    j = np.arange(total, dtype=np.int64) - np.repeat(piece_first, npieces)
    row = np.repeat(first_row, npieces) + j
    doc_offset = np.repeat(offset, npieces)
    lo = np.maximum(doc_offset, row * S)
    hi = np.minimum(doc_offset + np.repeat(budget, npieces), (row + 1) * S)
    start = lo - doc_offset
    size = hi - lo
    length = np.clip(np.repeat(real, npieces) - start, 0, size)
    return (np.repeat(doc, npieces), start, length, size - length, row), npieces


def plan_packing(lengths, config: PackingConfig) -> PackingPlan:
    """Plan rows for documents of these lengths under ``config`` (vectorised, no tensors)."""
    L = check_lengths(lengths, "document lengths")
    S = config.seq_len
    m = config.cp_multiple or 1
    doc = np.flatnonzero(L > 0)
    real = L[doc]
    truncated = real > S
    if config.long_docs == "truncate":
        real = np.minimum(real, S)
    budget = round_up(real, m)  # multiples of m stay <= S because m divides S

    if config.algorithm == "concat":
        offset = np.cumsum(budget) - budget
        (pdoc, start, length, pad, row), npieces = _cut(doc, real, budget, offset, S)
    else:
        # long documents become S-sized pieces (alone in a row) plus a remainder for BFD
        (pdoc, start, length, pad, _), npieces = _cut(doc, real, budget, np.zeros_like(doc), S)
        if config.max_pairs is None:
            bins = best_fit_decreasing(length + pad, S)
        else:
            bins = best_fit_decreasing_capped(length + pad, S, causal_pairs(length + pad), config.max_pairs)
        order = np.argsort(bins, kind="stable")  # rows in opening order, documents in input order
        pdoc, start, length, pad, row = pdoc[order], start[order], length[order], pad[order], bins[order]

    num_rows = int(row[-1]) + 1 if row.size else 0
    row_offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=num_rows), out=row_offsets[1:])
    truncate = config.long_docs == "truncate"
    plan = PackingPlan(
        seq_len=S,
        row_offsets=row_offsets,
        doc=pdoc,
        start=start,
        length=length,
        pad=pad,
        num_docs=int(L.size),
        empty_docs=int(L.size - doc.size),
        split_docs=int((npieces > 1).sum()),
        truncated_docs=int(truncated.sum()) if truncate else 0,
        truncated_tokens=int((L[doc] - real).sum()),
    )
    if config.work_buckets is not None:
        plan = plan.reorder_rows(work_bucket_order(plan.row_pairs(), config.work_buckets, config.bucket_seed))
    return plan


def work_bucket_order(row_work: np.ndarray, window: int, seed: int = 0) -> np.ndarray:
    """A row order whose every ``window`` consecutive rows have similar work (see ``work_buckets``).

    Rows sorted by work are cut into windows of ``window`` rows; the full windows, and the rows
    inside each, are shuffled with ``seed``. The heaviest ``len % window`` rows, too few for a
    window, come last, so that every window starts at a multiple of ``window``. Returns the
    permutation.
    """
    rng = np.random.default_rng(seed)
    by_work = np.argsort(row_work, kind="stable")
    full = by_work.size // window * window
    windows = by_work[:full].reshape(-1, window)[rng.permutation(full // window)]
    return np.concatenate([rng.permuted(windows, axis=1).ravel(), by_work[full:]])
