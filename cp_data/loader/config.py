"""The loader configuration: one call builds the loader of one rank of a DP x CP job."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from cp_data._warnings import no_set_vital_warning
from cp_data.balancers import RingAttentionLoadBalancerType
from cp_data.collate import ContextParallelCollator
from cp_data.work import RowWork, WorkModel, row_work

from .dataloader import ContextParallelLoader
from .mesh import check_rank, dp_cp_coordinates
from .sampler import DataParallelSampler

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["ContextParallelLoaderConfig", "DEFAULT_WORK_MODEL"]

DEFAULT_WORK_MODEL = "llama-8b"
"""Work model preset used by ``dp_balance`` when no ``work_model`` is given."""


def _split_iterable(dataset: IterableDataset, dp_rank: int, dp_world_size: int) -> IterableDataset:
    try:
        import datasets
    except ImportError:  # datasets is optional here
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.IterableDataset):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=dp_rank, world_size=dp_world_size)
    if callable(getattr(dataset, "shard", None)):
        return dataset.shard(num_shards=dp_world_size, index=dp_rank)
    raise ValueError(
        f"cannot split {type(dataset).__name__} by dp rank: it is neither a datasets.IterableDataset "
        "nor has shard(num_shards, index); split it yourself and pass split_iterable=False"
    )


def _packed(dataset: Dataset) -> Any:
    """The dataset itself, or the one an ``IndexedDataset`` wraps."""
    from .verify import IndexedDataset

    return dataset.dataset if isinstance(dataset, IndexedDataset) else dataset


def _digest(*arrays: np.ndarray) -> str:
    sha = hashlib.sha1()
    for a in arrays:
        sha.update(np.ascontiguousarray(a).tobytes())
    return sha.hexdigest()[:16]


@dataclass(kw_only=True)
class ContextParallelLoaderConfig:
    """How to load CP-ready batches for one rank of a DP x CP job; :meth:`build` makes the loader.

    ``batch_size`` packed instances per DP rank form the batch a data-parallel group shares (its
    CP ranks each keep their shard); the collator options are those of
    :class:`~cp_data.collate.ContextParallelCollator`. For map-style datasets every step draws a
    global batch of ``dp_world_size * batch_size`` samples from one order per epoch (see
    :class:`~cp_data.loader.DataParallelSampler`); ``drop_last`` drops the epoch's tail that does
    not fill a global batch.

    ``dp_balance`` assigns each global batch to DP ranks so that the busiest rank's modelled work
    (``work_model``: a :class:`~cp_data.work.WorkModel` or a preset name, default
    ``"llama-8b"``) is as small as the heuristic makes it; ``lookahead`` > 1 balances windows of
    that many steps, regrouping their rows into steps of similar work.
    """

    batch_size: int
    load_balancer: RingAttentionLoadBalancerType | str = RingAttentionLoadBalancerType.zig_zag
    pad_token_id: int = 0
    length_multiple: int | None = None
    document_masking: bool = True
    reorder_documents: bool = False
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    prefetch_factor: int | None = None
    persistent_workers: bool = False
    pin_memory: bool = False
    split_iterable: bool = True
    snapshot_every_n_steps: int = 1
    dp_balance: bool = False
    work_model: WorkModel | str | None = None
    lookahead: int = 1

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("num_workers", 0), ("snapshot_every_n_steps", 1), ("lookahead", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.load_balancer = RingAttentionLoadBalancerType.parse(self.load_balancer)
        if isinstance(self.work_model, str):
            self.work_model = WorkModel.preset(self.work_model)
        elif self.work_model is not None and not isinstance(self.work_model, WorkModel):
            raise ValueError(f"work_model must be a WorkModel or a preset name, got {self.work_model!r}")

    def collator(self, cp_rank: int, cp_world_size: int) -> ContextParallelCollator:
        """The collator of CP rank ``cp_rank``."""
        return ContextParallelCollator(
            load_balancer=self.load_balancer,
            cp_rank=cp_rank,
            cp_world_size=cp_world_size,
            pad_token_id=self.pad_token_id,
            length_multiple=self.length_multiple,
            document_masking=self.document_masking,
            reorder_documents=self.reorder_documents,
        )

    def row_work(self, dataset: Dataset, cp_world_size: int, sample_work: Any = None) -> RowWork:
        """What DP balancing weighs: ``sample_work`` (one number per sample) when given, else the
        work of each packed row from the dataset's ``row_doc_lens()`` under ``work_model``."""
        if sample_work is not None:
            work = np.asarray(sample_work, dtype=np.float64)
            if work.shape != (len(dataset),):
                raise ValueError(f"sample_work must hold one number per sample ({len(dataset)}), got shape {work.shape}")
            return RowWork(work)
        lens = getattr(_packed(dataset), "row_doc_lens", None)
        if lens is None:
            raise ValueError(
                f"dp_balance needs each sample's work, and {type(dataset).__name__} has no row_doc_lens(); "
                "pass build(..., sample_work=[one number per sample])"
            )
        return row_work(
            self.work_model or WorkModel.preset(DEFAULT_WORK_MODEL),
            *lens(),
            load_balancer=self.load_balancer,
            cp_world_size=cp_world_size,
            batch_size=self.batch_size,
            length_multiple=self.length_multiple,
            reorder_documents=self.reorder_documents,
        )

    def build(
        self,
        dataset: Dataset | IterableDataset,
        *,
        mesh: "DeviceMesh | None" = None,
        dp_rank: int | None = None,
        dp_world_size: int | None = None,
        cp_rank: int | None = None,
        cp_world_size: int | None = None,
        sample_work: Any = None,
    ) -> ContextParallelLoader | StatefulDataLoader:
        """The loader of one rank, from a 2-D ("dp", "cp") ``mesh`` or from explicit coordinates.

        Map-style datasets get a :class:`~cp_data.loader.ContextParallelLoader` (global state,
        resumable on any topology); iterable ones a ``StatefulDataLoader`` over the dataset split
        by dp rank (see ``split_iterable``), whose state is the dataset's own.
        ``sample_work`` (one number per sample) weighs the samples for ``dp_balance`` when the
        dataset cannot tell its rows' document lengths (``row_doc_lens()``).
        """
        explicit = (dp_rank, dp_world_size, cp_rank, cp_world_size)
        if mesh is not None:
            if any(v is not None for v in explicit):
                raise ValueError("pass either mesh or explicit dp/cp ranks, not both")
            dp_rank, dp_world_size, cp_rank, cp_world_size = dp_cp_coordinates(mesh)
        elif any(v is None for v in explicit):
            raise ValueError(
                "without a mesh, dp_rank, dp_world_size, cp_rank and cp_world_size are all required, "
                f"got {dict(zip(('dp_rank', 'dp_world_size', 'cp_rank', 'cp_world_size'), explicit))}"
            )
        check_rank("dp", dp_rank, dp_world_size)
        if sample_work is not None and not self.dp_balance:
            raise ValueError("sample_work weighs samples for dp_balance=True; this config does not balance")
        common = dict(
            collate_fn=self.collator(cp_rank, cp_world_size),
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
        )
        if isinstance(dataset, IterableDataset):
            if self.dp_balance:
                raise ValueError("dp_balance needs a map-style dataset (it assigns samples by index)")
            if self.split_iterable and dp_world_size > 1:
                dataset = _split_iterable(dataset, dp_rank, dp_world_size)
            with no_set_vital_warning():
                return StatefulDataLoader(
                    dataset,
                    batch_size=self.batch_size,
                    drop_last=self.drop_last,
                    snapshot_every_n_steps=self.snapshot_every_n_steps,
                    **common,
                )
        sampler = DataParallelSampler(
            len(dataset),
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
            row_work=self.row_work(dataset, cp_world_size, sample_work) if self.dp_balance else None,
            lookahead=self.lookahead,
            fingerprint=self.fingerprint(dataset),
        )
        return ContextParallelLoader(dataset, sampler=sampler, **common)

    @staticmethod
    def fingerprint(dataset: Dataset) -> dict[str, str | None]:
        """What identifies a packed dataset beyond its length: digests of its rows' document
        lengths (``row_doc_lens()``) and of its packing configuration (``config``), when it has them."""
        packed = _packed(dataset)
        lens = getattr(packed, "row_doc_lens", None)
        config = getattr(packed, "config", None)
        packing = json.dumps(asdict(config), sort_keys=True, default=str) if is_dataclass(config) else None
        return dict(
            row_lengths=_digest(*lens()) if lens is not None else None,
            packing=hashlib.sha1(packing.encode()).hexdigest()[:16] if packing is not None else None,
        )
