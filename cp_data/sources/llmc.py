"""llm.c / modded-nanogpt ``.bin`` shards: a 256 x int32 header, then the tokens.

Header: ``[magic, version, token count, 0, ...]``. GPT-2 shards have magic 20240520, version 1
and uint16 tokens; llama-3 shards magic 20240801, version 7 and uint32 tokens. llm.c writes a
delimiter token at the start of every document (GPT-2's ``<|endoftext|>`` = 50256, llama-3's
``<|begin_of_text|>`` = 128000), so these files are BOS-delimited by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .base import TokenFile

__all__ = ["HEADER_BYTES", "LLMC_MODELS", "LlmcModel", "llmc_model", "open_llmc"]

HEADER_BYTES = 256 * 4


@dataclass(frozen=True)
class LlmcModel:
    """One llm.c header kind."""

    name: str
    magic: int
    version: int
    dtype: str
    bos_token_id: int


LLMC_MODELS = (
    LlmcModel("gpt-2", 20240520, 1, "uint16", 50256),
    LlmcModel("llama-3", 20240801, 7, "uint32", 128000),
)


def llmc_model(magic: int):
    """The header kind with this magic, or None."""
    return next((m for m in LLMC_MODELS if m.magic == magic), None)


def open_llmc(path: str) -> tuple[TokenFile, LlmcModel]:
    """An llm.c shard, its header checked against the file size, and its header kind."""
    st = os.stat(path)
    if st.st_size < HEADER_BYTES:
        raise ValueError(f"{path} is truncated: {st.st_size} bytes, shorter than the {HEADER_BYTES}-byte llm.c header")
    header = np.fromfile(path, dtype="<i4", count=3)
    magic, version, count = (int(v) for v in header)
    model = llmc_model(magic)
    if model is None:
        known = ", ".join(f"{m.magic} ({m.name})" for m in LLMC_MODELS)
        raise ValueError(f"{path} is not an llm.c shard: magic {magic}, expected one of {known}")
    if version != model.version:
        raise ValueError(f"{path} has llm.c {model.name} version {version}; expected {model.version}")
    file_dtype = np.dtype(model.dtype)
    expected = HEADER_BYTES + count * file_dtype.itemsize
    if count < 0 or st.st_size != expected:
        raise ValueError(
            f"{path} is truncated or overlong: its header counts {count} tokens ({expected} bytes) "
            f"but the file has {st.st_size} bytes"
        )
    return TokenFile(path, "llmc", file_dtype, HEADER_BYTES, count, st.st_size, st.st_mtime_ns), model
