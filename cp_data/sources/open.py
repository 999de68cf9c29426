"""``open_token_files``: paths, globs or directories of token files -> one :class:`DocumentSource`."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from cp_data.balancers.validation import is_int

from .base import DocumentSource, check_id_fits, check_vocab_size, map_tokens
from .llmc import llmc_model, open_llmc
from .megatron import megatron_prefix, open_megatron
from .raw import TOKEN_DTYPES, open_raw
from .scan import delimited_offsets

__all__ = ["FORMATS", "TOKEN_SUFFIXES", "is_token_path", "open_token_files", "resolve_token_paths", "sniff_format"]

FORMATS = ("numpy", "nanogpt", "megatron", "llmc")
"""OLMo-core/Dolma numpy arrays, nanoGPT ``.bin``, Megatron ``.idx``/``.bin``, llm.c ``.bin``."""

TOKEN_SUFFIXES = (".npy", ".bin", ".idx")
"""Suffixes of the token files a directory or ``cp-data inspect`` picks up."""

PathsLike = Union[str, Path, Sequence[Union[str, Path]]]


def _is_megatron_prefix(path: str) -> bool:
    return not Path(path).exists() and Path(path + ".idx").exists()


def is_token_path(path: Union[str, Path]) -> bool:
    """A token file (by suffix), a Megatron prefix, a glob matching one, or a directory holding one."""
    text = str(path)
    if glob.has_magic(text):
        return any(map(is_token_path, glob.glob(text, recursive=True)))
    p = Path(text)
    if p.is_dir():
        return any(q.suffix in TOKEN_SUFFIXES and q.is_file() for q in p.rglob("*"))
    return p.suffix in TOKEN_SUFFIXES or _is_megatron_prefix(text)


def resolve_token_paths(paths: PathsLike) -> list[str]:
    """The token files named by ``paths`` (files, Megatron prefixes, globs, directories), in order.

    Directories contribute their ``.npy``/``.bin``/``.idx`` files recursively, sorted; a Megatron
    dataset's ``.idx`` and ``.bin`` count once.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError("no token files given")
    files: list[str] = []
    for raw in map(str, items):
        matches = sorted(glob.glob(raw, recursive=True)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise FileNotFoundError(f"no files match {raw}")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = sorted(str(q) for q in p.rglob("*") if q.suffix in TOKEN_SUFFIXES and q.is_file())
                if not found:
                    raise ValueError(f"{m} holds no {'/'.join(TOKEN_SUFFIXES)} token files")
                files += found
            elif p.exists() or _is_megatron_prefix(m):
                files.append(m)
            else:
                raise FileNotFoundError(f"no such file or directory: {m}")
    seen, unique = set(), []
    for f in files:  # x.idx and x.bin of one Megatron dataset are one entry
        key = megatron_prefix(f) if sniff_format(f) == "megatron" else f
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def sniff_format(path: str) -> str:
    """The format of a token file, from its suffix, a sibling ``.idx`` and its first bytes."""
    p = Path(path)
    if p.suffix == ".idx" or _is_megatron_prefix(path) or (p.suffix == ".bin" and p.with_suffix(".idx").exists()):
        return "megatron"
    if p.suffix == ".bin":
        with open(p, "rb") as f:
            head = f.read(4)
        magic = int.from_bytes(head, "little", signed=True) if len(head) == 4 else None
        return "llmc" if llmc_model(magic) is not None else "nanogpt"
    return "numpy"


def _dtype(dtype) -> Optional[np.dtype]:
    if dtype is None:
        return None
    try:
        result = np.dtype(dtype)
    except TypeError:
        result = None
    if result is None or result.name not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    return result


def _check_special(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def open_token_files(
    paths: PathsLike,
    *,
    format: Optional[str] = None,
    dtype=None,
    eos_token_id: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    cache: Union[bool, str, Path] = True,
) -> DocumentSource:
    """Documents of tokenised corpora, read in place (memory-mapped) from one or many files.

    ``paths``: a file, a Megatron prefix, a glob, a directory (its ``.npy``/``.bin``/``.idx``
    files, recursively), or a list of these. ``format`` is one of ``numpy`` (OLMo-core/Dolma
    headerless arrays), ``nanogpt`` (headerless uint16 ``.bin``), ``megatron`` (``.idx`` +
    ``.bin``) or ``llmc`` (llm.c ``.bin`` with a 256 x int32 header); None sniffs every file:
    ``.idx`` or a ``.bin`` beside an ``.idx`` is Megatron, a ``.bin`` starting with an llm.c magic
    is llm.c, another ``.bin`` nanoGPT, anything else numpy.

    Documents come from the Megatron index, from a numpy file's ``.csv.gz`` sidecar, or else
    from a scan for ``eos_token_id`` (a document ends with its EOS; tokens after the last EOS form
    a final document) and/or ``bos_token_id`` (a document starts with its BOS). llm.c files
    default to their header's BOS (50256 for GPT-2, 128000 for llama-3) when neither is given.
    Scans are vectorised and cached (``cache``: True for the cp-data cache dir, a directory, or
    False), so each file is scanned once. ``dtype`` is that of the headerless files (required for
    numpy ones; nanoGPT defaults to uint16); files with a header (Megatron, llm.c, ``np.save``)
    use the dtype it states, so one call can mix formats.
    ``vocab_size`` makes every token read check its id against it.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    dtype = _dtype(dtype)
    vocab_size = check_vocab_size(vocab_size)
    eos = _check_special(eos_token_id, "eos_token_id")
    bos = _check_special(bos_token_id, "bos_token_id")
    paths = resolve_token_paths(paths)
    files, offsets = [], []
    for path in tqdm(paths, desc="open token files", leave=False, disable=len(paths) < 16):
        fmt = format or sniff_format(path)
        if fmt == "megatron":
            file, doc_offsets = open_megatron(path)
        else:
            delimiters = (eos, bos)
            if fmt == "llmc":
                file, model = open_llmc(path)
                tokens = map_tokens(file.path, file.dtype, file.header_bytes, file.num_tokens)
                doc_offsets = None
                if delimiters == (None, None):
                    delimiters = (None, model.bos_token_id)
            else:
                file, tokens, doc_offsets = open_raw(path, fmt, dtype)
            if doc_offsets is None:
                if delimiters == (None, None):
                    raise ValueError(
                        f"{path} has no index or .csv.gz sidecar: pass eos_token_id or bos_token_id "
                        "(--eos-id) to find its documents"
                    )
                check_id_fits(delimiters[0], "eos_token_id", file.dtype, path, vocab_size)
                check_id_fits(delimiters[1], "bos_token_id", file.dtype, path, vocab_size)
                doc_offsets = delimited_offsets(file, tokens, *delimiters, cache=cache)
        files.append(file)
        offsets.append(doc_offsets)
    return DocumentSource(files, offsets, vocab_size)
