"""Headerless token arrays: OLMo-core / Dolma numpy files and nanoGPT ``.bin`` files.

Both are the raw bytes of a 1-D token array (``np.memmap`` writes them; OLMo-core names them
``.npy`` although they have no numpy header). nanoGPT files are uint16 and EOS-delimited; numpy
files have the dtype the user gives, and documents are delimited by an EOS (and/or BOS) id or
listed by a metadata sidecar: the token file's path with its suffix replaced by ``.csv.gz``,
gzip text with one ``start,end[,...]`` row per document (what OLMo-core's
``write_document_indices`` writes). With a sidecar the tokens are never scanned. A file that
does start with a real numpy header (``np.save``) is read with the dtype the header gives.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from .base import TokenFile, map_tokens

__all__ = ["TOKEN_DTYPES", "open_raw", "read_sidecar", "sidecar_path"]

TOKEN_DTYPES = ("uint8", "uint16", "uint32", "uint64")
"""The dtypes of headerless token files."""

NPY_MAGIC = b"\x93NUMPY"


def sidecar_path(path: str) -> Path:
    """``data/part-0.npy`` -> ``data/part-0.csv.gz``."""
    return Path(path).with_suffix(".csv.gz")


def _npy_header(path: str) -> Optional[tuple[np.dtype, int]]:
    """(dtype, header bytes) of a file written by ``np.save``, else None."""
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            return None
        f.seek(0)
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{path} has numpy format version {version}; supported: 1.0 and 2.0")
        shape, _, dtype = readers[version](f)
        if len(shape) != 1 or dtype.kind not in "ui":
            raise ValueError(f"{path} holds a numpy array of shape {shape} and dtype {dtype}; expected 1-D integer ids")
        return dtype, f.tell()


def _first(mask: np.ndarray) -> Optional[int]:
    bad = np.flatnonzero(mask)
    return int(bad[0]) if bad.size else None


def read_sidecar(path: Path, file: str, num_tokens: int) -> np.ndarray:
    """Document offsets from a ``start,end`` sidecar, checked against the token file.

    Rows must tile the file from token 0 in order (each start equal to the previous end, each
    end >= its start, no end beyond the file); tokens after the last row form a final document.
    """
    with gzip.open(path, "rt") as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
        try:
            rows = np.loadtxt(f, delimiter=",", usecols=(0, 1), dtype=np.int64, ndmin=2)
        except ValueError as exc:
            raise ValueError(f"sidecar {path} is not 'start,end' integer rows: {exc}") from None
    starts, ends = rows[:, 0], rows[:, 1]
    expected = np.concatenate(([0], ends[:-1]))
    where = f"sidecar {path} disagrees with {file}: row"
    if (i := _first(starts != expected)) is not None:
        raise ValueError(f"{where} {i} starts at {starts[i]}, but the previous document ends at {expected[i]}")
    if (i := _first(ends < starts)) is not None:
        raise ValueError(f"{where} {i} ends at {ends[i]}, before its start {starts[i]}")
    if (i := _first(ends > num_tokens)) is not None:
        raise ValueError(f"{where} {i} ends at {ends[i]}, past the file's {num_tokens} tokens")
    last = int(ends[-1]) if ends.size else 0
    tail = [num_tokens] if num_tokens > last else []
    return np.concatenate(([0], ends, tail)).astype(np.int64)


def open_raw(path: str, fmt: str, dtype: Optional[np.dtype]) -> tuple[TokenFile, np.ndarray, Optional[np.ndarray]]:
    """A headerless (or ``np.save``) token file: its description, its tokens and, from a sidecar,
    its document offsets (None when the documents must be found by a delimiter scan).

    ``dtype``: one of :data:`TOKEN_DTYPES` or None (then nanoGPT files are uint16).
    """
    st = os.stat(path)
    header = _npy_header(path)
    if header is not None:  # its own dtype wins over the one given for headerless files
        file_dtype, header_bytes = header
    else:
        if dtype is None:
            if fmt != "nanogpt":
                raise ValueError(
                    f"{path} is a headerless token file: pass its dtype (dtype= or --dtype; "
                    f"one of {', '.join(TOKEN_DTYPES)})"
                )
            dtype = np.dtype(np.uint16)
        file_dtype, header_bytes = dtype, 0
    payload = st.st_size - header_bytes
    if payload % file_dtype.itemsize:
        raise ValueError(
            f"{path} is truncated: {payload} bytes is not a whole number of {file_dtype} tokens"
        )
    file = TokenFile(path, fmt, file_dtype, header_bytes, payload // file_dtype.itemsize, st.st_size, st.st_mtime_ns)
    tokens = map_tokens(path, file_dtype, header_bytes, file.num_tokens)
    side = sidecar_path(path)
    offsets = read_sidecar(side, path, file.num_tokens) if side.exists() else None
    return file, tokens, offsets
