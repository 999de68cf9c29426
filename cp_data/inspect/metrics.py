"""Per-rank figures of a sharded batch: tokens, padding, documents and causal attention work.

Everything is computed from the balancers' own :class:`~cp_data.ShardPlan` objects (which global
position each shard slot reads), vectorised over positions.

**Attention work** is the number of query-key pairs a rank's causal, document-masked attention
computes: a query at offset ``p`` of its document sees ``p + 1`` keys. Queries of real documents
count as ``work``. Queries on padding count separately as ``padding_work``: the balancer's
padding (llama3/ulysses: one document at the end of the row; zig_zag: the end of each document
padded to a multiple of 2W, plus the final document when ``length_multiple`` is given) attends
like a document of its own, with its offset inside that padded document; padding carried by the
instances (``padding_mask``) counts where it lies. Padding never adds work to a real query: it
always sits after the real tokens of its document. The kernel computes both, so
``compute = work + padding_work`` is what sets a rank's step time (``compute_imbalance``), while
``work_imbalance`` is about the useful part.

For **ulysses** the all-to-all gives every rank the whole sequence for ``H / W`` heads, so each
rank computes ``total / W`` of the work whatever tokens it holds; ``tokens``, ``padding`` and
``documents`` still describe the shard it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from cp_data.balancers import PAD, RingAttentionLoadBalancerType, ShardPlan
from cp_data.balancers.ordering import llama3_balanced_order, reorder_documents
from cp_data.collate import check_instances

__all__ = [
    "BatchRow",
    "ShardMetrics",
    "BalancerComparison",
    "row_from_instances",
    "shard_metrics",
    "compare_balancers",
    "plural",
    "REORDERED",
]

REORDERED = "llama3_reordered"
"""Name of the llama3 entry whose documents were ordered by ``llama3_balanced_order``."""

_ULYSSES = RingAttentionLoadBalancerType.ulysses
_ZIG_ZAG = RingAttentionLoadBalancerType.zig_zag


@dataclass(frozen=True)
class BatchRow:
    """The global (flattened) row of a batch: document boundaries and which tokens are padding."""

    cu_doc_lens: np.ndarray
    """int64 [n + 1]: document boundaries of the row."""
    padding_mask: np.ndarray
    """bool [N]: True on padding that the instances carry."""
    input_ids: np.ndarray | None = None
    """int64 [N] token ids, when known."""

    @property
    def doc_lens(self) -> np.ndarray:
        """int64 [n]: document lengths."""
        return np.diff(self.cu_doc_lens)

    @property
    def doc_ids(self) -> np.ndarray:
        """int64 [N]: the document of each position."""
        return np.repeat(np.arange(len(self.cu_doc_lens) - 1), self.doc_lens)

    @property
    def real_documents(self) -> np.ndarray:
        """bool [n]: documents holding at least one real token (padding-only ones are not documents)."""
        n_docs = len(self.cu_doc_lens) - 1
        return np.bincount(self.doc_ids, weights=~self.padding_mask, minlength=n_docs) > 0

    def reordered(self, perm: np.ndarray) -> "BatchRow":
        """The row with its documents in the order ``perm`` (documents stay whole)."""
        cu, source = reorder_documents(self.cu_doc_lens, perm)
        ids = None if self.input_ids is None else self.input_ids[source]
        return BatchRow(cu, self.padding_mask[source], ids)

    def llama3_reordered(self, cp_world_size: int, length_multiple: int | None = None) -> "BatchRow":
        """The row in the order of :func:`~cp_data.balancers.ordering.llama3_balanced_order`."""
        return self.reordered(llama3_balanced_order(self.doc_lens, cp_world_size, length_multiple))


def _as_cu(cu_doc_lens: Any) -> np.ndarray:
    cu = cu_doc_lens.numpy() if isinstance(cu_doc_lens, torch.Tensor) else np.asarray(cu_doc_lens)
    if cu.ndim != 1 or cu.size < 1:
        raise ValueError(f"cu_doc_lens must be a non-empty 1-D sequence, got shape {tuple(cu.shape)}")
    if not np.issubdtype(cu.dtype, np.integer):
        raise ValueError(f"cu_doc_lens must hold integers, got dtype {cu.dtype}")
    cu = cu.astype(np.int64)
    if cu[0] != 0 or (np.diff(cu) < 0).any():
        raise ValueError(f"cu_doc_lens must start at 0 and not decrease, got {cu[:8].tolist()}")
    return cu


def as_row(batch: BatchRow | Any, padding_mask: Any = None) -> BatchRow:
    """A :class:`BatchRow` from a row, a list of packed instances (pad token 0), or ``cu_doc_lens``
    (+ optional padding mask)."""
    if isinstance(batch, BatchRow):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Mapping):
        return row_from_instances(batch)
    cu = _as_cu(batch)
    if padding_mask is None:
        mask = np.zeros(int(cu[-1]), dtype=bool)
    else:
        mask = np.asarray(padding_mask, dtype=bool)
        if mask.shape != (int(cu[-1]),):
            raise ValueError(f"padding_mask has shape {mask.shape}, expected ({int(cu[-1])},)")
    return BatchRow(cu, mask)


def row_from_instances(instances: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> BatchRow:
    """The flattened row of B packed instances, as the collator builds it.

    The instances are validated as the collator does (:func:`cp_data.collate.check_instances`).
    Instance padding is where ``label_mask`` is False and the token is ``pad_token_id`` (what the
    packing datasets write); without ``label_mask`` nothing is padding.
    """
    ids, lens, masks, _ = check_instances(instances)
    input_ids = torch.cat(ids).numpy()
    doc_lens = torch.cat(lens).numpy()
    padding = (
        np.zeros(input_ids.size, bool)
        if masks is None
        else ~torch.cat(masks).numpy() & (input_ids == pad_token_id)
    )
    return BatchRow(np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64), padding, input_ids)


@dataclass(frozen=True)
class ShardMetrics:
    """Per-rank figures of one balancer on one batch (arrays of length W, rank order)."""

    balancer: str
    cp_world_size: int
    seq_len: int
    tokens: np.ndarray
    """Real (non-padding) tokens each rank holds."""
    padding: np.ndarray
    """Padding positions each rank holds (balancer padding plus the instances' own)."""
    documents: np.ndarray
    """Real documents with at least one token on the rank."""
    work: np.ndarray
    """Causal query-key pairs of real queries the rank computes (float64)."""
    padding_work: np.ndarray
    """Causal query-key pairs of padding queries the rank computes (float64)."""

    @property
    def work_imbalance(self) -> float:
        """max / mean of ``work`` over ranks (1.0 is perfect balance)."""
        return _imbalance(self.work)

    @property
    def compute(self) -> np.ndarray:
        """``work + padding_work``: all the pairs the rank's kernel computes."""
        return self.work + self.padding_work

    @property
    def compute_imbalance(self) -> float:
        """max / mean of ``compute`` over ranks."""
        return _imbalance(self.compute)

    @property
    def token_imbalance(self) -> float:
        """max / mean of ``tokens`` over ranks."""
        return _imbalance(self.tokens)

    @property
    def padding_fraction(self) -> float:
        """Padding positions over all positions of all shards."""
        total = self.tokens.sum() + self.padding.sum()
        return float(self.padding.sum() / total) if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types, ready for JSON."""
        return dict(
            balancer=self.balancer,
            cp_world_size=self.cp_world_size,
            seq_len=self.seq_len,
            tokens=self.tokens.tolist(),
            padding=self.padding.tolist(),
            documents=self.documents.tolist(),
            work=self.work.tolist(),
            padding_work=self.padding_work.tolist(),
            work_imbalance=self.work_imbalance,
            compute_imbalance=self.compute_imbalance,
            token_imbalance=self.token_imbalance,
            padding_fraction=self.padding_fraction,
        )

    def render(self) -> str:
        """A per-rank text table."""
        lines = [
            f"{self.balancer}: work imbalance {self.work_imbalance:.3f}, compute imbalance "
            f"{self.compute_imbalance:.3f}, token imbalance {self.token_imbalance:.3f}, "
            f"padding {self.padding_fraction:.2%}",
            f"  {'rank':>4} {'tokens':>8} {'padding':>8} {'docs':>5} {'work':>12} {'pad work':>10}",
        ]
        for r in range(self.cp_world_size):
            lines.append(
                f"  {r:>4} {self.tokens[r]:>8} {self.padding[r]:>8} {self.documents[r]:>5} "
                f"{self.work[r]:>12,.0f} {self.padding_work[r]:>10,.0f}"
            )
        return "\n".join(lines)


def plural(n: int, word: str, *, with_count: bool = True) -> str:
    """``"1 document"``, ``"2 documents"``, ``"3 batches"`` (``with_count=False``: the word only)."""
    form = word if n == 1 else word + ("es" if word.endswith(("s", "ch")) else "s")
    return f"{n} {form}" if with_count else form


def _imbalance(values: np.ndarray) -> float:
    mean = float(np.mean(values)) if len(values) else 0.0
    return float(np.max(values) / mean) if mean > 0 else 1.0


def all_rank_plans(
    kind: RingAttentionLoadBalancerType, cu: np.ndarray, world: int, length_multiple: int | None
) -> list[ShardPlan]:
    """The plan of every rank of ``kind`` for a row with boundaries ``cu``."""
    balancer = kind.create(cp_rank=0, cp_world_size=world)
    return balancer.plan_all_ranks(int(cu[-1]), torch.from_numpy(cu), length_multiple=length_multiple)


def _padding_offsets(kind: RingAttentionLoadBalancerType, plan: ShardPlan, num_docs: int) -> np.ndarray:
    """Offset of each balancer padding slot of ``plan`` inside the padded document it belongs to."""
    index = plan.index.numpy()
    slots = np.flatnonzero(index == PAD)
    if kind is not _ZIG_ZAG:
        # One padding document at the end of the row; rank r's slice starts at r * local_len.
        return plan.cp_rank * plan.local_len + slots - plan.seq_len
    local_cu = plan.metadata["cu_doc_lens"].numpy().astype(np.int64)
    doc = np.searchsorted(local_cu, slots, side="right") - 1
    within = slots - local_cu[doc]
    half = (local_cu[np.minimum(doc + 1, len(local_cu) - 1)] - local_cu[doc]) // 2
    r, chunks = plan.cp_rank, 2 * plan.cp_world_size
    # The rank's chunks of a document are r and 2W-1-r; the final (length_multiple) document is flat.
    zig = np.where(within < half, r * half + within, (chunks - 1 - r) * half + within - half)
    return np.where(doc < num_docs, zig, within)


def shard_metrics(
    batch: BatchRow | Any,
    balancer: RingAttentionLoadBalancerType | str,
    cp_world_size: int,
    *,
    length_multiple: int | None = None,
    padding_mask: Any = None,
) -> ShardMetrics:
    """Per-rank tokens, padding, documents and causal work of ``balancer`` on one batch.

    ``batch`` is a :class:`BatchRow`, a list of packed instances, or the ``cu_doc_lens`` of the
    global row (then ``padding_mask`` optionally marks the instances' padding). The module
    docstring says how work is counted.
    """
    kind = RingAttentionLoadBalancerType.parse(balancer)
    row = as_row(batch, padding_mask)
    cu = row.cu_doc_lens
    n_docs = len(cu) - 1
    doc_id = row.doc_ids
    offset_work = np.arange(int(cu[-1])) - cu[doc_id] + 1.0
    pad = row.padding_mask
    real_doc = row.real_documents
    stats = np.zeros((5, cp_world_size))
    for r, plan in enumerate(all_rank_plans(kind, cu, cp_world_size, length_multiple)):
        src = plan.index.numpy()
        src = src[src != PAD]
        is_pad = pad[src]
        touched = np.unique(doc_id[src[~is_pad]])
        stats[:, r] = (
            (~is_pad).sum(),
            is_pad.sum() + plan.num_padding,
            real_doc[touched].sum(),
            offset_work[src[~is_pad]].sum(),
            offset_work[src[is_pad]].sum() + (_padding_offsets(kind, plan, n_docs) + 1.0).sum(),
        )
    if kind is _ULYSSES:
        stats[3:] = stats[3:].sum(axis=1, keepdims=True) / cp_world_size
    ints = stats[:3].astype(np.int64)
    return ShardMetrics(kind.value, cp_world_size, int(cu[-1]), *ints, stats[3], stats[4])


@dataclass(frozen=True)
class BalancerComparison:
    """Several balancers on the same batch, side by side."""

    metrics: dict[str, ShardMetrics]

    def to_dict(self) -> dict[str, Any]:
        """``{balancer: ShardMetrics.to_dict()}``."""
        return {name: m.to_dict() for name, m in self.metrics.items()}

    def summary(self) -> list[dict[str, Any]]:
        """One row per balancer: imbalances, the busiest rank's work, padding."""
        return [
            dict(
                balancer=name,
                work_imbalance=m.work_imbalance,
                compute_imbalance=m.compute_imbalance,
                token_imbalance=m.token_imbalance,
                max_work=float(m.work.max()),
                padding=int(m.padding.sum()),
                padding_fraction=m.padding_fraction,
                padding_work=float(m.padding_work.sum()),
            )
            for name, m in self.metrics.items()
        ]

    def render(self, per_rank: bool = False) -> str:
        """A text table (and each balancer's per-rank table when ``per_rank``)."""
        head = (
            f"{'balancer':<18} {'work max/mean':>13} {'compute max/mean':>16} {'tokens max/mean':>15} "
            f"{'max work':>12} {'padding':>8}"
        )
        lines = [head, "-" * len(head)]
        for s in self.summary():
            lines.append(
                f"{s['balancer']:<18} {s['work_imbalance']:>13.3f} {s['compute_imbalance']:>16.3f} "
                f"{s['token_imbalance']:>15.3f} {s['max_work']:>12,.0f} {s['padding']:>8}"
            )
        if per_rank:
            lines += [""] + [m.render() + "\n" for m in self.metrics.values()]
        return "\n".join(lines).rstrip()

    __str__ = render


def compare_balancers(
    batch: BatchRow | Any,
    cp_world_size: int,
    balancers: Iterable[RingAttentionLoadBalancerType | str] | None = None,
    *,
    length_multiple: int | None = None,
    padding_mask: Any = None,
    reorder: bool = True,
) -> BalancerComparison:
    """:func:`shard_metrics` of every balancer (default: all) on the same batch.

    With ``reorder`` and llama3 among them, a ``"llama3_reordered"`` entry shows llama3 after
    :func:`~cp_data.balancers.ordering.llama3_balanced_order` over all documents of the row, the
    instances' padding documents included (what ``ContextParallelCollator(reorder_documents=True)``
    does): the order balances what the kernel computes, so compare its ``compute_imbalance``.
    """
    row = as_row(batch, padding_mask)
    kinds = [RingAttentionLoadBalancerType.parse(b) for b in (balancers or RingAttentionLoadBalancerType)]
    out = {k.value: shard_metrics(row, k, cp_world_size, length_multiple=length_multiple) for k in kinds}
    if reorder and RingAttentionLoadBalancerType.llama3 in kinds:
        reordered = row.llama3_reordered(cp_world_size, length_multiple)
        m = shard_metrics(reordered, "llama3", cp_world_size, length_multiple=length_multiple)
        out[REORDERED] = replace(m, balancer=REORDERED)
    return BalancerComparison(out)
