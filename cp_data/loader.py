"""DataLoader glue for DP x CP training: one StatefulDataLoader per rank, split by the dp coordinate.

Every CP rank of a data-parallel group draws the same global batches (the sampler only looks at
the dp coordinate) and its :class:`~cp_data.collate.ContextParallelCollator` keeps its own shard.

Supported datasets:

- map-style (any ``torch.utils.data.Dataset`` with ``__len__`` returning collator-ready packed
  instances): :class:`DataParallelSampler` splits the indices by dp rank, shuffles per epoch
  from ``seed`` and saves its position in the loader's ``state_dict()``.
- iterable: a Hugging Face ``datasets.IterableDataset`` is split with
  ``datasets.distributed.split_dataset_by_node``; any other ``IterableDataset`` must have a
  ``shard(num_shards, index)`` method, or be split already by the caller
  (``split_iterable=False``). Shuffling and exact resume are then the dataset's own
  (``state_dict``/``load_state_dict``, as ``cp_data.datasets.PackedIterableDataset`` has). For
  ``PackedIterableDataset``, split its source before packing (``Dataset.shard(num_shards=dp,
  index=dp_rank)`` or ``split_dataset_by_node``) and pass ``split_iterable=False``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ._warnings import no_set_vital_warning
from .balancers import RingAttentionLoadBalancerType, unshard
from .balancers.validation import is_int
from .collate import IGNORE_INDEX, PRODUCED_KEYS, ContextParallelCollator

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIM_NAMES = ("dp", "cp")


def dp_cp_coordinates(mesh: "DeviceMesh") -> tuple[int, int, int, int]:
    """``(dp_rank, dp_world_size, cp_rank, cp_world_size)`` of this process in a 2-D ("dp", "cp") mesh."""
    names = mesh.mesh_dim_names
    if mesh.ndim != 2 or names is None or sorted(names) != sorted(MESH_DIM_NAMES):
        raise ValueError(f"expected a 2-D DeviceMesh with dims {MESH_DIM_NAMES}, got dims {names}")
    dp, cp = names.index("dp"), names.index("cp")
    return mesh.get_local_rank("dp"), mesh.size(dp), mesh.get_local_rank("cp"), mesh.size(cp)


def _check_rank(name: str, rank: Any, world: Any) -> None:
    for what, value in ((f"{name}_rank", rank), (f"{name}_world_size", world)):
        if not is_int(value):
            raise ValueError(f"{what} must be an int, got {value!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{name}_rank must be in [0, {name}_world_size={world}), got {rank}")


class DataParallelSampler(Sampler[int]):
    """The sample indices of one data-parallel rank, epoch after epoch, resumable mid-epoch.

    Each epoch orders all indices (a permutation seeded by ``(seed, epoch)`` when shuffling),
    makes the count a multiple of ``dp_world_size`` (dropping the tail with ``drop_last``, else
    repeating from the start, as ``DistributedSampler`` does) and keeps every
    ``dp_world_size``-th index from ``dp_rank``. The epoch advances by itself after each full
    pass; :meth:`set_epoch` sets it explicitly. ``state_dict`` is ``{"epoch", "yielded"}``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        dp_rank: int,
        dp_world_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        _check_rank("dp", dp_rank, dp_world_size)
        if not is_int(num_samples) or num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
        self.num_samples, self.dp_rank, self.dp_world_size = int(num_samples), int(dp_rank), int(dp_world_size)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.yielded = 0

    def __len__(self) -> int:
        n, w = self.num_samples, self.dp_world_size
        return n // w if self.drop_last else -(-n // w)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's indices of ``epoch``, in order."""
        n = self.num_samples
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.resize(order, len(self) * self.dp_world_size) if n else order
        return order[self.dp_rank :: self.dp_world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.yielded
        for index in self.indices(epoch)[start:].tolist():
            self.yielded += 1
            yield index
        self.epoch, self.yielded = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of ``epoch``."""
        self.epoch, self.yielded = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its indices were drawn."""
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume where :meth:`state_dict` was taken."""
        epoch, yielded = state_dict.get("epoch"), state_dict.get("yielded")
        if not isinstance(epoch, int) or not isinstance(yielded, int) or epoch < 0 or not 0 <= yielded <= len(self):
            raise ValueError(f"invalid DataParallelSampler state {state_dict!r}")
        self.epoch, self.yielded = epoch, yielded


class IndexedDataset(Dataset):
    """A map-style dataset whose instances also carry their index under ``key`` (a pass-through key).

    Lets a rank find out which samples its global batch holds, e.g. for :func:`verify_dp_cp_batch`.
    """

    def __init__(self, dataset: Dataset, key: str = "index") -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], self.key: int(i)}


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


@dataclass(kw_only=True)
class ContextParallelLoaderConfig:
    """How to load CP-ready batches for one rank of a DP x CP job; :meth:`build` makes the loader.

    ``batch_size`` packed instances form one global batch of a data-parallel group; the collator
    options are those of :class:`~cp_data.collate.ContextParallelCollator`. ``drop_last`` drops
    both the samples that do not split evenly over dp ranks and a last incomplete batch.
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_workers", "snapshot_every_n_steps"):
            value = getattr(self, name)
            low = 0 if name == "num_workers" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.load_balancer = RingAttentionLoadBalancerType.parse(self.load_balancer)

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

    def build(
        self,
        dataset: Dataset | IterableDataset,
        *,
        mesh: "DeviceMesh | None" = None,
        dp_rank: int | None = None,
        dp_world_size: int | None = None,
        cp_rank: int | None = None,
        cp_world_size: int | None = None,
    ) -> StatefulDataLoader:
        """The loader of one rank, from a 2-D ("dp", "cp") ``mesh`` or from explicit coordinates."""
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
        _check_rank("dp", dp_rank, dp_world_size)
        collator = self.collator(cp_rank, cp_world_size)
        common = dict(
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            collate_fn=collator,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            snapshot_every_n_steps=self.snapshot_every_n_steps,
        )
        if isinstance(dataset, IterableDataset):
            if self.split_iterable and dp_world_size > 1:
                dataset = _split_iterable(dataset, dp_rank, dp_world_size)
            with no_set_vital_warning():
                return StatefulDataLoader(dataset, **common)
        sampler = DataParallelSampler(
            len(dataset),
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
        )
        with no_set_vital_warning():
            return StatefulDataLoader(dataset, sampler=sampler, **common)


def shard_summary(batch: dict[str, Any]) -> str:
    """One line describing a rank's shard: shape, tokens with a label, padding, documents."""
    ids, labels = batch["input_ids"], batch["labels"]
    cu = batch.get("cu_doc_lens", batch.get("cu_doc_lens_q"))
    docs = f" docs={len(cu) - 1}" if cu is not None else ""
    return (
        f"shape={tuple(ids.shape)} labelled={int((labels != IGNORE_INDEX).sum())} "
        f"pos0={int((batch['position_ids'] == 0).sum())}{docs} head={ids.flatten()[:6].tolist()}"
    )


def verify_dp_cp_batch(
    batch: dict[str, Any],
    *,
    dataset: Dataset,
    collator: ContextParallelCollator,
    mesh: "DeviceMesh",
    index_key: str = "index",
) -> dict[str, Any]:
    """Check with collectives that a DP x CP step got the right data; raise ``RuntimeError`` if not.

    Every rank of ``mesh`` (2-D, dims "dp" and "cp") calls this with its batch for the same step.
    The batch must carry the sample indices under ``index_key`` (see :class:`IndexedDataset`).
    Checks: the CP ranks of each DP group drew the same samples; their shards, all-gathered over
    the cp group and unsharded with the collator's plans, equal the full batch collated from
    ``dataset`` on this rank; the DP groups drew disjoint samples with different tokens.
    Returns a summary of this rank's step.
    """
    import torch.distributed as dist

    dp_rank, _, cp_rank, _ = dp_cp_coordinates(mesh)
    indices = batch[index_key].tolist()
    full = collator.full_batch([dataset[i] for i in indices])
    squeeze = collator.document_masking  # shards are [1, L] there; the full row is [B*S]
    mine = [batch[k][0] if squeeze else batch[k] for k in PRODUCED_KEYS]
    gathered: list[Any] = [None] * mesh["cp"].size()
    dist.all_gather_object(gathered, (indices, mine), group=mesh["cp"].get_group())
    for r, (other, _) in enumerate(gathered):
        if other != indices:
            raise RuntimeError(
                f"dp {dp_rank}: cp rank {cp_rank} drew samples {indices} but cp rank {r} drew {other}"
            )
    plans = collator.plans_all_ranks(full)
    for j, key in enumerate(PRODUCED_KEYS):
        rebuilt = unshard([shards[j] for _, shards in gathered], plans, seq_dim=-1)
        if not torch.equal(rebuilt, full[j]):
            raise RuntimeError(f"dp {dp_rank}: the unsharded {key} of the cp group differ from the global batch")
    digest = hashlib.sha1(full.input_ids.numpy().tobytes()).hexdigest()
    groups: list[Any] = [None] * mesh["dp"].size()
    dist.all_gather_object(groups, (indices, digest), group=mesh["dp"].get_group())
    for r, (other, other_digest) in enumerate(groups):
        if r != dp_rank and (set(other) & set(indices) or other_digest == digest):
            raise RuntimeError(f"dp groups {dp_rank} and {r} got the same data: samples {indices} and {other}")
    return dict(dp_rank=dp_rank, cp_rank=cp_rank, indices=indices, digest=digest[:10], shard=shard_summary(batch))
