"""Hugging Face datasets layer: packed map-style and streaming datasets, tokenisation, corpus."""

from .packed import PackedDataset
from .store import TokenStore

__all__ = ["PackedDataset", "TokenStore"]
