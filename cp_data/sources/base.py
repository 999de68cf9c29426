"""A document source over memory-mapped token files: document offsets in, zero-copy views out."""

from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np

from cp_data.balancers.validation import is_int

__all__ = ["DocumentSource", "Provenance", "TokenFile", "check_id_fits", "check_vocab_size", "map_tokens"]

INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class TokenFile:
    """One file of token ids: ``num_tokens`` values of ``dtype`` starting ``header_bytes`` in.

    ``size`` and ``mtime_ns`` are those seen when the file was opened; a source refuses to
    reopen (e.g. in a DataLoader worker) a file that has changed since.
    """

    path: str
    format: str
    dtype: np.dtype
    header_bytes: int
    num_tokens: int
    size: int
    mtime_ns: int


class Provenance(NamedTuple):
    """Where a document lives: its file, its index in that file, and its first token there."""

    path: str
    doc_in_file: int
    token_offset: int
    byte_offset: int


def check_vocab_size(vocab_size) -> Optional[int]:
    """``vocab_size`` as an int (or None), raising ``ValueError`` unless it is a positive integer."""
    if vocab_size is None:
        return None
    if not is_int(vocab_size) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return int(vocab_size)


def check_id_fits(value: Optional[int], name: str, dtype: np.dtype, path: str, vocab_size=None) -> None:
    """Raise ``ValueError`` when a special token id cannot occur in a file of ``dtype``."""
    if value is None:
        return
    info = np.iinfo(dtype)
    limit = info.max if vocab_size is None else min(info.max, vocab_size - 1)
    if not max(0, info.min) <= value <= limit:
        raise ValueError(f"{name}={value} cannot occur in {path}: its ids are {dtype} in [0, {limit}]")


def map_tokens(path: str, dtype: np.dtype, header_bytes: int, num_tokens: int) -> np.ndarray:
    """The tokens of a file as a read-only array backed by the page cache (no read, no copy)."""
    if num_tokens == 0:  # mmap cannot map an empty range
        return np.empty(0, dtype=dtype)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(buf, dtype=dtype, count=num_tokens, offset=header_bytes)


class DocumentSource:
    """The documents of one or more token files, in order, memory-mapped.

    Documents are held as one int64 array of token offsets (8 bytes per document, never per
    token); ``source[i]`` and :meth:`tokens` return zero-copy read-only views of the mapped files,
    in the file's own dtype. It serves the packing datasets as a HF dataset does:
    ``PackedDataset(source, config)`` and ``PackedIterableDataset(source, config)``.

    Token ids are checked on access when they could be invalid: below 0 (signed file dtypes),
    beyond int64 (uint64 files) or, with ``vocab_size``, at or above it; a bad id raises
    ``ValueError`` naming the file, the document and the id. Pickling ships the file list and the
    offsets, never tokens; the files are mapped again on load.
    """

    def __init__(self, files: Sequence[TokenFile], offsets: Sequence[np.ndarray], vocab_size=None):
        """``offsets[k]``: the document boundaries of ``files[k]`` (token positions 0 .. num_tokens)."""
        self.files = list(files)
        self.vocab_size = check_vocab_size(vocab_size)
        bases = np.cumsum([0] + [f.num_tokens for f in self.files], dtype=np.int64)
        counts = [len(o) - 1 for o in offsets]
        # global token positions: file k's tokens occupy [bases[k], bases[k + 1])
        if len(offsets) == 1:
            self.offsets = np.asarray(offsets[0], dtype=np.int64)
        else:
            self.offsets = np.concatenate([o[:-1] + b for o, b in zip(offsets, bases.tolist())] + [bases[-1:]])
        self._first_doc_array = np.cumsum([0] + counts)
        self._first_doc = self._first_doc_array.tolist()  # bisect on a list: fastest for one id
        self._bases = bases.tolist()
        self._open()

    def _open(self) -> None:
        self._arrays = []
        for f in self.files:
            st = os.stat(f.path)
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                raise ValueError(
                    f"{f.path} changed since it was opened (size {f.size} -> {st.st_size} bytes); "
                    "open the token files again"
                )
            self._arrays.append(map_tokens(f.path, f.dtype, f.header_bytes, f.num_tokens))
        self._limits = [self._id_limit(f.dtype) for f in self.files]

    def _id_limit(self, dtype: np.dtype) -> Optional[tuple[Optional[int], int]]:
        """``(lowest, highest)`` valid id when the dtype alone does not guarantee it, else None.

        ``lowest`` is None for unsigned files (nothing to check below).
        """
        hi = INT64_MAX if dtype == np.uint64 else int(np.iinfo(dtype).max)
        if self.vocab_size is not None:
            hi = min(hi, self.vocab_size - 1)
        lo = None if dtype.kind == "u" else 0
        return None if lo is None and hi == np.iinfo(dtype).max else (lo, hi)

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def doc_lens(self) -> np.ndarray:
        """Every document's token count, int64 (computed from the offsets on each access)."""
        return np.diff(self.offsets)

    lengths = doc_lens  # the name the packing datasets read

    @property
    def num_tokens(self) -> int:
        """Tokens in all files."""
        return int(self.offsets[-1])

    def _file_of(self, doc: int) -> int:
        if not 0 <= doc < self.offsets.size - 1:
            raise IndexError(f"document {doc} out of range for a source of {len(self)} documents")
        return bisect.bisect_right(self._first_doc, doc) - 1

    def _first_bad_id(self, tokens: np.ndarray, k: int) -> Optional[int]:
        """Index of the first id of file ``k`` outside what its dtype or the vocab allow, or None."""
        limit = self._limits[k]
        if limit is None or not tokens.size:
            return None
        lo, hi = limit
        if tokens.max() <= hi and (lo is None or tokens.min() >= lo):
            return None
        return int(np.flatnonzero((tokens > hi) | (tokens < (lo or 0)))[0])

    def _bad_id(self, k: int, doc: int, value) -> ValueError:
        lo, hi = self._limits[k]
        vocab = "" if self.vocab_size is None else f" (vocab_size={self.vocab_size})"
        return ValueError(f"{self.files[k].path}: document {doc} holds token id {value}, outside [{lo or 0}, {hi}]{vocab}")

    def tokens(self, doc: int, start: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of document ``doc`` (a view, not a copy)."""
        k = self._file_of(doc)
        begin, end = self.offsets[doc : doc + 2].tolist()
        if length is None:
            length = end - begin - start
        if start < 0 or length < 0 or begin + start + length > end:
            raise IndexError(f"tokens [{start}, {start + length}) outside document {doc} of {end - begin}")
        lo = begin - self._bases[k] + start
        view = self._arrays[k][lo : lo + length]
        bad = self._first_bad_id(view, k)
        if bad is not None:
            raise self._bad_id(k, doc, view[bad])
        return view

    def gather(self, docs, starts, lengths) -> np.ndarray:
        """Pieces ``[starts[i], starts[i] + lengths[i])`` of documents ``docs[i]``, concatenated.

        One vectorised gather (a copy) instead of one call per piece: what a packed row of many
        short documents needs. The result has the file's dtype (int64 across files).
        """
        docs, starts, lengths = (np.asarray(x, dtype=np.int64) for x in (docs, starts, lengths))
        if not docs.size:
            return np.zeros(0, dtype=np.int64)
        ends = self.offsets[docs + 1]  # numpy raises IndexError for documents past the end
        first = self.offsets[docs] + starts
        room = ends - first - lengths  # < 0 when a piece runs past its document's end
        if (docs | starts | lengths | room).min() < 0:  # any negative: one reduction, not four
            i = int(np.flatnonzero((docs < 0) | (starts < 0) | (lengths < 0) | (room < 0))[0])
            raise IndexError(f"tokens [{starts[i]}, {starts[i] + lengths[i]}) outside document {docs[i]}")
        run_ends = np.cumsum(lengths)
        positions = np.repeat(first - run_ends + lengths, lengths) + np.arange(run_ends[-1])
        if len(self.files) == 1:
            out = self._arrays[0].take(positions)
            bad = self._first_bad_id(out, 0)
            if bad is not None:
                raise self._bad_id(0, docs[np.searchsorted(run_ends, bad, "right")], out[bad])
            return out
        files = np.searchsorted(self._first_doc_array, docs, side="right") - 1
        out = np.empty(positions.size, dtype=np.int64)
        token_file = np.repeat(files, lengths)
        for k in np.unique(files).tolist():
            where = np.flatnonzero(token_file == k)
            out[where] = self._arrays[k].take(positions[where] - self._bases[k])
            bad = self._first_bad_id(out[where], k)
            if bad is not None:
                raise self._bad_id(k, docs[np.searchsorted(run_ends, where[bad], "right")], out[where[bad]])
        return out

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.tokens(int(doc) + len(self) if doc < 0 else int(doc))

    def provenance(self, doc: int) -> Provenance:
        """The file a document comes from, its index there and its first token's position."""
        k = self._file_of(doc)
        f = self.files[k]
        offset = int(self.offsets[doc]) - self._bases[k]
        return Provenance(f.path, doc - self._first_doc[k], offset, f.header_bytes + offset * f.dtype.itemsize)

    def __repr__(self) -> str:
        formats = sorted({f.format for f in self.files})
        return (
            f"DocumentSource({len(self)} documents, {self.num_tokens} tokens in {len(self.files)} "
            f"{'/'.join(formats)} files)"
        )

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_arrays", "_limits")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()
