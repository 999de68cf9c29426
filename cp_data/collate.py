"""The collate stage: B packed instances -> the training batch of one context-parallel rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from .balancers import METADATA_KEYS, RingAttentionLoadBalancer, RingAttentionLoadBalancerType, ShardPlan
from .balancers.ordering import llama3_balanced_order, reorder_documents
from .balancers.validation import is_int

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

IGNORE_INDEX = -100
"""Label of tokens that must not be predicted."""

CONSUMED_KEYS = ("input_ids", "doc_lens", "label_mask")
"""Instance keys the collator reads and does not pass on."""

PRODUCED_KEYS = ("input_ids", "labels", "position_ids")
"""Batch keys the collator always produces (the balancer's metadata keys join them)."""

_METADATA_KEYS = {key for keys in METADATA_KEYS.values() for key in keys}


class FullBatch(NamedTuple):
    """The unsharded batch: what every rank of a CP group would hold together.

    With document masking the tensors are the flattened row, shape [B*S], and ``cu_doc_lens``
    (int32) its document boundaries; without, they are [B, S] and ``cu_doc_lens`` is ``None``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_doc_lens: torch.Tensor | None
    passthrough: dict[str, Any]


def _check_tensor(value: Any, i: int, key: str, dtype: torch.dtype, length: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"instance {i}: {key!r} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"instance {i}: {key!r} must have dtype {dtype}, got {value.dtype}")
    if value.ndim != 1:
        raise ValueError(f"instance {i}: {key!r} must be 1-D, got shape {tuple(value.shape)}")
    if length is not None and len(value) != length:
        raise ValueError(f"instance {i}: {key!r} has length {len(value)}, expected {length}")
    return value


def check_instances(
    instances: Sequence[Mapping[str, Any]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None, list[str]]:
    """Validate packed instances (see :class:`ContextParallelCollator`); return their input_ids,
    doc_lens, label_masks and other keys.

    Raises ``ValueError`` naming the instance index and key for anything malformed.
    """
    if isinstance(instances, Mapping) or not isinstance(instances, Sequence):
        raise ValueError(f"expected a list of packed instances, got {type(instances).__name__}")
    if not instances:
        raise ValueError("empty batch: the collator needs at least one instance")
    first = instances[0]
    if not isinstance(first, Mapping):
        raise ValueError(f"instance 0 must be a dict, got {type(first).__name__}")
    extra = sorted(set(first) - set(CONSUMED_KEYS))
    clash = [k for k in extra if k in PRODUCED_KEYS or k in _METADATA_KEYS]
    if clash:
        raise ValueError(f"instance 0: key {clash[0]!r} is produced by the collator; rename it")
    ids, lens, masks = [], [], []
    seq_len = None
    for i, inst in enumerate(instances):
        if not isinstance(inst, Mapping):
            raise ValueError(f"instance {i} must be a dict, got {type(inst).__name__}")
        for key in ("input_ids", "doc_lens"):
            if key not in inst:
                raise ValueError(f"instance {i}: missing required key {key!r}")
        if set(inst) - set(CONSUMED_KEYS) != set(extra):
            diff = sorted((set(inst) - set(CONSUMED_KEYS)) ^ set(extra))
            raise ValueError(f"instance {i}: key {diff[0]!r} is not in every instance of the batch")
        row = _check_tensor(inst["input_ids"], i, "input_ids", torch.int64)
        if seq_len is None:
            seq_len = len(row)
            if seq_len == 0:
                raise ValueError("instance 0: 'input_ids' is empty")
        elif len(row) != seq_len:
            raise ValueError(
                f"instance {i}: 'input_ids' has length {len(row)} but instance 0 has {seq_len}; "
                "all rows of a batch must have one length"
            )
        doc_lens = _check_tensor(inst["doc_lens"], i, "doc_lens", torch.int64)
        if len(doc_lens) == 0 or int(doc_lens.min()) <= 0:
            raise ValueError(f"instance {i}: 'doc_lens' must be non-empty and all > 0, got {doc_lens.tolist()}")
        total = int(doc_lens.sum())
        if total != seq_len:
            raise ValueError(f"instance {i}: 'doc_lens' sums to {total}, but 'input_ids' has length {seq_len}")
        ids.append(row)
        lens.append(doc_lens)
        if "label_mask" in inst:
            masks.append(_check_tensor(inst["label_mask"], i, "label_mask", torch.bool, seq_len))
        else:  # absent means all True
            masks.append(None)
    if all(m is None for m in masks):
        return ids, lens, None, extra
    return ids, lens, [torch.ones(seq_len, dtype=torch.bool) if m is None else m for m in masks], extra


def flat_labels(input_ids: torch.Tensor, next_ok: torch.Tensor) -> torch.Tensor:
    """``labels[..., i] = input_ids[..., i+1]`` where ``next_ok[..., i]``, else -100 (last too)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = torch.where(next_ok, input_ids[..., 1:], IGNORE_INDEX)
    return labels


def document_positions(doc_starts: torch.Tensor, doc_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Each token's position inside its document, for consecutive documents of ``doc_lens`` > 0."""
    # One cumsum of +1 steps that drop back to 0 at every document start (cheaper than repeat_interleave).
    steps = torch.ones(num_tokens, dtype=torch.int64)
    steps[0] = 0
    steps[doc_starts[1:]] = 1 - doc_lens[:-1]
    return steps.cumsum_(0)


@dataclass(kw_only=True)
class ContextParallelCollator:
    """Collate packed instances into the batch of one context-parallel rank.

    A packed instance is a dict with ``input_ids`` (int64 [S]), ``doc_lens`` (int64 [n], every
    length > 0, summing to S; a trailing run of padding counts as one document) and optionally
    ``label_mask`` (bool [S], False on padding and on tokens that must not be predicted); any
    other key is collated with ``default_collate`` and passed through. Rows hold different numbers
    of documents, so ``doc_lens`` cannot be stacked: a DataLoader over packed instances with
    ``batch_size`` > 1 needs this collator (``default_collate`` fails).

    The batch holds ``input_ids``, ``labels`` and ``position_ids`` (int64, this rank's tokens:
    [1, L] with document masking, [B, L] without) plus, with document masking, the balancer's
    metadata (``cu_doc_lens`` int32 and ``max_doc_len``, or the llama3 keys), and the
    pass-through keys. ``labels[i]`` is the next token of the same document, or -100
    at a document's last token, on padding and where ``label_mask`` is False; ``position_ids``
    restart at 0 at every document. Both are computed on the full row before sharding, so they
    are right on every rank.

    With ``document_masking`` (the default) the B rows are flattened into one packed row of B·S
    tokens, labels and positions are computed on that full row, and the three tensors are
    sharded with one plan of the balancer's ``batch_shard_by_document``; its metadata joins the
    batch. Without, each row is sharded on its own (``batch_shard`` semantics) and no metadata is
    added. ``reorder_documents`` (llama3 with document masking only) permutes whole documents with
    ``cp_data.balancers.ordering.llama3_balanced_order`` after labels and positions are computed,
    so contiguous slices get balanced attention work while every token keeps its label and
    position.
    """

    load_balancer: RingAttentionLoadBalancerType | str
    cp_rank: int
    cp_world_size: int
    pad_token_id: int = 0
    length_multiple: int | None = None
    document_masking: bool = True
    reorder_documents: bool = False
    balancer: RingAttentionLoadBalancer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.load_balancer = RingAttentionLoadBalancerType.parse(self.load_balancer)
        for name in ("document_masking", "reorder_documents"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not is_int(self.pad_token_id):
            raise ValueError(f"pad_token_id must be an int, got {self.pad_token_id!r}")
        llama3 = self.load_balancer is RingAttentionLoadBalancerType.llama3
        if llama3 and not self.document_masking:
            raise ValueError(
                "load_balancer='llama3' has no batch_shard, so it needs document_masking=True"
            )
        if self.reorder_documents and not (llama3 and self.document_masking):
            raise ValueError(
                "reorder_documents=True needs load_balancer='llama3' with document_masking=True, "
                f"got load_balancer={self.load_balancer.value!r}, document_masking={self.document_masking}"
            )
        self.balancer = self.load_balancer.create(cp_rank=self.cp_rank, cp_world_size=self.cp_world_size)
        # A plan of an empty sequence checks length_multiple against the balancer's rules now.
        self._plan(0, torch.zeros(1, dtype=torch.int32) if self.document_masking else None)

    @classmethod
    def from_mesh(
        cls, cp_mesh: "DeviceMesh", *, load_balancer: RingAttentionLoadBalancerType | str, **kwargs: Any
    ) -> "ContextParallelCollator":
        """The collator for this process's rank in the 1-D context-parallel ``cp_mesh``."""
        import torch.distributed as dist

        if cp_mesh.ndim != 1:
            raise ValueError(f"cp_mesh must be 1-D, got a mesh with {cp_mesh.ndim} dimensions")
        group = cp_mesh.get_group()
        return cls(
            load_balancer=load_balancer,
            cp_rank=dist.get_rank(group),
            cp_world_size=dist.get_world_size(group),
            **kwargs,
        )

    def _plan(self, seq_len: int, cu_doc_lens: torch.Tensor | None) -> ShardPlan:
        return self.balancer.plan(seq_len, cu_doc_lens, length_multiple=self.length_multiple)

    def full_batch(self, instances: Sequence[Mapping[str, Any]]) -> FullBatch:
        """The batch before sharding: rows flattened, labels and positions computed, documents reordered."""
        ids, lens, masks, extra = check_instances(instances)
        passthrough = default_collate([{k: inst[k] for k in extra} for inst in instances]) if extra else {}
        if not self.document_masking:
            input_ids = torch.stack(ids)
            next_ok = torch.stack(masks)[:, 1:] if masks is not None else torch.ones(1, dtype=torch.bool)
            positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return FullBatch(input_ids, flat_labels(input_ids, next_ok), positions, None, passthrough)

        input_ids = torch.cat(ids)
        doc_lens = torch.cat(lens)
        cu = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)
        torch.cumsum(doc_lens, 0, out=cu[1:])
        doc_starts = cu[:-1].long()
        positions = document_positions(doc_starts, doc_lens, len(input_ids))
        # Every document is non-empty, so token i+1 starts a document exactly where its position is 0.
        next_ok = positions[1:] != 0
        if masks is not None:
            next_ok &= torch.cat(masks)[1:]
        labels = flat_labels(input_ids, next_ok)
        if self.reorder_documents:
            input_ids, labels, positions, cu = self._reorder(input_ids, labels, positions, cu)
        return FullBatch(input_ids, labels, positions, cu, passthrough)

    def _reorder(
        self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cu_np = cu.numpy().astype(np.int64)
        n = len(cu_np) - 1
        perm = np.asarray(
            llama3_balanced_order(np.diff(cu_np), self.cp_world_size, self.length_multiple), dtype=np.int64
        )
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise RuntimeError(f"llama3_balanced_order returned {perm.tolist()[:12]}, not a permutation of {n} documents")
        new_cu, source = reorder_documents(cu_np, perm)
        # Labels and positions were computed on the original row; every token carries its own.
        source_t = torch.from_numpy(source)
        return input_ids[source_t], labels[source_t], positions[source_t], torch.from_numpy(new_cu).to(cu.dtype)

    def plans_all_ranks(self, full: FullBatch) -> list[ShardPlan]:
        """The plan of every rank of the group for ``full`` (to unshard gathered shards)."""
        seq_len = full.input_ids.shape[-1]
        return self.balancer.plan_all_ranks(seq_len, full.cu_doc_lens, length_multiple=self.length_multiple)

    def __call__(self, instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The batch of rank ``cp_rank`` (keys in the class docstring) for a list of B packed instances."""
        full = self.full_batch(instances)
        plan = self._plan(full.input_ids.shape[-1], full.cu_doc_lens)
        # copy: a view would keep the whole B·S row alive and go whole to DataLoader workers' peers.
        input_ids, labels, positions = plan.shard_all(
            [full.input_ids, full.labels, full.position_ids],
            seq_dims=[-1, -1, -1],
            pad_values=[self.pad_token_id, IGNORE_INDEX, 0],
            copy=True,
        )
        if self.document_masking:
            input_ids, labels, positions = input_ids[None], labels[None], positions[None]
        batch = dict(input_ids=input_ids, labels=labels, position_ids=positions)
        batch.update(plan.metadata)
        batch.update(full.passthrough)
        return batch
