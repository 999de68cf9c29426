"""DataLoader glue for DP x CP training: one loader per rank, one global order per epoch.

Every CP rank of a data-parallel group draws the same global batch and its
:class:`~cp_data.collate.ContextParallelCollator` keeps its own shard.

- Map-style datasets (any ``torch.utils.data.Dataset`` with ``__len__`` returning packed
  instances): :class:`DataParallelSampler` cuts one global order per epoch into global batches of
  ``dp_world_size * batch_size`` samples and gives every DP rank ``batch_size`` of them, split
  plainly or balanced by modelled work (``dp_balance``, see :mod:`cp_data.work`).
  :class:`ContextParallelLoader` keeps a small JSON-safe state, the same on every rank, that
  resumes on any DP size, CP size, worker count or batch size with every sample of the epoch
  consumed exactly once (check it across ranks with :func:`verify_loader_state`).
- Iterable datasets: a Hugging Face ``datasets.IterableDataset`` is split with
  ``datasets.distributed.split_dataset_by_node``; any other ``IterableDataset`` must have a
  ``shard(num_shards, index)`` method, or be split already by the caller
  (``split_iterable=False``). Shuffling and exact resume are then the dataset's own
  (``state_dict``/``load_state_dict``, as ``cp_data.datasets.PackedIterableDataset`` has), through
  a torchdata ``StatefulDataLoader``. A ``PackedIterableDataset`` is split by its own
  ``shard()`` (the default ``split_iterable=True``): every worker of every DP rank reads its own
  blocks of one dealing, so ``cp_data.datasets.load_stream_state`` can later resume the run on
  another DP size or worker count, every document token exactly once.
"""

from .config import ContextParallelLoaderConfig
from .dataloader import ContextParallelLoader
from .mesh import MESH_DIM_NAMES, dp_cp_coordinates
from .sampler import DataParallelSampler
from .verify import IndexedDataset, shard_summary, verify_dp_cp_batch, verify_loader_state

__all__ = [
    "MESH_DIM_NAMES",
    "ContextParallelLoader",
    "ContextParallelLoaderConfig",
    "DataParallelSampler",
    "IndexedDataset",
    "dp_cp_coordinates",
    "shard_summary",
    "verify_dp_cp_batch",
    "verify_loader_state",
]
