"""Text column -> token-id column with any tokenizer, through ``Dataset.map(batched=True)``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import datasets
import numpy as np

from cp_data.balancers.validation import is_int

from .store import check_column

__all__ = ["ByteTokenizer", "tokenize_dataset", "resolve_eos"]

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value + 1, with 0 reserved for EOS (vocab size 257)."""

    eos_token_id = 0
    vocab_size = 257

    def __call__(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 1

    def decode(self, ids) -> str:
        """Inverse of ``__call__`` (EOS and unknown ids dropped)."""
        ids = np.asarray(ids)
        ids = ids[(ids > 0) & (ids < 257)]
        return (ids - 1).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def resolve_eos(tokenizer: Any) -> Optional[int]:
    """The EOS id a tokenizer declares (``eos_token_id`` or a known EOS token), else None."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (int, np.integer)):
        return int(eos)
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if callable(token_to_id):
        for name in _EOS_NAMES:
            eos = token_to_id(name)
            if eos is not None:
                return int(eos)
    return None


def _encode_batch(tokenizer: Any, texts: list[str]) -> list:
    """Encode with whatever interface the tokenizer has (checked most specific first)."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if callable(encode_batch):  # tokenizers.Tokenizer: Rust, parallel over the batch
        return [e.ids for e in encode_batch(texts, add_special_tokens=False)]
    if callable(tokenizer) and callable(getattr(tokenizer, "encode", None)):  # transformers-like
        return list(tokenizer(texts)["input_ids"])
    if callable(getattr(tokenizer, "encode", None)):
        return [getattr(e, "ids", e) for e in map(tokenizer.encode, texts)]
    if callable(tokenizer):
        return [tokenizer(t) for t in texts]
    raise ValueError(f"tokenizer must be callable or have encode/encode_batch, got {type(tokenizer)}")


class _Tokenize:
    """The ``map`` function; a class so that ``num_proc`` workers can pickle it."""

    def __init__(self, tokenizer: Any, text_column: str, output_column: str, eos: Optional[int]):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.output_column = output_column
        self.eos = eos

    def __call__(self, batch: dict) -> dict:
        texts = [t if t is not None else "" for t in batch[self.text_column]]
        out = []
        for ids in _encode_batch(self.tokenizer, texts):
            arr = np.asarray(ids)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"tokenizer returned non-integer tokens (dtype {arr.dtype})")
            if arr.size and self.eos is not None:  # an empty document stays empty (skipped later)
                arr = np.append(arr, self.eos)
            out.append(arr.astype(np.int32, copy=False))
        return {self.output_column: out}


def tokenize_dataset(
    dataset,
    tokenizer: Union[Any, Callable[[str], Any]],
    *,
    text_column: str = "text",
    output_column: str = "input_ids",
    eos_token_id: Union[int, None, str] = "auto",
    keep_columns: bool = False,
    num_proc: Optional[int] = None,
    batch_size: int = 1000,
):
    """Add ``output_column`` (int32 token ids, EOS appended) computed from ``text_column``.

    ``tokenizer`` is a ``tokenizers.Tokenizer``, a transformers-like tokenizer (``__call__`` on a
    list of texts returning ``input_ids``), an object with ``encode``, or a callable text -> ids.
    ``eos_token_id="auto"`` takes the tokenizer's own EOS and raises if it has none; ``None``
    appends nothing. Works on ``Dataset`` (``num_proc`` parallel) and ``IterableDataset`` (lazy).
    """
    if dataset.column_names is not None:
        check_column(dataset, text_column)
    eos = resolve_eos(tokenizer) if eos_token_id == "auto" else eos_token_id
    if eos_token_id == "auto" and eos is None:
        raise ValueError(
            f"cannot find an EOS id on tokenizer {type(tokenizer).__name__}; "
            "pass eos_token_id=<int>, or eos_token_id=None to append none"
        )
    if eos is not None and not is_int(eos):
        raise ValueError(f"eos_token_id must be an integer, None or 'auto', got {eos_token_id!r}")
    remove = None if keep_columns else dataset.column_names
    kwargs = {"num_proc": num_proc, "desc": "tokenize"} if isinstance(dataset, datasets.Dataset) else {}
    return dataset.map(
        _Tokenize(tokenizer, text_column, output_column, eos),
        batched=True,
        batch_size=batch_size,
        remove_columns=remove,
        **kwargs,
    )
