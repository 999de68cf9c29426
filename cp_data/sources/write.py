"""Writers for every token-file format cp-data reads (tests, the pipeline, converting corpora).

Each writes documents exactly as given: delimiter tokens (EOS, BOS) are the caller's, as in the
tools that make these files.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .llmc import HEADER_BYTES, LLMC_MODELS
from .megatron import DTYPE_CODES, HEADER, MAGIC
from .raw import sidecar_path

__all__ = ["write_llmc", "write_megatron", "write_megatron_index", "write_numpy"]

Documents = Iterable[Sequence[int]]


def as_ids(tokens, dtype: np.dtype, what: str = "document") -> np.ndarray:
    """``tokens`` as a 1-D array of ``dtype``, raising ``ValueError`` for ids it cannot hold."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise ValueError(f"{what} must be a 1-D sequence of integer ids, got dtype {arr.dtype} shape {arr.shape}")
    info = np.iinfo(dtype)
    lo, hi = arr.min(), arr.max()
    if lo < info.min or hi > info.max:
        raise ValueError(f"{what} holds id {lo if lo < info.min else hi}, outside {dtype} [{info.min}, {info.max}]")
    return arr.astype(dtype, copy=False)


def _write_docs(f, documents: Documents, dtype: np.dtype) -> list[int]:
    """Append every document's tokens to ``f``; return their lengths."""
    lengths = []
    for i, doc in enumerate(documents):
        arr = as_ids(doc, dtype, f"document {i}")
        f.write(arr.tobytes())
        lengths.append(arr.size)
    return lengths


def write_numpy(
    path: Union[str, Path], documents: Documents, dtype="uint32", *, sidecar: bool = False
) -> Path:
    """A headerless token array (OLMo-core/Dolma numpy; a nanoGPT ``.bin`` with uint16).

    With ``sidecar``, also the ``.csv.gz`` beside it with one ``start,end`` row per document
    (which may then be empty, as no delimiter is needed).
    """
    path = Path(path)
    with open(path, "wb") as f:
        lengths = _write_docs(f, documents, np.dtype(dtype))
    if sidecar:
        ends = np.cumsum(lengths, dtype=np.int64)
        rows = np.stack([ends - np.asarray(lengths, dtype=np.int64), ends], axis=1)
        with gzip.open(sidecar_path(str(path)), "wt") as f:
            np.savetxt(f, rows, fmt="%d", delimiter=",")
    return path


def write_megatron(
    prefix: Union[str, Path],
    sequences: Documents,
    dtype="uint16",
    *,
    document_indices: Optional[Sequence[int]] = None,
    sequence_modes: Optional[Sequence[int]] = None,
) -> tuple[Path, Path]:
    """``<prefix>.idx`` and ``<prefix>.bin`` of a Megatron-LM indexed dataset.

    ``document_indices`` groups the sequences into documents (default: one sequence each, i.e.
    ``0, 1, ..., len(sequences)``); ``sequence_modes`` (int8 per sequence) makes a multimodal index.
    """
    dtype = np.dtype(dtype)
    megatron_code(dtype)  # fail before writing anything
    bin_path = Path(f"{prefix}.bin")
    with open(bin_path, "wb") as f:
        lengths = _write_docs(f, sequences, dtype)
    idx = write_megatron_index(f"{prefix}.idx", lengths, dtype, document_indices=document_indices,
                               sequence_modes=sequence_modes)
    return idx, bin_path


def megatron_code(dtype: np.dtype) -> int:
    """Megatron's code for a token dtype."""
    codes = {v: k for k, v in DTYPE_CODES.items()}
    if np.dtype(dtype).name not in codes:
        raise ValueError(f"Megatron has no dtype code for {dtype}; known: {sorted(codes)}")
    return codes[np.dtype(dtype).name]


def write_megatron_index(
    path: Union[str, Path],
    sequence_lengths,
    dtype,
    *,
    document_indices: Optional[Sequence[int]] = None,
    sequence_modes: Optional[Sequence[int]] = None,
) -> Path:
    """The ``.idx`` of a ``.bin`` holding sequences of these lengths back to back (see
    :func:`write_megatron`)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if lengths.size and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError(f"a Megatron sequence holds at most 2**31 - 1 tokens, got {lengths.max()}")
    pointers = (np.cumsum(lengths) - lengths) * dtype.itemsize
    doc_idx = np.arange(lengths.size + 1) if document_indices is None else np.asarray(document_indices)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, megatron_code(dtype), lengths.size, doc_idx.size))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())
        if sequence_modes is not None:
            f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes())
    return path


def write_llmc(path: Union[str, Path], documents: Documents, model: str = "gpt-2") -> Path:
    """An llm.c shard: the 256 x int32 header of ``model`` (``gpt-2``: uint16 tokens,
    ``llama-3``: uint32), then the documents' tokens."""
    kinds = {m.name: m for m in LLMC_MODELS}
    if model not in kinds:
        raise ValueError(f"model must be one of {sorted(kinds)}, got {model!r}")
    kind = kinds[model]
    path = Path(path)
    with open(path, "wb") as f:
        f.write(bytes(HEADER_BYTES))
        count = sum(_write_docs(f, documents, np.dtype(kind.dtype)))
        if count >= 2**31:
            raise ValueError(f"an llm.c shard holds fewer than 2**31 tokens, got {count}")
        f.seek(0)
        f.write(struct.pack("<3i", kind.magic, kind.version, count))
    return path

