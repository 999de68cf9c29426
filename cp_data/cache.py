"""Where cp-data keeps what it computes once and reuses: corpora, tokenizers, token-file indices."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["default_cache_dir"]


def default_cache_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """``cache_dir``, else ``$CP_DATA_CACHE``, else ``$XDG_CACHE_HOME/cp_data`` (~/.cache/cp_data)."""
    if cache_dir is None:
        cache_dir = os.environ.get("CP_DATA_CACHE")
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cp_data"
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
