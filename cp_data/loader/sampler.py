"""One global order per epoch, cut into global batches and split across data-parallel ranks."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler

from cp_data.balancers.validation import is_int
from cp_data.work import RowWork

from .balance import balanced_assignment, strided_assignment
from .mesh import check_rank
from .state import Consumed, Layout, Position, Window, check_fingerprint

__all__ = ["DataParallelSampler"]

_CACHED_WINDOWS = 16  # the loader replays the windows its prefetching sampler has just computed


class DataParallelSampler(Sampler[list[int]]):
    """The sample indices of one data-parallel rank, step by step, from one global order per epoch.

    Every epoch orders all ``num_samples`` samples once, the same on every rank (a permutation
    seeded by ``(seed, epoch)`` when ``shuffle``). Each step's global batch is the next
    ``dp_world_size * batch_size`` samples of that order not consumed yet, and every rank gets
    ``batch_size`` of them:

    - without ``row_work``: every ``dp_world_size``-th from the ``dp_rank``-th (the split of
      ``torch.utils.data.DistributedSampler``);
    - with ``row_work`` (see :func:`cp_data.work.row_work`): the DP-balanced assignment of
      :func:`~cp_data.loader.balance.balanced_assignment`, over windows of ``lookahead`` steps
      whose rows it may regroup into steps.

    The epoch's tail that does not fill a global batch is dropped with ``drop_last``; otherwise a
    last step gives every rank ``ceil(tail / dp_world_size)`` rows, repeating the order's first
    samples to fill it (as ``DistributedSampler`` does).

    Iterating yields this rank's indices of each remaining step of the current epoch (a batch
    sampler) and moves :attr:`position` on; after the last step the position is the next epoch's
    start. :meth:`state_dict` is the position: the same dict on every rank, whatever
    ``dp_rank``, and loadable into a sampler of another ``dp_world_size``, ``batch_size`` or
    ``lookahead``, which then continues with the samples not consumed yet (see
    :class:`~cp_data.loader.ContextParallelLoader`).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        dp_rank: int,
        dp_world_size: int,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        row_work: RowWork | None = None,
        lookahead: int = 1,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        check_rank("dp", dp_rank, dp_world_size)
        for name, value, low in (("num_samples", num_samples, 0), ("batch_size", batch_size, 1),
                                 ("lookahead", lookahead, 1), ("seed", seed, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if row_work is not None and row_work.work.shape != (num_samples,):
            raise ValueError(f"row_work holds {row_work.work.size} rows, but there are {num_samples} samples")
        self.num_samples, self.dp_rank, self.dp_world_size = int(num_samples), int(dp_rank), int(dp_world_size)
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), bool(shuffle), int(seed), bool(drop_last)
        self.row_work = row_work
        balance = None
        if row_work is not None:
            balance = hashlib.sha1(row_work.work.tobytes() + row_work.combine.encode()).hexdigest()[:16]
        # Without balancing the split ignores the window, so any lookahead continues a window exactly.
        self.layout = Layout(self.dp_world_size, self.batch_size, int(lookahead) if balance else 1, balance)
        self.fingerprint = dict(
            num_samples=self.num_samples, seed=self.seed, shuffle=self.shuffle, drop_last=self.drop_last,
            **(fingerprint or {}),
        )
        self.position = Position()
        self._order: tuple[int, np.ndarray] | None = None
        self._windows: dict[tuple[int, Consumed], np.ndarray | None] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.position.epoch

    def order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch``: every sample index once (int64)."""
        if self._order is None or self._order[0] != epoch:
            n = self.num_samples
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def _window(self, epoch: int, start: Consumed) -> np.ndarray | None:
        """Places of the order in the window that starts at ``start``: [steps, dp, rows], or None."""
        key = (epoch, start)
        if key not in self._windows:
            if len(self._windows) >= _CACHED_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            self._windows[key] = self._assign(epoch, start)
        return self._windows[key]

    def _assign(self, epoch: int, start: Consumed) -> np.ndarray | None:
        n, dp, per_step = self.num_samples, self.dp_world_size, self.layout.step_size
        left = n - start.count
        if left >= per_step:
            steps, rows = min(self.layout.lookahead, left // per_step), self.batch_size
            places = start.free(steps * per_step, n)
        elif left and not self.drop_last:
            steps, rows = 1, -(-left // dp)
            places = np.concatenate([start.free(left, n), np.arange(dp * rows - left) % n])
        else:
            return None
        if self.row_work is None:
            return places[strided_assignment(steps, dp, rows)]
        work = RowWork(self.row_work.work[self.order(epoch)[places]], self.row_work.combine)
        return places[balanced_assignment(work, dp, rows, steps)]

    def steps_left(self, position: Position) -> int:
        """How many steps remain in ``position``'s epoch."""
        left = self.num_samples - position.consumed.count
        full, tail = divmod(left, self.layout.step_size)
        return full + int(bool(tail) and not self.drop_last)

    def _next_epoch_if_done(self, position: Position) -> Position:
        if position.window is None and position.consumed.count and not self.steps_left(position):
            return Position(position.epoch + 1)
        return position

    def global_steps(self, position: Position | None = None) -> Iterator[tuple[np.ndarray, Position]]:
        """Every rank's sample indices of each remaining step of the position's epoch (int64
        [dp_world_size, rows]), with the position after that step. Default: :attr:`position`."""
        position = self.position if position is None else position
        epoch, consumed, window = position.epoch, position.consumed, position.window
        if window is not None and window.layout == self.layout:
            start, done = window.start, window.steps_done
        else:  # no window, or one of another layout: continue from the consumed places
            start, done = consumed, 0
        order, after = self.order(epoch), position
        while (places := self._window(epoch, start)) is not None:
            for s in range(done, len(places)):
                consumed = consumed.add(places[s])
                if s + 1 < len(places):
                    after = Position(epoch, consumed, Window(start, s + 1, self.layout))
                else:
                    after = self._next_epoch_if_done(Position(epoch, consumed))
                yield order[places[s]], after
            if after.epoch != epoch:
                return
            start, done = consumed, 0

    def __iter__(self) -> Iterator[list[int]]:
        stepped = False
        for indices, after in self.global_steps(self.position):
            self.position, stepped = after, True
            yield indices[self.dp_rank].tolist()
        if not stepped:  # an epoch too short for one step still moves on to the next one
            self.position = Position(self.position.epoch + 1)

    def __len__(self) -> int:
        return self.steps_left(self.position)

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at the beginning of ``epoch``."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.position = Position(int(epoch))

    def state_dict(self) -> dict[str, Any]:
        """The position as a JSON-safe dict (see :meth:`load_state`)."""
        return self.position.to_state(self.fingerprint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a state saved by a sampler of any topology over the same samples."""
        self.position = self.load_state(state_dict)

    def load_state(self, state: dict[str, Any]) -> Position:
        """The position a state dict describes, checked against this sampler.

        Raises ``ValueError`` for a malformed state, or one saved over other samples, another
        seed, shuffle or drop_last, or other row lengths or packing (its ``fingerprint``).
        """
        position = Position.from_state(state)
        check_fingerprint(state.get("fingerprint"), self.fingerprint)
        for what, consumed in (("consumed", position.consumed), ("window start", getattr(position.window, "start", None))):
            if consumed is not None and consumed.prefix + consumed.beyond.bit_length() > self.num_samples:
                raise ValueError(f"loader state: its {what} places reach beyond the {self.num_samples} samples")
        window = position.window
        if window is not None and window.layout == self.layout:
            places = self._window(position.epoch, window.start)
            if places is None or window.steps_done >= len(places) or window.start.add(
                places[: window.steps_done]
            ) != position.consumed:
                raise ValueError(
                    "loader state: its window does not lead to its consumed samples here "
                    "(saved over other row work or data?)"
                )
        return self._next_epoch_if_done(position)
