"""Token-file sources: tokenised corpora read in place, memory-mapped, with document boundaries.

Formats: OLMo-core/Dolma numpy arrays (EOS/BOS-delimited, or listed by a ``.csv.gz`` sidecar),
Megatron-LM indexed datasets (``.idx`` + ``.bin``), nanoGPT ``.bin`` (uint16, EOS-delimited) and
llm.c / modded-nanogpt ``.bin`` (256 x int32 header, BOS-delimited). :func:`open_token_files`
turns any mix of them into one :class:`DocumentSource` that the packing datasets accept as they
accept a Hugging Face dataset. Only numpy (and tqdm) is needed here.
"""

from .base import DocumentSource, Provenance, TokenFile
from .open import FORMATS, TOKEN_SUFFIXES, is_token_path, open_token_files, resolve_token_paths, sniff_format
from .scan import scan_offsets
from .write import write_llmc, write_megatron, write_numpy

__all__ = [
    "FORMATS",
    "TOKEN_SUFFIXES",
    "DocumentSource",
    "Provenance",
    "TokenFile",
    "is_token_path",
    "open_token_files",
    "resolve_token_paths",
    "scan_offsets",
    "sniff_format",
    "write_llmc",
    "write_megatron",
    "write_numpy",
]
