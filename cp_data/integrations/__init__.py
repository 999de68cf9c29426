"""Bridges from cp-data batches to model code: Hugging Face transformers and the GPU kernels.

Nothing here imports transformers, flash-attn or ring-flash-attn until it is used:
``cp_data.integrations.hf`` (extra ``hf-models``) registers CP attention with transformers;
``cp_data.integrations.flash`` (extra ``gpu``) runs the batches through ring-flash-attn and
flash-attn; ``cp_data.integrations.training`` holds the CP-correct loss and gradient helpers.
"""

from .flash import flash_cp_attention, ring_flash_attn_functions
from .hf import ContextParallelAttention, model_inputs, register_cp_attention
from .training import cp_loss, sum_gradients

__all__ = [
    "ContextParallelAttention",
    "cp_loss",
    "flash_cp_attention",
    "model_inputs",
    "register_cp_attention",
    "ring_flash_attn_functions",
    "sum_gradients",
]
