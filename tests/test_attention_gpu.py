"""Optional: the real GPU kernels fed with our shards and metadata equal full attention.

Skipped without CUDA, flash-attn or ring-flash-attn (``pip install cp-data[gpu]``). One process
per GPU (up to 4), NCCL for the kernels' communication; bf16 inputs through
:func:`cp_data.integrations.flash.flash_cp_attention` (ring-flash-attn's zigzag and llama3 varlen
functions, flash-attn varlen for ulysses), compared in float32 with
:func:`cp_data.attention.varlen_attention` on the full row. The same code runs on CPU in
``test_attention_dist.py`` with a stand-in for flash-attn's kernels.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.distributed as dist

from cp_data import unshard
from cp_data.attention import varlen_attention
from cp_data.attention.launch import run_gloo
from cp_data.collate import ContextParallelCollator
from cp_data.integrations.flash import flash_cp_attention

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or importlib.util.find_spec("ring_flash_attn") is None
    or importlib.util.find_spec("flash_attn") is None,
    reason="needs CUDA, flash-attn and ring-flash-attn",
)
HEADS, HEAD_DIM = 4, 64
KINDS = ("zig_zag", "llama3", "ulysses")


def gpu_worker(rank: int, world: int) -> dict:
    torch.cuda.set_device(rank)
    nccl = dist.new_group(backend="nccl")
    errors = {}
    for kind in KINDS:
        for seed in range(3):
            rng = np.random.default_rng(seed)
            doc_lens = torch.from_numpy(rng.integers(1, 300, size=12)).long()
            seq_len = int(doc_lens.sum())
            instances = [dict(input_ids=torch.arange(seq_len), doc_lens=doc_lens)]
            collator = ContextParallelCollator(
                load_balancer=kind, cp_rank=rank, cp_world_size=world, pad_token_id=-1
            )
            batch = collator(instances)
            gen = torch.Generator().manual_seed(seed)
            q, k, v, dout = torch.randn(4, seq_len, HEADS, HEAD_DIM, generator=gen).bfloat16().float()
            source = batch["input_ids"][0]
            pad = (source < 0)[:, None, None]

            def local(x):
                return x[source.clamp(min=0)].masked_fill(pad, 0.0).cuda().bfloat16()

            q_l, k_l, v_l = (local(x).requires_grad_() for x in (q, k, v))
            out = flash_cp_attention(q_l, k_l, v_l, batch, load_balancer=kind, group=nccl)
            out.backward(local(dout))
            mine = torch.stack([out.detach(), q_l.grad, k_l.grad, v_l.grad], 1).float().cpu()
            shards = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(shards, mine)  # the gloo world group, on CPU
            if rank:
                continue
            got = unshard(shards, collator.plans_all_ranks(collator.full_batch(instances)), 0)
            cu = torch.cat([torch.zeros(1, dtype=torch.long), doc_lens.cumsum(0)])
            qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
            ref, _ = varlen_attention(qf, kf, vf, cu)
            ref.backward(dout)
            want = torch.stack([ref.detach(), qf.grad, kf.grad, vf.grad], 1)
            errors[(kind, seed)] = (got - want).abs().amax(dim=(0, 2, 3)).tolist()
    return errors


def test_ring_flash_attn_with_our_metadata_equals_full_attention():
    world = min(torch.cuda.device_count(), 4)
    errors = run_gloo(gpu_worker, world, timeout=300)[0]
    assert len(errors) == 3 * len(KINDS)
    for key, (out_err, dq_err, dk_err, dv_err) in errors.items():
        assert out_err < 3e-2, (key, errors[key])  # bf16 output rounding
        assert max(dq_err, dk_err, dv_err) < 1e-1, (key, errors[key])
