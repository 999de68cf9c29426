"""Hugging Face datasets layer: packed map-style and streaming datasets, tokenisation, corpus."""

from .packed import PackedDataset
from .store import TokenStore
from .streaming import PackedIterableDataset

__all__ = ["PackedDataset", "PackedIterableDataset", "TokenStore"]
