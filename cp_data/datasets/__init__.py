"""Hugging Face datasets layer: packed map-style and streaming datasets, tokenisation, corpus."""

from cp_data.sources import open_token_files

from .corpus import (
    default_cache_dir,
    get_tokenizer,
    load_default_corpus,
    load_text_files,
    packed_dataset_from_files,
    train_bpe,
)
from .packed import PackedDataset
from .store import TokenStore
from .stream_state import load_stream_state, stream_state
from .streaming import PackedIterableDataset
from .tokenize import ByteTokenizer, tokenize_dataset

__all__ = [
    "ByteTokenizer",
    "PackedDataset",
    "PackedIterableDataset",
    "TokenStore",
    "default_cache_dir",
    "get_tokenizer",
    "load_default_corpus",
    "load_stream_state",
    "load_text_files",
    "open_token_files",
    "packed_dataset_from_files",
    "stream_state",
    "tokenize_dataset",
    "train_bpe",
]
