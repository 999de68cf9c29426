"""Megatron-LM / NeMo indexed datasets: ``<prefix>.idx`` (the index) + ``<prefix>.bin`` (tokens).

The ``.idx`` holds, little-endian: the magic ``MMIDIDX\\x00\\x00``, version ``<Q`` = 1, a dtype
code ``<B``, the sequence count ``<Q``, the document-index count ``<Q``, then
``sequence_lengths`` int32, ``sequence_pointers`` int64 (byte offsets into ``.bin``),
``document_indices`` int64 (from 0 to the sequence count) and, in multimodal files,
``sequence_modes`` int8. Document ``i`` is sequences
``document_indices[i]:document_indices[i + 1]`` concatenated. The ``.bin`` is never read to find
documents; the index is checked against its size.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .base import TokenFile

__all__ = ["DTYPE_CODES", "MAGIC", "HEADER", "megatron_prefix", "open_megatron"]

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


def megatron_prefix(path: str) -> str:
    """``data/x.idx``, ``data/x.bin`` or ``data/x`` -> ``data/x``."""
    p = Path(path)
    return str(p.with_suffix("")) if p.suffix in (".idx", ".bin") else str(p)


def _read_index(idx: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """dtype, sequence lengths (int64), sequence pointers and document indices of an index file."""
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ValueError(f"{idx} is truncated: {size} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, code, num_seqs, num_doc_idx = HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError(f"{idx} is not a Megatron index: magic {magic!r}, expected {MAGIC!r}")
    if version != 1:
        raise ValueError(f"{idx} has index version {version}; only version 1 is known")
    if code not in DTYPE_CODES:
        raise ValueError(f"{idx} has unknown dtype code {code}; known: {DTYPE_CODES}")
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind == "f":
        raise ValueError(f"{idx} holds {dtype} values (dtype code {code}), not integer token ids")
    body = num_seqs * (4 + 8) + num_doc_idx * 8
    if size not in (HEADER.size + body, HEADER.size + body + num_seqs):  # with or without modes
        raise ValueError(
            f"{idx} is {size} bytes, but a header of {num_seqs} sequences and {num_doc_idx} "
            f"document indices needs {HEADER.size + body} (or {HEADER.size + body + num_seqs} with modes)"
        )
    index = np.memmap(idx, mode="r", dtype=np.uint8)
    at = HEADER.size
    lengths = np.frombuffer(index, np.int32, num_seqs, at).astype(np.int64)
    pointers = np.frombuffer(index, np.int64, num_seqs, at + 4 * num_seqs)
    doc_idx = np.frombuffer(index, np.int64, num_doc_idx, at + 12 * num_seqs)
    return dtype, lengths, pointers, doc_idx


def _check(idx: str, bin_path: str, bin_size: int, itemsize: int, lengths, pointers, doc_idx) -> np.ndarray:
    """Token offsets of every sequence boundary, after checking the index against the ``.bin``."""
    def first(mask) -> int:
        return int(np.flatnonzero(mask)[0])

    if (lengths < 0).any():
        i = first(lengths < 0)
        raise ValueError(f"{idx}: sequence {i} has negative length {lengths[i]}")
    ends = pointers + lengths * itemsize
    if ((pointers < 0) | (ends > bin_size)).any():
        i = first((pointers < 0) | (ends > bin_size))
        raise ValueError(
            f"{idx}: sequence {i} spans bytes [{pointers[i]}, {ends[i]}) but {bin_path} has {bin_size} bytes"
        )
    seq_offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    if (pointers != seq_offsets[:-1] * itemsize).any():  # documents must be contiguous views
        i = first(pointers != seq_offsets[:-1] * itemsize)
        raise ValueError(
            f"{idx}: sequence {i} starts at byte {pointers[i]}, not right after the previous one "
            f"(byte {seq_offsets[i] * itemsize})"
        )
    if seq_offsets[-1] * itemsize != bin_size:
        raise ValueError(
            f"{bin_path} has {bin_size} bytes but its index covers {seq_offsets[-1] * itemsize}"
        )
    if doc_idx.size == 0 or doc_idx[0] != 0 or doc_idx[-1] != lengths.size or (np.diff(doc_idx) < 0).any():
        shown = doc_idx[:8].tolist() + (["..."] if doc_idx.size > 8 else [])
        raise ValueError(
            f"{idx}: document_indices must rise from 0 to the sequence count {lengths.size}, got {shown} "
            f"ending at {doc_idx[-1] if doc_idx.size else None}"
        )
    return seq_offsets[doc_idx]


def open_megatron(path: str) -> tuple[TokenFile, np.ndarray]:
    """The ``.bin`` of a Megatron dataset (``path``: its prefix, ``.idx`` or ``.bin``) and its
    document offsets, from the index alone."""
    prefix = megatron_prefix(path)
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    for p in (idx, bin_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"no such file: {p} (a Megatron dataset needs both .idx and .bin)")
    file_dtype, lengths, pointers, doc_idx = _read_index(idx)
    st = os.stat(bin_path)
    offsets = _check(idx, bin_path, st.st_size, file_dtype.itemsize, lengths, pointers, doc_idx)
    file = TokenFile(
        bin_path, "megatron", file_dtype, 0, st.st_size // file_dtype.itemsize, st.st_size, st.st_mtime_ns
    )
    return file, offsets
