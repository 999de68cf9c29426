"""A stock transformers ``LlamaForCausalLM`` under CP equals the unmodified model on whole documents.

One spawn of 4 gloo processes runs everything, shared with ``test_attention_dist.py`` (see
:mod:`gloo_session`):

- proof: a tiny Llama from a config (2 layers, 4 query / 2 key-value heads, RoPE) with cp-data's
  attention registered in ``AttentionInterface``, for every balancer, as CP=4 over the world and as
  DP=2 x CP=2 (two CP pairs, each with its own global batch; one loss over all four ranks);
  cp-data's reference attention in float64 and float32, and in float64 the GPU code path
  (ring-flash-attn / flash-attn varlen on the ``flash_attn_cpu`` stand-in kernels). Every real
  token's logits must equal its logits when its document runs alone through the unmodified model
  (default attention); the loss and every parameter gradient, summed over the ranks, must equal
  those of the unmodified model on the documents of all global batches.
- training: ``pipelines/train_hf_cp.py`` trains 2 steps from the cp-data loader, CP=4 vs CP=1.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import flash_attn_cpu
import gloo_session
from cp_data import unshard
from cp_data.collate import ContextParallelCollator
from cp_data.integrations.hf import model_inputs, register_cp_attention
from cp_data.integrations.training import cp_loss, sum_gradients

pytest.importorskip("transformers")
# spawned workers unpickle functions by module name: make pipelines/ importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import train_hf_cp  # noqa: E402

KINDS = ("zig_zag", "llama3", "ulysses")
HAS_RING_FLASH_ATTN = importlib.util.find_spec("ring_flash_attn") is not None
# documents per row of each data-parallel batch (rows of 40 tokens); the last document of row 1
# of batch 0 is padding (label_mask False)
ROW_DOCS = ([[7, 1, 12, 20], [25, 9, 6]], [[3, 30, 7], [16, 16, 8]])
# (logits, loss, gradients), measured: float64 1e-16, 9e-16, 3e-17; flash in float64 5e-8, 1e-9,
# 1e-8 (ring-flash-attn merges blocks and flash-attn returns the log-sum-exp in float32);
# float32 1.2e-7, 9.5e-7, 1.9e-8
TOLERANCE = {
    ("reference", "float64"): (1e-13, 1e-13, 1e-14),
    ("flash", "float64"): (2e-7, 5e-9, 5e-8),
    ("reference", "float32"): (5e-7, 4e-6, 1e-7),
}


def global_batch(dp: int) -> list[dict]:
    """The packed instances of data-parallel batch ``dp`` (real token ids, one padding document)."""
    rng = np.random.default_rng(100 + dp)
    instances = []
    for row, docs in enumerate(ROW_DOCS[dp]):
        instance = dict(
            input_ids=torch.from_numpy(rng.integers(1, train_hf_cp.HFConfig.vocab, size=sum(docs))),
            doc_lens=torch.tensor(docs),
        )
        if (dp, row) == (0, 1):
            instance["label_mask"] = torch.arange(sum(docs)) < sum(docs) - docs[-1]
        instances.append(instance)
    return instances


def reference(cfg, dps: list[int]) -> dict:
    """The unmodified model on every document alone: logits per batch, global loss, gradients."""
    model = cfg.build()
    loss_sum, count, logits = 0.0, 0, {}
    collator = ContextParallelCollator(load_balancer="ulysses", cp_rank=0, cp_world_size=1)
    for dp in dps:
        full = collator.full_batch(global_batch(dp))
        logits[dp] = torch.cat(train_hf_cp.document_logits(model, full.input_ids, full.cu_doc_lens))
        part, n = train_hf_cp.document_loss(model, full.input_ids, full.labels, full.cu_doc_lens)
        loss_sum, count = loss_sum + part, count + n
    loss = loss_sum / count
    loss.backward()
    return dict(logits=logits, loss=float(loss.detach()), grads=[p.grad for p in model.parameters()])


def proof(rank: int) -> dict:
    """Every (setup, backend, dtype, balancer): errors against the reference, on rank 0."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    setups = {  # name: (CP group, CP rank, CP size, data-parallel batch of each CP group)
        "CP=4": (dist.group.WORLD, rank, 4, [0]),
        "DP=2xCP=2": (pairs[rank // 2], rank % 2, 2, [0, 1]),
    }
    variants = [("reference", "float64"), ("reference", "float32")]
    variants += [("flash", "float64")] if HAS_RING_FLASH_ATTN else []
    errors = {}
    for setup, (group, cp_rank, cp_size, dps) in setups.items():
        my_dp = dps[rank // cp_size]
        for backend, dtype in variants:
            cfg = train_hf_cp.HFConfig(dtype=dtype)
            want = reference(cfg, dps) if rank == 0 else None
            for kind in KINDS:
                name = register_cp_attention(group, kind, name="proof", backend=backend)
                model = cfg.build(name)
                collator = ContextParallelCollator(
                    load_balancer=kind, cp_rank=cp_rank, cp_world_size=cp_size
                )
                batch = collator(global_batch(my_dp))
                logits = model(**model_inputs(batch)).logits
                loss = cp_loss(logits, batch["labels"], dist.group.WORLD)
                loss.backward()
                sum_gradients(model.parameters(), dist.group.WORLD)
                shards: list = [None] * 4
                dist.all_gather_object(shards, logits[0].detach())
                if rank:
                    continue
                logit_error = 0.0
                for i, dp in enumerate(dps):  # unshard each CP group's logits
                    plans = collator.plans_all_ranks(collator.full_batch(global_batch(dp)))
                    full = unshard(shards[i * cp_size : (i + 1) * cp_size], plans, seq_dim=0)
                    logit_error = max(logit_error, float((full - want["logits"][dp]).abs().max()))
                errors[(setup, backend, dtype, kind)] = dict(
                    logits=logit_error,
                    loss=abs(float(loss.detach()) - want["loss"]),
                    grads=max(
                        float((p.grad - g).abs().max())
                        for p, g in zip(model.parameters(), want["grads"])
                    ),
                    grads_checked=sum(p.grad is not None for p in model.parameters()),
                )
    return errors


def worker(rank: int, world: int) -> dict:
    """Everything this module checks, on one rank (run by :mod:`gloo_session`)."""
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata noise
    warnings.filterwarnings("ignore", category=FutureWarning)  # gloo *_tensor collectives renamed
    if HAS_RING_FLASH_ATTN:
        flash_attn_cpu.install()
    training = train_hf_cp.run_rank(rank, world, train_hf_cp.HFConfig(steps=2, seq_len=64))
    return dict(proof=proof(rank), training=training)


@pytest.fixture(scope="module")
def hf_results() -> dict:
    return gloo_session.results()[0]["hf"]


@pytest.mark.parametrize("setup", ["CP=4", "DP=2xCP=2"])
@pytest.mark.parametrize("kind", KINDS)
def test_cp_logits_loss_and_gradients_equal_whole_documents(hf_results, kind, setup):
    cases = {key: err for key, err in hf_results["proof"].items() if key[0] == setup and key[3] == kind}
    assert len(cases) == 2 + HAS_RING_FLASH_ATTN
    for (_, backend, dtype, _), err in cases.items():
        tol = dict(zip(("logits", "loss", "grads"), TOLERANCE[(backend, dtype)]))
        assert all(err[key] <= tol[key] for key in tol), (backend, dtype, err)
        assert err["grads_checked"] == 21  # embeddings, 2 x 9 per layer, final norm, lm head


def test_training_a_few_steps_under_cp_equals_cp1(hf_results):
    training = hf_results["training"]
    for kind in KINDS:
        assert len(training[kind]["losses"]) == 2
        # measured after 2 AdamW steps: losses 9e-16, weights 1.2e-14
        assert training[kind]["loss_diff"] <= 1e-13 and training[kind]["weight_diff"] <= 1e-12
