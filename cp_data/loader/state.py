"""The loader's position in an epoch: global, small, JSON-safe, identical on every rank.

Every epoch has one global order of all samples. The position says which places of that order
all ranks together have consumed (:class:`Consumed`) and, when a lookahead window of several steps
is part-way done, how far (:class:`Window`). A loader of any topology continues from the consumed
places; one of the same layout also continues the window, so its batches are bit-exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Consumed", "Layout", "Window", "Position", "STATE_VERSION", "check_fingerprint"]

STATE_VERSION = 1
"""Version of the state dict layout (the ``"version"`` key)."""


@dataclass(frozen=True)
class Consumed:
    """Places of an epoch's order consumed by all ranks together.

    Places ``[0, prefix)`` are consumed; bit ``i`` of ``beyond`` marks place ``prefix + i``
    (bit 0 is always clear: the prefix is as long as it can be).
    """

    prefix: int = 0
    beyond: int = 0

    @property
    def count(self) -> int:
        """How many places are consumed."""
        return self.prefix + bin(self.beyond).count("1")

    def add(self, places: np.ndarray) -> "Consumed":
        """These places consumed as well (places already consumed stay so)."""
        rel = np.asarray(places, dtype=np.int64).ravel() - self.prefix
        rel = rel[rel >= 0]
        mask = self.beyond
        if rel.size:
            bits = np.zeros(int(rel.max()) + 1, dtype=bool)
            bits[rel] = True
            mask |= int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")
        ones = ((~mask) & (mask + 1)).bit_length() - 1  # trailing run of consumed places
        return Consumed(self.prefix + ones, mask >> ones)

    def free(self, count: int, num_places: int) -> np.ndarray:
        """The first ``count`` places below ``num_places`` not consumed yet, ascending (int64)."""
        span = self.beyond.bit_length()
        raw = np.frombuffer(self.beyond.to_bytes((span + 7) // 8, "little"), dtype=np.uint8)
        taken = np.unpackbits(raw, bitorder="little")[:span].astype(bool)
        inside = self.prefix + np.flatnonzero(~taken)
        after = np.arange(self.prefix + span, min(num_places, self.prefix + span + max(count - inside.size, 0)))
        places = np.concatenate([inside, after])
        return places[places < num_places][:count]

    def to_json(self) -> dict[str, Any]:
        """``{"prefix": int, "beyond": hex string}``."""
        return {"prefix": self.prefix, "beyond": format(self.beyond, "x")}

    @classmethod
    def from_json(cls, value: Any, what: str) -> "Consumed":
        """Parse :meth:`to_json`'s output; ``what`` names it in errors."""
        try:
            prefix, beyond = value["prefix"], int(value["beyond"], 16)
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{what} must be {{'prefix': int, 'beyond': hex string}}, got {value!r}") from err
        if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0 or beyond < 0 or beyond & 1:
            raise ValueError(f"{what} is not a valid set of consumed places: {value!r}")
        return cls(prefix, beyond)


@dataclass(frozen=True)
class Layout:
    """How a loader cuts the order into steps: what must match to continue a window exactly."""

    dp_world_size: int
    batch_size: int
    lookahead: int = 1
    balance: str | None = None
    """Digest of the per-row work the balanced assignment used; None without balancing."""

    @property
    def step_size(self) -> int:
        """Samples of one global batch."""
        return self.dp_world_size * self.batch_size


@dataclass(frozen=True)
class Window:
    """A lookahead window part-way done: the consumed places at its start and the steps taken."""

    start: Consumed
    steps_done: int
    layout: Layout


@dataclass(frozen=True)
class Position:
    """Where a loader stands: epoch, consumed places, and the window it is in (if part-way)."""

    epoch: int = 0
    consumed: Consumed = field(default_factory=Consumed)
    window: Window | None = None

    def to_state(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """The JSON-safe state dict (see :meth:`from_state`)."""
        window = None
        if self.window is not None:
            window = dict(
                start=self.window.start.to_json(),
                steps_done=self.window.steps_done,
                dp_world_size=self.window.layout.dp_world_size,
                batch_size=self.window.layout.batch_size,
                lookahead=self.window.layout.lookahead,
                balance=self.window.layout.balance,
            )
        return dict(
            version=STATE_VERSION,
            epoch=self.epoch,
            samples_consumed=self.consumed.count,
            consumed=self.consumed.to_json(),
            window=window,
            fingerprint=dict(fingerprint),
        )

    @classmethod
    def from_state(cls, state: Any) -> "Position":
        """Parse a state dict, raising ``ValueError`` naming what is malformed."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"not a cp-data loader state of version {STATE_VERSION} (keys {keys}); expected the dict "
                "that ContextParallelLoader.state_dict() returns"
            )
        epoch = state.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"loader state: epoch must be an int >= 0, got {epoch!r}")
        consumed = Consumed.from_json(state.get("consumed"), "loader state 'consumed'")
        if state.get("samples_consumed") != consumed.count:
            raise ValueError(
                f"loader state: samples_consumed={state.get('samples_consumed')!r} but 'consumed' holds "
                f"{consumed.count} places"
            )
        return cls(epoch, consumed, _parse_window(state.get("window")))


def _parse_window(value: Any) -> Window | None:
    if value is None:
        return None
    keys = ("steps_done", "dp_world_size", "batch_size", "lookahead")
    if not isinstance(value, dict) or any(
        not isinstance(value.get(k), int) or isinstance(value.get(k), bool) or value[k] < 1 for k in keys
    ):
        raise ValueError(f"loader state: window must hold ints >= 1 under {keys}, got {value!r}")
    balance = value.get("balance")
    if balance is not None and not isinstance(balance, str):
        raise ValueError(f"loader state: window balance must be a digest string or None, got {balance!r}")
    layout = Layout(value["dp_world_size"], value["batch_size"], value["lookahead"], balance)
    return Window(Consumed.from_json(value.get("start"), "loader state window 'start'"), value["steps_done"], layout)


def check_fingerprint(saved: Any, here: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every key where a state's fingerprint differs from this loader's.

    Keys that either side does not know (``None`` or missing) are not compared.
    """
    if not isinstance(saved, dict):
        raise ValueError(f"loader state: fingerprint must be a dict, got {saved!r}")
    differ = [
        f"{key}: {json.dumps(saved[key])} in the state, {json.dumps(value)} here"
        for key, value in here.items()
        if value is not None and saved.get(key) is not None and saved[key] != value
    ]
    if differ:
        raise ValueError(
            "this loader state was saved for another dataset or loader configuration ("
            + "; ".join(differ)
            + "); load it into a loader over the same samples, seed, shuffle/drop_last and packing"
        )
