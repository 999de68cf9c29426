"""Hugging Face transformers models on cp-data batches: CP attention through ``AttentionInterface``.

``register_cp_attention(group, load_balancer)`` registers an attention implementation that reads
the batch metadata from the model's forward keyword arguments (transformers passes unknown
keyword arguments down to the attention function) and runs the CP attention of the batch's
balancer: cp-data's reference implementation on CPU tensors, ring-flash-attn / flash-attn on CUDA
tensors. Then, per step::

    inputs = model_inputs(batch, device)              # input_ids, position_ids, metadata
    logits = model(**inputs).logits
    loss = cp_loss(logits, batch["labels"], group)    # labels are already shifted

The labels stay out of ``model(...)``: transformers would shift them a second time.
transformers is imported only by :func:`register_cp_attention` (extra ``hf-models``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..attention.api import cp_attention
from ..balancers import METADATA_KEYS, RingAttentionLoadBalancer, RingAttentionLoadBalancerType
from .flash import flash_cp_attention

__all__ = ["ContextParallelAttention", "model_inputs", "register_cp_attention"]

_METADATA_KEYS = tuple(dict.fromkeys(key for keys in METADATA_KEYS.values() for key in keys))
_BACKENDS = ("auto", "reference", "flash")
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


class ContextParallelAttention:
    """A transformers attention function (``AttentionInterface``) over one CP group.

    ``group``: the CP process group or 1-D DeviceMesh; ``load_balancer``: the balancer (type,
    name or instance) the batches were sharded with; ``backend``: ``"reference"`` (cp-data's
    torch implementation), ``"flash"`` (ring-flash-attn / flash-attn) or ``"auto"`` (flash for
    CUDA tensors); ``heads_k_stride``: llama3 on flash only; ``verify``: cross-check the first
    call's metadata over the group.
    """

    def __init__(
        self,
        group: Any,
        load_balancer: RingAttentionLoadBalancerType | str | RingAttentionLoadBalancer,
        *,
        backend: str = "auto",
        heads_k_stride: int | None = None,
        verify: bool = True,
    ):
        if group is None:
            raise ValueError("group is required: pass the context-parallel process group or mesh")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if not isinstance(load_balancer, RingAttentionLoadBalancer):
            load_balancer = RingAttentionLoadBalancerType.parse(load_balancer)
        self.group, self.load_balancer, self.backend = group, load_balancer, backend
        self.heads_k_stride = heads_k_stride
        self._verify_next = verify

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """``query [1, H, L, D]``, ``key, value [1, H_kv, L, D]`` -> ``([1, L, H, D], None)``."""
        if attention_mask is not None:
            raise ValueError(
                "CP attention masks documents with the batch metadata; call the model without "
                "attention_mask"
            )
        if dropout:
            raise ValueError(f"CP attention has no attention dropout, got dropout={dropout}")
        if not getattr(module, "is_causal", True):
            raise ValueError(f"CP attention is causal; {type(module).__name__} is not")
        unsupported = {name: kwargs[name] for name in _UNSUPPORTED if kwargs.get(name) is not None}
        if unsupported:
            raise NotImplementedError(f"CP attention does not implement {unsupported}")
        if query.shape[0] != 1:
            raise ValueError(
                f"CP batches are one packed row [1, L] (document masking), got batch size "
                f"{query.shape[0]}"
            )
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, heads, D]
        flash = self.backend == "flash" or (self.backend == "auto" and q.is_cuda)
        options = dict(load_balancer=self.load_balancer, group=self.group, softmax_scale=scaling)
        options["verify"], self._verify_next = self._verify_next, False
        if flash:
            out = flash_cp_attention(q, k, v, kwargs, heads_k_stride=self.heads_k_stride, **options)
        else:
            out = cp_attention(q, k, v, kwargs, **options)
        return out.unsqueeze(0), None


def register_cp_attention(
    group: Any,
    load_balancer: RingAttentionLoadBalancerType | str | RingAttentionLoadBalancer,
    *,
    name: str = "cp_data",
    backend: str = "auto",
    heads_k_stride: int | None = None,
    verify: bool = True,
) -> str:
    """Register :class:`ContextParallelAttention` with transformers under ``name``; return it.

    Select it with ``model.set_attn_implementation(name)`` (or ``attn_implementation=name`` in
    ``from_pretrained``). transformers then builds no attention mask for it; documents are masked
    by the metadata that :func:`model_inputs` passes as keyword arguments.
    """
    from transformers import AttentionInterface

    attention = ContextParallelAttention(
        group, load_balancer, backend=backend, heads_k_stride=heads_k_stride, verify=verify
    )
    AttentionInterface.register(name, attention)
    return name


def model_inputs(
    batch: Mapping[str, Any], device: torch.device | str | None = None, *, non_blocking: bool = True
) -> dict[str, Any]:
    """The keyword arguments of ``model(**inputs)`` for one collated CP batch.

    ``input_ids`` and ``position_ids`` (each token's position in its own document, so RoPE is
    right on every rank) and the balancer's metadata, tensors moved to ``device`` with
    ``non_blocking`` (asynchronous from pinned memory: ``pin_memory=True`` in the DataLoader).
    The labels are left out (see :func:`cp_data.integrations.training.cp_loss`).
    """
    missing = [key for key in ("input_ids", "position_ids") if key not in batch]
    metadata = [key for key in _METADATA_KEYS if key in batch]
    if missing or not metadata:
        raise ValueError(
            f"a CP batch needs input_ids, position_ids and the balancer's metadata (collated with "
            f"document masking); missing {missing or 'metadata'} among keys {sorted(batch)}"
        )
    inputs = {}
    for key in ("input_ids", "position_ids", *metadata):
        value = batch[key]
        if isinstance(value, torch.Tensor) and device is not None:
            value = value.to(device, non_blocking=non_blocking)
        inputs[key] = value
    return inputs
