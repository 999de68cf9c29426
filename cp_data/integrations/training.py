"""A CP-correct loss and gradient sum: training on shards equals training the whole batch at once.

Each CP rank holds a shard of one batch. The loss of the whole batch is the sum of every rank's
token losses over the global count of labelled tokens; :func:`cp_loss` computes it with one small
all-reduce, so that summing the parameter gradients over the same ranks (:func:`sum_gradients`,
or a DDP / FSDP reduction scaled to a sum) gives exactly the gradient of CP = 1.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.comm import resolve_group
from ..attention.reference import compute_dtype
from ..collate import IGNORE_INDEX

__all__ = ["cp_loss", "sum_gradients"]


def cp_loss(logits: torch.Tensor, labels: torch.Tensor, group: Any) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled tokens of all ranks of ``group``.

    ``logits``: ``[1, L, V]`` or ``[L, V]``, this rank's; ``labels``: the batch's ``[1, L]``
    labels, which are already shifted (``labels[i]`` is the token after ``i`` in its document,
    -100 where nothing is predicted) — do not shift them again. ``group`` (process group or 1-D
    DeviceMesh): the ranks that share one loss — the CP group, or the DP x CP group for one mean
    over every token of the global batch. The value is that global mean on every rank; the
    gradient is this rank's share, so the sum of the ranks' gradients is the gradient of the
    global mean. DDP and FSDP average over their N ranks instead of summing: scale this loss by N
    there. Half precision logits are upcast to float32.
    """
    group, _, _ = resolve_group(group)
    if logits.ndim == 3:
        logits = logits.flatten(0, 1)
    labels = labels.to(logits.device, non_blocking=True).flatten()
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must hold the same tokens"
        )
    logits = logits.to(compute_dtype(logits.dtype))
    local_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    totals = torch.stack([local_sum.detach(), (labels != IGNORE_INDEX).sum().to(local_sum.dtype)])
    dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1)  # a batch with nothing to predict: loss 0, no gradient
    # value: the global mean; gradient: this rank's token losses over the global count
    return (local_sum + (totals[0] - local_sum.detach())) / count


def sum_gradients(parameters: Iterable[torch.nn.Parameter], group: Any) -> None:
    """Sum the gradients of replicated parameters over ``group`` in place (one all-reduce).

    Every rank must hold gradients for the same parameters, in the same order.
    """
    group, _, _ = resolve_group(group)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))
