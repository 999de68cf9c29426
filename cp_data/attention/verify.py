"""One collective that checks a batch's metadata against the other ranks of its CP group.

Local checks catch a batch whose metadata does not fit the shard in hand. Some mistakes only
show across ranks: a batch used with the whole world as its group in a DP x CP job (the ranks
then hold shards of different batches), a batch used on the wrong rank, or ranks running
different schemes. :func:`verify_metadata` gathers a small summary of every rank's metadata and
raises the same ``ValueError`` on every rank when they disagree.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ..balancers import RingAttentionLoadBalancerType, llama3_cu_seqlens

__all__ = ["verify_metadata"]


def _plain(value: Any) -> Any:
    """A picklable, comparable copy of one metadata value."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, slice):
        return (value.start or 0, value.stop)
    return value


def _short(values: Any) -> str:
    text = str(values)
    return text if len(text) <= 60 else text[:57] + "..."


def _llama3_disagreement(summaries: list[dict]) -> str | None:
    """Rebuild the global document boundaries from every rank's share and re-derive each rank's."""
    world, tokens = len(summaries), summaries[0]["tokens"]
    bounds = {0, world * tokens}
    for rank, summary in enumerate(summaries):
        bounds.update(rank * tokens + int(c) for c in summary["cu_doc_lens_q"][1:-1])
        bounds.add(summary["local_k_slice"][0])  # the start of the rank's first document
    cu = torch.tensor(sorted(bounds))
    for rank, summary in enumerate(summaries):
        want = llama3_cu_seqlens(cu, rank, world)
        got_slice = summary["local_k_slice"]
        want_slice = (want["local_k_slice"].start, want["local_k_slice"].stop)
        same = got_slice == want_slice and all(
            np.array_equal(np.unique(summary[key]), np.unique(want[key].numpy()))
            for key in ("cu_doc_lens_q", "cu_doc_lens_k")
        )
        if not same:
            return (
                f"rank {rank}'s llama3 metadata (local_k_slice {got_slice}, cu_doc_lens_k "
                f"{_short(summary['cu_doc_lens_k'])}) does not fit the documents the other ranks "
                f"hold (expected local_k_slice {want_slice}): the ranks hold shards of different "
                "batches, or a batch sharded for another rank"
            )
    return None


def _disagreement(summaries: list[dict]) -> str | None:
    first = summaries[0]
    for rank, summary in enumerate(summaries):
        if summary["kind"] != first["kind"]:
            return f"rank {rank} runs {summary['kind']} attention but rank 0 runs {first['kind']}"
        if summary["tokens"] != first["tokens"]:
            return f"rank {rank} holds {summary['tokens']} tokens but rank 0 holds {first['tokens']}"
    if first["kind"] == RingAttentionLoadBalancerType.llama3.value:
        try:
            return _llama3_disagreement(summaries)
        except (TypeError, ValueError, IndexError):
            return None  # malformed metadata: the local checks that follow name the bad value
    for rank, summary in enumerate(summaries):
        if summary["cu_doc_lens"] != first["cu_doc_lens"]:
            return (
                f"rank {rank} has cu_doc_lens {_short(summary['cu_doc_lens'])} but rank 0 has "
                f"{_short(first['cu_doc_lens'])}: the ranks hold shards of different batches "
                "(is group the CP group these batches were sharded for?)"
            )
    return None


def verify_metadata(
    kind: RingAttentionLoadBalancerType,
    metadata: Mapping[str, Any],
    local_tokens: int,
    *,
    group: Any,
    rank: int,
    size: int,
) -> None:
    """Raise ``ValueError`` on every rank of ``group`` when the ranks' metadata disagree.

    zig_zag and ulysses metadata must be identical on every rank; llama3 metadata must be the
    share of rank r of one global batch (rebuilt from all ranks). Costs one small
    ``all_gather_object``: run it once (first step), not every layer.
    """
    summary = {key: _plain(value) for key, value in metadata.items()}
    summary.update(kind=kind.value, tokens=int(local_tokens))
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, summary, group=group)
    problem = _disagreement(everyone)
    if problem is not None:
        raise ValueError(f"CP group check failed on rank {rank} of {size}: {problem}")
