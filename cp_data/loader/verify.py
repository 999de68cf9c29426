"""Checks with collectives: the right data on every rank of a step, the same loader state everywhere."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from cp_data.balancers import unshard
from cp_data.collate import IGNORE_INDEX, PRODUCED_KEYS, ContextParallelCollator

from .mesh import dp_cp_coordinates

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["IndexedDataset", "shard_summary", "verify_dp_cp_batch", "verify_loader_state"]


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


def verify_loader_state(loader_or_state: Any, *, group: "ProcessGroup | None" = None) -> dict[str, Any]:
    """Check with a collective that every rank of ``group`` holds the same loader state; return it.

    Call it on every rank (default group: all ranks) right before a checkpoint is written, with
    the loader or its ``state_dict()``. Raises ``RuntimeError`` naming the ranks and the keys that
    differ. Works with any backend that supports ``all_gather_object`` (gloo, nccl).
    """
    import torch.distributed as dist

    state = loader_or_state.state_dict() if hasattr(loader_or_state, "state_dict") else loader_or_state
    text = json.dumps(state, sort_keys=True, default=repr)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (dist.get_rank(), text), group=group)
    first_rank, first = gathered[0]
    for rank, other in gathered[1:]:
        if other != first:
            a, b = json.loads(first), json.loads(other)
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) else []
            detail = "; ".join(f"{k}: {json.dumps(a.get(k))} vs {json.dumps(b.get(k))}" for k in keys)
            raise RuntimeError(
                f"loader states differ between ranks {first_rank} and {rank}" + (f" ({detail})" if detail else "")
            )
    return state
