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
        """Every row's ``doc_lens`` from the plan, without building rows: ``(doc_lens, row_offsets)``,
        row ``i`` holding ``doc_lens[row_offsets[i]:row_offsets[i + 1]]`` (int64)."""
        plan = self.plan
        free = plan.seq_len - plan.row_used()  # the trailing padding document, where there is one
        ends = plan.row_offsets[1:]
        lens = np.insert(plan.length + plan.pad, ends[free > 0], free[free > 0])
        offsets = np.concatenate([[0], ends + np.cumsum(free > 0)])
        return lens.astype(np.int64), offsets.astype(np.int64)

    def metrics(self) -> dict:
        """Rows, fill rate, padding fraction, documents split/truncated, empty documents skipped."""
        return self.plan.metrics()
