"""Input checks shared by the balancers; every failure names the offending value."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class ShardingError(ValueError, RuntimeError):
    """Bad input to a balancer or shard plan.

    It is both a ``ValueError`` (what cp-data promises) and a ``RuntimeError`` (what code written
    against the upstream OLMo-core module catches), so either ``except`` clause works.
    """


def is_int(value) -> bool:
    """A Python or numpy integer; ``bool`` (an ``int`` subclass) is not one."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def round_up(value, multiple: int):
    """The smallest multiple of ``multiple`` that is ``>= value`` (an int, or elementwise on an array)."""
    return -(-value // multiple) * multiple


def normalize_dim(dim: int, ndim: int, what: str = "seq_dim") -> int:
    """Resolve a possibly negative dimension as torch does, raising for one out of range."""
    if not is_int(dim):
        raise ShardingError(f"{what} must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ShardingError(f"{what}={dim} is out of range for a tensor with {ndim} dimensions")
    return int(dim) % ndim


def _preview(values: np.ndarray, limit: int = 12) -> str:
    items = values.tolist()
    return str(items) if len(items) <= limit else f"{items[:limit]}... ({len(items)} values)"


def check_inputs(
    inputs: Sequence[torch.Tensor],
    seq_dims: Sequence[int],
    pad_values: Sequence[int | float | None] | None,
) -> tuple[int | None, list[int]]:
    """Check the shapes of a batch of inputs; return their common sequence length and dims.

    The length is ``None`` when there are no inputs.
    """
    if len(seq_dims) != len(inputs):
        raise ShardingError(f"got {len(inputs)} inputs but {len(seq_dims)} seq_dims")
    if pad_values is not None and len(pad_values) != len(inputs):
        raise ShardingError(f"got {len(inputs)} inputs but {len(pad_values)} pad_values")
    dims, lengths = [], []
    for i, (x, seq_dim) in enumerate(zip(inputs, seq_dims)):
        if not isinstance(x, torch.Tensor):
            raise ShardingError(f"inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
        in_range = type(seq_dim) is int and 0 <= seq_dim < x.ndim  # skip the checks of the usual case
        dim = seq_dim if in_range else normalize_dim(seq_dim, x.ndim, what=f"seq_dims[{i}]")
        dims.append(dim)
        lengths.append(x.shape[dim])
    if len(set(lengths)) > 1:
        raise ShardingError(f"inputs have different sequence lengths {lengths} on their seq_dims")
    return (lengths[0] if lengths else None), dims


_NUMPY_INT_DTYPES = {
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
}


def check_cu_doc_lens(cu_doc_lens: torch.Tensor, seq_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate cumulative document lengths; return them and the lengths as int64 numpy arrays."""
    if not isinstance(cu_doc_lens, torch.Tensor):
        raise ShardingError(f"cu_doc_lens must be a torch.Tensor, got {type(cu_doc_lens).__name__}")
    if cu_doc_lens.ndim != 1:
        raise ShardingError(f"cu_doc_lens must be 1-D, got shape {tuple(cu_doc_lens.shape)}")
    if not cu_doc_lens.is_cpu:
        raise ShardingError(f"cu_doc_lens must be on CPU, got device {cu_doc_lens.device}")
    if cu_doc_lens.dtype not in _NUMPY_INT_DTYPES:
        raise ShardingError(f"cu_doc_lens must have an integer dtype, got {cu_doc_lens.dtype}")
    if cu_doc_lens.numel() == 0:
        raise ShardingError("cu_doc_lens is empty; it must start with 0")
    cu = cu_doc_lens.numpy().astype(np.int64, copy=False)
    if cu[0] != 0:
        raise ShardingError(f"cu_doc_lens must start with 0, got {_preview(cu)}")
    lengths = cu[1:] - cu[:-1]
    if len(lengths) and lengths.min() < 0:
        raise ShardingError(f"cu_doc_lens must be non-decreasing, got {_preview(cu)}")
    if seq_len is not None and cu[-1] != seq_len:
        raise ShardingError(
            f"cu_doc_lens ends at {int(cu[-1])} but the inputs have sequence length {seq_len}"
        )
    return cu, lengths


def check_lengths(values, what: str, minimum: int = 0) -> np.ndarray:
    """A 1-D array of integer lengths, each ``>= minimum``, as int64; else a named error."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ShardingError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ShardingError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < minimum:
        bad = int(np.argmax(arr < minimum))
        raise ShardingError(f"{what} must be >= {minimum}, got {arr[bad]} at index {bad}")
    return arr


def check_length_multiple(length_multiple: int | None, divisor: int = 1, what: str = "") -> int | None:
    """Check ``length_multiple`` is a positive int divisible by ``divisor`` (``None`` passes)."""
    if length_multiple is None:
        return None
    if not is_int(length_multiple):
        raise ShardingError(f"length_multiple must be an int, got {length_multiple!r}")
    if length_multiple < 1:
        raise ShardingError(f"length_multiple must be >= 1, got {length_multiple}")
    if length_multiple % divisor:
        raise ShardingError(
            f"length_multiple ({length_multiple}) must be divisible by {what} ({divisor})"
        )
    return int(length_multiple)


def metadata_tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A new metadata tensor (never a view of the input) with the dtype of ``cu_doc_lens``."""
    return torch.from_numpy(values.astype(_NUMPY_INT_DTYPES[like.dtype]))
