"""Map-style packed dataset: plan once over a Hugging Face dataset's lengths, build rows on demand."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from cp_data.packing import PackingConfig, assemble_row

from .store import TokenStore

__all__ = ["PackedDataset", "as_config", "to_instance"]


def as_config(config: Union[PackingConfig, int]) -> PackingConfig:
    """Accept a :class:`PackingConfig` or a bare sequence length."""
    if isinstance(config, PackingConfig):
        return config
    return PackingConfig(seq_len=config)


def to_instance(row: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy row -> SPEC §3 packed instance (torch tensors, int64/bool)."""
    return {k: torch.from_numpy(v) for k, v in row.items()}


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of length ``seq_len`` over a HF ``Dataset`` with a token-id column.

    The plan is made once from the document lengths (O(n log n)); ``dataset[i]`` then copies only
    the tokens of row ``i``. Each item is a SPEC §3 packed instance: ``input_ids`` int64 [S],
    ``doc_lens`` int64 [n] (> 0, summing to S, trailing padding as one document) and
    ``label_mask`` bool [S] (False on padding). Empty documents are skipped and counted.
    """

    def __init__(self, dataset, config: Union[PackingConfig, int], column: str = "input_ids") -> None:
        self.config = as_config(config)
        self.store = TokenStore(dataset, column)
        self.plan = self.config.build().plan(self.store.lengths)

    def __len__(self) -> int:
        return self.plan.num_rows

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` as numpy arrays."""
        if i < 0:
            i += len(self)
        return assemble_row(self.plan, i, self.store.tokens, self.config.pad_token_id)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return to_instance(self.row(int(i)))

    def row_doc_lens(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's ``doc_lens`` without building rows (see :meth:`PackingPlan.row_doc_lens`)."""
        return self.plan.row_doc_lens()

    def metrics(self) -> dict:
        """Rows, fill rate, padding fraction, documents split/truncated, empty documents skipped."""
        return self.plan.metrics()
