"""Work model: what a packed row, and one CP rank's shard of a batch, costs in a training step.

A step's cost is modelled in FLOPs of forward plus backward, in two parts:

- **linear**, per token position: every matmul of every layer (attention projections, MLP) and
  the LM head. Padding positions count: the GEMMs compute them.
- **attention**, per causal query-key pair: with document masking a query at offset ``p`` of its
  document attends to ``p + 1`` keys, so a document of ``d`` tokens costs ``d (d + 1) / 2`` pairs
  (the counting of :mod:`cp_data.inspect.metrics`, whose ``compute`` includes padding queries).

``cost = linear_per_token * positions + attention_per_pair * pairs``. Both parts run at the same
FLOP rate in this model; at 8k tokens the linear part dominates an 8B model's step, at 128k the
attention part does.

:class:`RowWork` turns the model into what DP balancing needs: the modelled step work of a
data-parallel rank, i.e. of the slowest CP rank of its group on its flattened batch, as a
function of the rows it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cp_data.balancers import RingAttentionLoadBalancerType
from cp_data.balancers.ordering import llama3_rank_work
from cp_data.balancers.validation import is_int, round_up

__all__ = ["WorkModel", "RowWork", "PRESETS", "causal_pairs", "row_work"]


def causal_pairs(doc_lens: Any) -> np.ndarray:
    """Causal query-key pairs of documents of these lengths: ``d (d + 1) / 2`` each (float64)."""
    d = np.asarray(doc_lens, dtype=np.float64)
    return d * (d + 1.0) / 2.0


@dataclass(frozen=True)
class WorkModel:
    """Modelled step cost (FLOPs, forward + backward) per token position and per causal pair."""

    linear_per_token: float
    """FLOPs of all matmuls for one token position (projections, MLP, LM head)."""
    attention_per_pair: float
    """FLOPs of attention for one causal query-key pair, summed over layers and heads."""
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("linear_per_token", "attention_per_pair"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        if self.linear_per_token == self.attention_per_pair == 0:
            raise ValueError("linear_per_token and attention_per_pair are both 0: every row would cost nothing")

    @classmethod
    def from_dims(
        cls,
        *,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        ffn_size: int,
        vocab_size: int,
        backward_factor: float = 2.0,
        name: str = "custom",
    ) -> "WorkModel":
        """Coefficients of a Llama-like decoder (grouped-query attention, SwiGLU MLP).

        Forward FLOPs are 2 per multiply-add: per token ``2 (L (2 h^2 + 2 h kv + 3 h f) + h V)``
        (q/o and k/v projections with ``kv = num_kv_heads * h / num_heads``, gate/up/down of the
        MLP, the LM head); per pair ``4 h L`` (scores and the weighted sum of values). Backward
        costs ``backward_factor`` times forward (2 for matmuls; flash attention's recompute makes
        its share a little larger, which this model leaves out).
        """
        dims = dict(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            ffn_size=ffn_size,
            vocab_size=vocab_size,
        )
        for key, value in dims.items():
            if not is_int(value) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide hidden_size={hidden_size} and be a multiple of "
                f"num_kv_heads={num_kv_heads}"
            )
        if isinstance(backward_factor, bool) or not isinstance(backward_factor, (int, float)) or backward_factor < 0:
            raise ValueError(f"backward_factor must be a number >= 0, got {backward_factor!r}")
        h, kv = hidden_size, num_kv_heads * (hidden_size // num_heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn_size
        forward_token = 2.0 * (num_layers * per_layer + h * vocab_size)
        forward_pair = 4.0 * h * num_layers
        scale = 1.0 + backward_factor
        return cls(forward_token * scale, forward_pair * scale, name)

    @classmethod
    def preset(cls, name: str) -> "WorkModel":
        """One of :data:`PRESETS` (``"llama-1b"``, ``"llama-8b"``, ``"llama-70b"``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown work model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dims(**PRESET_DIMS[name], name=name)

    def cost(self, positions: Any, pairs: Any) -> np.ndarray:
        """``linear_per_token * positions + attention_per_pair * pairs`` (float64, vectorised)."""
        return self.linear_per_token * np.asarray(positions, np.float64) + self.attention_per_pair * np.asarray(
            pairs, np.float64
        )

    def shard_costs(self, metrics: Any) -> np.ndarray:
        """Cost of every CP rank's shard from its :class:`~cp_data.inspect.ShardMetrics`.

        Positions are the shard's tokens plus padding, pairs its ``compute`` (real and padding
        queries): what the rank's kernels run. The step waits for the largest entry.
        """
        return self.cost(metrics.tokens + metrics.padding, metrics.compute)

    def row_costs(self, doc_lens: Any, row_offsets: Any) -> np.ndarray:
        """Cost of every row of a batch or dataset (all its positions, all its documents' pairs).

        ``doc_lens`` holds every row's document lengths end to end; row ``i`` holds
        ``doc_lens[row_offsets[i]:row_offsets[i + 1]]`` (a trailing padding document included).
        """
        lens, row_of = _rows(doc_lens, row_offsets)
        rows = len(row_offsets) - 1
        positions = np.bincount(row_of, weights=lens, minlength=rows)
        pairs = np.bincount(row_of, weights=causal_pairs(lens), minlength=rows)
        return self.cost(positions, pairs)


PRESET_DIMS = {
    "llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_size=8192, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_size=14336, vocab_size=128256),
    "llama-70b": dict(
        hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_size=28672, vocab_size=128256
    ),
}
"""Model dimensions of the presets (the Llama 3.2 1B, Llama 3.1 8B and 70B shapes)."""

PRESETS = tuple(PRESET_DIMS)


def _rows(doc_lens: Any, row_offsets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked lengths (int64) and the row of each document."""
    lens = np.asarray(doc_lens)
    offsets = np.asarray(row_offsets)
    if lens.ndim != 1 or offsets.ndim != 1 or offsets.size < 1:
        raise ValueError(f"doc_lens and row_offsets must be 1-D, got shapes {lens.shape} and {offsets.shape}")
    if (lens.size and not np.issubdtype(lens.dtype, np.integer)) or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"doc_lens and row_offsets must hold integers, got {lens.dtype} and {offsets.dtype}")
    if (lens < 0).any():
        raise ValueError(f"doc_lens must be >= 0, got {lens[lens < 0][:5].tolist()}")
    if offsets[0] != 0 or offsets[-1] != lens.size or (np.diff(offsets) < 0).any():
        raise ValueError(
            f"row_offsets must rise from 0 to len(doc_lens)={lens.size}, got {offsets[:6].tolist()}..."
        )
    return lens.astype(np.int64), np.repeat(np.arange(offsets.size - 1), np.diff(offsets))


Combine = Literal["sum", "max"]


@dataclass(frozen=True)
class RowWork:
    """Per-row work and how a DP rank's step work follows from its rows.

    The modelled step work of a DP rank holding rows ``I`` is ``work[I].sum()`` (``combine="sum"``)
    or ``work[I].max()`` (``combine="max"``). :func:`row_work` builds it for a CP balancer.
    """

    work: np.ndarray
    """float64 [num_rows]."""
    combine: Combine = "sum"

    def __post_init__(self) -> None:
        work = np.asarray(self.work, dtype=np.float64)
        if work.ndim != 1 or not np.isfinite(work).all() or (work < 0).any():
            raise ValueError(f"work must be a 1-D array of finite numbers >= 0, got shape {work.shape}")
        if self.combine not in ("sum", "max"):
            raise ValueError(f"combine must be 'sum' or 'max', got {self.combine!r}")
        object.__setattr__(self, "work", work)

    def step_work(self, rows: np.ndarray) -> np.ndarray:
        """Step work of DP ranks whose rows are ``rows[..., j]`` (indices into ``work``)."""
        values = self.work[rows]
        return values.sum(axis=-1) if self.combine == "sum" else values.max(axis=-1)


def row_work(
    model: WorkModel,
    doc_lens: Any,
    row_offsets: Any,
    *,
    load_balancer: RingAttentionLoadBalancerType | str,
    cp_world_size: int,
    batch_size: int,
    length_multiple: int | None = None,
    reorder_documents: bool = False,
) -> RowWork:
    """The step work of a DP rank from the rows it holds, for one CP balancer.

    The slowest CP rank of the group sets the step, and the flattened batch of ``batch_size``
    rows is what gets sharded:

    - zig_zag: rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` of every document padded to a
      multiple of ``2W``; their pairs add up to the same count on every rank, so each rank does
      exactly ``1/W`` of the padded batch: ``combine="sum"`` of rows costed with padded documents.
    - ulysses: after the all-to-all every rank attends all positions for ``H/W`` heads: ``1/W``
      of the batch, ``"sum"``.
    - llama3 with ``W % batch_size == 0`` and rows that split evenly (no padding): each CP rank
      holds one ``W / batch_size``-th of one row, so the slowest rank is the costliest such slice:
      ``combine="max"`` of every row's costliest slice. Otherwise, and with
      ``reorder_documents`` (whose order brings the ranks close to the mean), the
      ``"sum"`` over ``W`` is the estimate.

    ``length_multiple`` padding of the shards is left out (a few positions per rank).
    """
    kind = RingAttentionLoadBalancerType.parse(load_balancer)
    for name, value in (("cp_world_size", cp_world_size), ("batch_size", batch_size)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    lens, row_of = _rows(doc_lens, row_offsets)
    rows = len(row_offsets) - 1
    W = int(cp_world_size)
    if kind is RingAttentionLoadBalancerType.zig_zag:
        lens = round_up(lens, 2 * W)
    row_len = np.bincount(row_of, weights=lens, minlength=rows)
    slices = W // batch_size if W % batch_size == 0 else 0
    even = rows and (row_len == row_len[0]).all() and int(row_len[0]) % (slices * (length_multiple or 1) or 1) == 0
    if kind is RingAttentionLoadBalancerType.llama3 and not reorder_documents and slices and even:
        pairs = llama3_rank_work(lens, rows * slices).reshape(rows, slices).max(axis=1)
        return RowWork(model.cost(row_len[0] / slices, pairs), "max")
    return RowWork(model.row_costs(lens, row_offsets) / W, "sum")
