"""Document boundaries of a delimited token file: one vectorised scan, cached on disk.

The scan reads the mapped tokens in chunks (a few MB each) so its temporaries stay bounded
whatever the file size. The result — int64 document offsets — is cached under
``<cp-data cache dir>/token_index/`` keyed by the file's resolved path, size, modification time,
dtype, header size and delimiter ids, so a changed file is scanned again and the cache is never
trusted blindly. Files of fewer than :data:`CACHE_MIN_TOKENS` tokens are scanned every time
(faster than a cache round trip).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
from tqdm.auto import tqdm

from cp_data.cache import default_cache_dir

from .base import TokenFile

__all__ = ["CACHE_MIN_TOKENS", "CHUNK_TOKENS", "delimited_offsets", "scan_offsets"]

CHUNK_TOKENS = 1 << 20
"""Tokens compared per step: 1-8 MB of tokens plus 1 MB of mask, cache-friendly."""

CACHE_MIN_TOKENS = 1 << 20
"""Smaller files are not cached."""

PROGRESS_MIN_TOKENS = 1 << 27
"""Files this large show a progress bar while scanned."""


def scan_offsets(
    tokens: np.ndarray,
    eos_token_id: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    *,
    desc: str = "scan",
) -> np.ndarray:
    """Document offsets ``[0, ..., len(tokens)]`` (int64): cut after every EOS, before every BOS.

    A document includes its EOS (and its BOS); tokens after the last EOS form a final document,
    tokens before the first BOS a first one. With both ids given, a cut is made at either.
    """
    if eos_token_id is None and bos_token_id is None:
        raise ValueError("scan_offsets needs eos_token_id or bos_token_id")
    n = tokens.size
    cuts = []
    bar = tqdm(total=n, desc=desc, unit="tok", unit_scale=True, leave=False, disable=n < PROGRESS_MIN_TOKENS)
    for lo in range(0, n, CHUNK_TOKENS):
        chunk = tokens[lo : lo + CHUNK_TOKENS]
        if eos_token_id is not None:
            after_eos = np.flatnonzero(chunk == eos_token_id)
            after_eos += lo + 1
            cuts.append(after_eos)
        if bos_token_id is not None:
            at_bos = np.flatnonzero(chunk == bos_token_id)
            at_bos += lo
            cuts.append(at_bos)
        bar.update(chunk.size)
    bar.close()
    inner = np.concatenate(cuts) if cuts else np.zeros(0, dtype=np.int64)
    if eos_token_id is not None and bos_token_id is not None:
        inner = np.unique(inner)  # EOS then BOS is one cut, not two
    inner = inner[(inner > 0) & (inner < n)]
    return np.concatenate(([0], inner, [n] if n else [])).astype(np.int64, copy=False)


def _cache_path(file: TokenFile, eos: Optional[int], bos: Optional[int], cache_dir) -> Path:
    key = "|".join(
        map(str, ("v1", os.path.realpath(file.path), file.size, file.mtime_ns, file.dtype.str,
                  file.header_bytes, eos, bos))
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return default_cache_dir(cache_dir) / "token_index" / f"{digest}.npy"


def _load_cached(path: Path, num_tokens: int) -> Optional[np.ndarray]:
    try:
        offsets = np.load(path)
    except (OSError, ValueError):
        return None
    ok = (
        offsets.dtype == np.int64 and offsets.ndim == 1 and offsets.size >= 1 and offsets[0] == 0
        and offsets[-1] == num_tokens and bool((np.diff(offsets) > 0).all())
    )
    return offsets if ok else None


def delimited_offsets(
    file: TokenFile,
    tokens: np.ndarray,
    eos_token_id: Optional[int],
    bos_token_id: Optional[int],
    cache: Union[bool, str, Path] = True,
) -> np.ndarray:
    """:func:`scan_offsets` of a file's tokens, read from / written to the cache when worth it.

    ``cache``: True (the cp-data cache dir), a directory, or False (always scan).
    """
    use_cache = cache is not False and file.num_tokens >= CACHE_MIN_TOKENS
    if use_cache:
        path = _cache_path(file, eos_token_id, bos_token_id, None if cache is True else cache)
        offsets = _load_cached(path, file.num_tokens)
        if offsets is not None:
            return offsets
    offsets = scan_offsets(tokens, eos_token_id, bos_token_id, desc=f"scan {Path(file.path).name}")
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
            np.save(tmp, offsets)
            tmp.replace(path)  # atomic: concurrent readers never see half a file
        except OSError as exc:
            warnings.warn(f"could not cache the document offsets of {file.path}: {exc}", stacklevel=2)
    return offsets
