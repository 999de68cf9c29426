"""Map-style packed dataset: plan once over a Hugging Face dataset's lengths, build rows on demand."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from cp_data.packing import PackingConfig, assemble_row

from cp_data.sources import DocumentSource

from .store import TokenStore, as_token_store, describe_source

__all__ = ["PackedDataset", "as_config", "open_store", "to_instance"]


def as_config(config: Union[PackingConfig, int]) -> PackingConfig:
    """Accept a :class:`PackingConfig` or a bare sequence length."""
    if isinstance(config, PackingConfig):
        return config
    return PackingConfig(seq_len=config)


def open_store(source, column: str) -> "TokenStore | DocumentSource":
    """The documents of a map-style ``source``; ``ValueError`` when it has nothing to pack."""
    if not isinstance(source, DocumentSource) and not hasattr(source, "with_format"):
        raise ValueError(
            "source must be a datasets.Dataset, a datasets.IterableDataset or a token-file source "
            f"from open_token_files, got {type(source).__name__}"
        )
    store = as_token_store(source, column)
    if not len(store):
        raise ValueError(f"the source ({describe_source(source)}) has no documents; nothing to pack")
    if not store.lengths.any():
        raise ValueError(f"all {len(store)} documents of the source ({describe_source(source)}) are empty")
    return store


def to_instance(row: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A numpy row as the packed instance the collator takes (the same keys, as torch tensors)."""
    return {k: torch.from_numpy(v) for k, v in row.items()}


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of length ``seq_len`` over a HF ``Dataset`` with a token-id column, or over a
    token-file source (:func:`cp_data.datasets.open_token_files`).

    The plan is made once from the document lengths (O(n log n)); ``dataset[i]`` then copies only
    the tokens of row ``i``. Each item is a packed instance: ``input_ids`` int64 [S],
    ``doc_lens`` int64 [n] (> 0, summing to S, trailing padding as one document) and
    ``label_mask`` bool [S] (False on padding). Empty documents are skipped and counted; a source
    with no documents, or only empty ones, and negative token ids raise ``ValueError``.
    """

    def __init__(self, dataset, config: Union[PackingConfig, int], column: str = "input_ids") -> None:
        self.config = as_config(config)
        self.store = open_store(dataset, column)
        self.plan = self.config.build().plan(self.store.lengths)

    def __len__(self) -> int:
        return self.plan.num_rows

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` as numpy arrays."""
        if i < 0:
            i += len(self)
        gather = getattr(self.store, "gather", None)  # token files fetch a row in one call
        return assemble_row(self.plan, i, self.store.tokens, self.config.pad_token_id, gather=gather)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return to_instance(self.row(int(i)))

    def row_doc_lens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's ``doc_lens`` without building rows (see :meth:`PackingPlan.row_doc_lens`)."""
        return self.plan.row_doc_lens()

    def metrics(self) -> dict:
        """Rows, fill rate, padding fraction, documents split/truncated, empty documents skipped."""
        return self.plan.metrics()
