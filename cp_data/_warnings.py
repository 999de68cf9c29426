"""Warnings that third-party code raises inside cp-data's own calls, where users cannot act on them."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

__all__ = ["SET_VITAL_MESSAGE", "no_set_vital_warning"]

SET_VITAL_MESSAGE = r"'set_vital' is deprecated"
"""Start of the warning torch (2.13) raises when torchdata's StatefulDataLoader calls ``torch.set_vital``."""


@contextmanager
def no_set_vital_warning() -> Iterator[None]:
    """Silence torch's ``'set_vital' is deprecated`` UserWarning inside the block, nothing else.

    torchdata's ``StatefulDataLoader.__init__`` calls ``torch.set_vital``, which torch 2.13
    deprecates; every other warning, that one outside the block included, is left as it was.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SET_VITAL_MESSAGE, category=UserWarning)
        yield
