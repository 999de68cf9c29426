"""A DataLoader over a map-style dataset whose state is the global position of the epoch."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset

from .sampler import DataParallelSampler
from .state import Position

__all__ = ["ContextParallelLoader"]


class ContextParallelLoader(DataLoader):
    """``torch.utils.data.DataLoader`` with a :class:`DataParallelSampler` and a global state.

    :meth:`state_dict` counts the batches handed to the caller, not those the workers prefetched,
    and is the sampler's small JSON-safe position: identical on every rank of a DP x CP job and
    independent of ``num_workers`` (map-style datasets keep no state in the workers). Load it into
    a loader of any DP size, CP size, worker count or ``batch_size``: the samples of the epoch not
    consumed yet are split anew, each exactly once; with an unchanged topology the batches are
    bit-exact. A new iterator continues where the last batch handed out left off; after the last
    batch of an epoch the state is the next epoch's start. Built by
    :meth:`~cp_data.loader.ContextParallelLoaderConfig.build`.
    """

    def __init__(self, dataset: Dataset, *, sampler: DataParallelSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=sampler, **kwargs)
        self._position = sampler.position

    def __iter__(self) -> Iterator[Any]:
        sampler: DataParallelSampler = self.batch_sampler
        start = sampler.position = self._position
        # The sampler runs ahead of us (prefetching); replaying its steps tells where each batch ends.
        after = (position for _, position in sampler.global_steps(start))
        stepped = False
        for batch in super().__iter__():
            self._position, stepped = next(after), True
            yield batch
        if not stepped:  # an epoch too short for one step still moves on to the next one
            self._position = Position(start.epoch + 1)

    def __len__(self) -> int:
        return self.batch_sampler.steps_left(self._position)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.batch_sampler.set_epoch(epoch)
        self._position = self.batch_sampler.position

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out: a small JSON-safe dict, the same on every rank.

        Keys: ``version``; ``epoch``; ``samples_consumed`` (samples of the epoch's global order
        consumed by all ranks together); ``consumed`` (which places of the order: a prefix length
        and a hex bit mask of those beyond it); ``window`` (None, or the lookahead window part-way
        done, to continue it exactly); ``fingerprint`` (what the state belongs to: sample count,
        seed, shuffle, drop_last, a digest of the rows' lengths and the packing when known).
        """
        return self._position.to_state(self.batch_sampler.fingerprint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a state saved by a loader of any topology over the same dataset.

        Raises ``ValueError`` naming what differs when the state belongs to another dataset,
        seed, shuffle/drop_last or packing.
        """
        self._position = self.batch_sampler.load_state(state_dict)
        self.batch_sampler.position = self._position
