"""CP attention on 2 and 4 gloo processes equals single-process document-masked attention.

One spawn of 4 processes (shared with ``test_hf_cp.py``, see :mod:`gloo_session`) runs every
case: the world (W=4) and two W=2 subgroups, all three balancers, many random packed batches each
(B >= 1, many documents, lengths that are multiples of nothing in particular, random
``length_multiple``). Each batch goes through the real
``ContextParallelCollator``; ``input_ids`` are the token's position in the flattened row, so the
collated ``input_ids`` say which token of the full row every local slot holds (-1: balancer
padding) and q, k, v and the output gradient are sharded exactly like the tokens. Outputs and the
gradients of q, k, v are gathered, unsharded with the collator's plans, and compared with
:func:`varlen_attention` on the full row.

The same launch runs the GPU code path on CPU: :func:`cp_data.integrations.flash.flash_cp_attention`
feeding the collator's shards and metadata to the unmodified ring-flash-attn (zigzag and llama3
varlen functions) and the Ulysses all-to-all around flash-attn's varlen function, with
``flash_attn_cpu`` (test-only) standing in for flash-attn's two CUDA kernels; in float64 (which
the stand-in computes in float64) and bfloat16, llama3 with ``heads_k_stride`` 1 and all.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from cp_data import RingAttentionLoadBalancerType, unshard
from cp_data.attention import cp_attention, varlen_attention
from cp_data.collate import ContextParallelCollator

import flash_attn_cpu
import gloo_session

KINDS = ("zig_zag", "llama3", "ulysses")
CASES_PER_KIND = 10
HEADS, HEAD_DIM = 4, 8
KV_HEADS = (4, 2, 1)  # grouped-query attention: ulysses splits 2 kv heads over W=2, repeats them for W=4
# measured: 2.7e-15 in float64, 1.3e-6 in float32 (a float32 log-sum-exp merge gives 1.6e-6 in float64)
TOLERANCE = {"torch.float64": 1e-12, "torch.float32": 1e-5}
# find_spec, not import: ring-flash-attn's package __init__ needs flash-attn (and transformers < 5)
HAS_RING_FLASH_ATTN = importlib.util.find_spec("ring_flash_attn") is not None
FLASH_CASES_PER_KIND = 2  # float64; one more in bfloat16
# (output, gradients): flash-attn's log-sum-exp is float32, so are ring-flash-attn's zigzag block
# merges and gradient sums; bf16 rounds inputs, outputs and gradients
FLASH_TOLERANCE = {
    ("zig_zag", "torch.float64"): (1e-6, 2e-6),
    ("llama3", "torch.float64"): (1e-12, 1e-6),
    ("ulysses", "torch.float64"): (1e-12, 1e-6),
    "torch.bfloat16": (2e-2, 5e-2),
}


def random_instances(rng: np.random.Generator) -> list[dict]:
    """B packed rows of one random length S, each cut into random documents (all > 0)."""
    batch, seq_len = int(rng.integers(1, 4)), int(rng.integers(5, 90))
    instances = []
    for row in range(batch):
        num_docs = int(rng.integers(1, max(2, seq_len // 4)))
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=num_docs - 1, replace=False))
        doc_lens = np.diff(np.concatenate([[0], cuts, [seq_len]]))
        instances.append(
            dict(
                input_ids=torch.arange(row * seq_len, (row + 1) * seq_len),
                doc_lens=torch.from_numpy(doc_lens).long(),
            )
        )
    return instances


def random_length_multiple(rng: np.random.Generator, kind: str, world: int, flash: bool) -> int | None:
    choices = {
        "zig_zag": [None, 1, 3, 2 * world, 5],  # odd multiples give an odd final padding document
        "llama3": [None, 2, 3],
        "ulysses": [None, world, 3 * world],
    }[kind]
    if flash and kind == "zig_zag":  # the zigzag kernel halves local documents: even only
        choices = [None, 2 * world, 6 * world]
    return choices[int(rng.integers(len(choices)))]


def run_case(
    seed: int, kind: str, world: int, rank: int, group, dtype=torch.float64, flash: bool = False
) -> dict | None:
    """One random batch through the collator and CP attention; errors on the group's rank 0.

    ``flash``: the GPU code path (ring-flash-attn / flash-attn varlen on the stand-in kernels),
    which returns no log-sum-exp; else the reference, checked with its log-sum-exp.
    """
    rng = np.random.default_rng(seed)
    instances = random_instances(rng)
    collator = ContextParallelCollator(
        load_balancer=kind,
        cp_rank=rank,
        cp_world_size=world,
        pad_token_id=-1,
        length_multiple=random_length_multiple(rng, kind, world, flash),
        reorder_documents=kind == "llama3" and bool(rng.integers(2)),
    )
    batch = collator(instances)
    total = sum(len(inst["input_ids"]) for inst in instances)
    gen = torch.Generator().manual_seed(seed)
    kv_heads = KV_HEADS[seed % len(KV_HEADS)]
    q, grad_out = torch.randn(2, total, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, total, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    # the reference always runs in float64 on exactly the values the CP ranks get
    q, k, v, grad_out = (x.to(dtype).double() for x in (q, k, v, grad_out))

    source = batch["input_ids"][0]
    is_pad = source < 0

    def local(x: torch.Tensor) -> torch.Tensor:
        return x[source.clamp(min=0)].masked_fill(is_pad[:, None, None], 0.0).to(dtype)

    q_l, k_l, v_l = (local(x).requires_grad_() for x in (q, k, v))
    if flash:
        from cp_data.integrations.flash import flash_cp_attention

        stride = (None, 1)[seed % 2] if kind == "llama3" else None
        out = flash_cp_attention(
            q_l, k_l, v_l, batch, load_balancer=kind, group=group, heads_k_stride=stride
        )
        extra = []  # the flash path returns no log-sum-exp
    else:
        out, lse = cp_attention(
            q_l, k_l, v_l, batch, load_balancer=kind, group=group, return_lse=True,
            verify=seed % 2 == 0,
        )
        extra = [lse.T]
    (out * local(grad_out)).sum().backward()
    # per token: output and dq over the q heads; dk, dv over the kv heads; lse per q head
    mine = torch.cat(
        [x.double().flatten(1) for x in [out.detach(), q_l.grad, k_l.grad, v_l.grad, *extra]], 1
    )
    shards = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shards, mine, group=group)
    if rank:
        return None

    full = collator.full_batch(instances)
    merged = unshard(shards, collator.plans_all_ranks(full), seq_dim=0)
    got = torch.empty_like(merged)
    got[full.input_ids] = merged  # back to the original token order (llama3 may reorder documents)

    doc_lens = torch.cat([inst["doc_lens"] for inst in instances])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), doc_lens.cumsum(0)])
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = varlen_attention(qf, kf, vf, cu)
    (ref_out * grad_out).sum().backward()
    want = torch.cat(
        [x.flatten(1) for x in [ref_out.detach(), qf.grad, kf.grad, vf.grad, ref_lse.T][: 4 + len(extra)]],
        dim=1,
    )
    widths = [HEADS * HEAD_DIM] * 2 + [kv_heads * HEAD_DIM] * 2 + [HEADS] * len(extra)
    return dict(
        error=[float(part.abs().max()) for part in (got - want).split(widths, dim=1)],
        finite=all(bool(torch.isfinite(s).all()) for s in shards),
        tokens=total,
        dtype=str(dtype),
        kv_heads=kv_heads,
        padding=int(sum((s.shape[0] for s in shards))) - total,
    )


def bad_input_messages(rank: int, world: int) -> list[str]:
    """Every rank passes metadata that does not fit its shard: each must raise, nobody hangs."""
    x = torch.zeros(6, HEADS, HEAD_DIM, dtype=torch.float64)
    cases = [
        ("zig_zag", dict(cu_doc_lens=torch.tensor([0, 4, 8]), max_doc_len=4), x),
        (
            "llama3",
            dict(
                cu_doc_lens_q=torch.tensor([0, 5]),
                cu_doc_lens_k=torch.tensor([0, 5]),
                max_doc_len_q=5,
                max_doc_len_k=5,
                local_k_slice=slice(0, 5),
            ),
            x,
        ),
        ("ulysses", dict(cu_doc_lens=torch.tensor([0, 6 * world - 1]), max_doc_len=6 * world), x),
        (
            "ulysses",
            dict(cu_doc_lens=torch.tensor([0, 6 * world]), max_doc_len=6 * world),
            x[:, :3],
        ),
    ]
    messages = []
    for kind, metadata, t in cases:
        try:
            cp_attention(t, t, t, metadata, load_balancer=kind, group=dist.group.WORLD)
        except ValueError as err:
            messages.append(f"{kind}: {err}")
    dist.barrier()  # the group is still usable: nobody entered a collective
    return messages


def group_misuse_messages(rank: int, pairs: list) -> dict[str, str]:
    """DP=2 x CP=2: ranks {0, 1} and {2, 3} hold shards of two different batches of one shape."""
    cp_rank, pair = rank % 2, pairs[rank // 2]
    doc_lens = [[4, 8, 12], [12, 8, 4]][rank // 2]
    instances = [dict(input_ids=torch.arange(24), doc_lens=torch.tensor(doc_lens))]
    world = dist.group.WORLD
    messages = {}

    def attempt(name: str, kind: str, batch: dict, **kwargs) -> None:
        x = torch.zeros(batch["input_ids"].shape[1], HEADS, HEAD_DIM, dtype=torch.float64)
        try:
            cp_attention(x, x, x, batch, load_balancer=kwargs.pop("balancer", kind), **kwargs)
            messages[name] = "no error"
        except ValueError as err:
            messages[name] = str(err)

    def collate(kind: str, for_rank: int = cp_rank) -> dict:
        return ContextParallelCollator(load_balancer=kind, cp_rank=for_rank, cp_world_size=2)(instances)

    for kind in KINDS:
        batch = collate(kind)
        attempt(f"{kind} world", kind, batch, group=world, verify=True)
        balancer = RingAttentionLoadBalancerType(kind).create(cp_rank=cp_rank, cp_world_size=2)
        attempt(f"{kind} balancer", kind, batch, group=world, balancer=balancer)
        attempt(f"{kind} pair", kind, batch, group=pair, verify=True)
    # llama3 metadata tells the rank: a batch sharded for the other rank of the pair fails locally
    attempt("llama3 swapped", "llama3", collate("llama3", 1 - cp_rank), group=pair)
    mixed = ("zig_zag", "ulysses")[cp_rank]
    attempt("mixed schemes", mixed, collate(mixed), group=pair, verify=True)
    dist.barrier()  # nobody is stuck in a collective
    return messages


def flash_refusals(group) -> list[str]:
    """Inputs the GPU path refuses before any collective, on every rank."""
    from cp_data.integrations.flash import flash_cp_attention

    x = torch.zeros(6, HEADS, HEAD_DIM, dtype=torch.float64)
    zig_zag = dict(cu_doc_lens=torch.tensor([0, 3, 6]), max_doc_len=3)
    attempts = [
        (x.float(), dict(cu_doc_lens=torch.tensor([0, 6]), max_doc_len=6), "zig_zag", None),
        (x, zig_zag, "zig_zag", None),  # odd local document: the kernel halves cu_doc_lens
        (x, dict(cu_doc_lens=torch.tensor([0, 6]), max_doc_len=6), "zig_zag", 2),
    ]
    messages = []
    for tensor, metadata, kind, stride in attempts:
        try:
            flash_cp_attention(
                tensor, tensor, tensor, metadata, load_balancer=kind, group=group,
                heads_k_stride=stride,
            )
        except ValueError as err:
            messages.append(str(err))
    return messages


def worker(rank: int, world: int) -> dict:
    """Every case of this module on one rank (run by :mod:`gloo_session`)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    runs = [
        (4, dist.group.WORLD, rank, 0),
        (2, pairs[rank // 2], rank % 2, 10_000 * (1 + rank // 2)),
    ]
    results = {}
    for size, group, sub_rank, seed0 in runs:
        for kind in KINDS:
            found = [run_case(seed0 + i, kind, size, sub_rank, group) for i in range(CASES_PER_KIND)]
            last = seed0 + CASES_PER_KIND
            found.append(run_case(last, kind, size, sub_rank, group, torch.float32))
            if sub_rank == 0:
                results[(kind, size, seed0)] = found
    results["bad_input"] = bad_input_messages(rank, world)
    results["misuse"] = group_misuse_messages(rank, pairs)
    if HAS_RING_FLASH_ATTN:
        warnings.filterwarnings("ignore", category=FutureWarning)  # gloo *_tensor collectives renamed
        flash_attn_cpu.install()
        for size, group, sub_rank, seed0 in runs:
            for kind in KINDS:
                found = [
                    run_case(seed0 + i, kind, size, sub_rank, group, torch.float64, flash=True)
                    for i in range(FLASH_CASES_PER_KIND)
                ]
                last = seed0 + FLASH_CASES_PER_KIND
                found.append(run_case(last, kind, size, sub_rank, group, torch.bfloat16, flash=True))
                if sub_rank == 0:
                    results[("flash", kind, size, seed0)] = found
        results["flash_refusals"] = flash_refusals(dist.group.WORLD)
    return results


@pytest.fixture(scope="module")
def dist_results() -> list[dict]:
    return [result["attention"] for result in gloo_session.results()]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_cp_attention_equals_full_attention(dist_results, kind, world):
    runs = [res for r in dist_results for key, res in r.items() if key[:2] == (kind, world)]
    cases = [case for run in runs for case in run]
    assert len(cases) == (CASES_PER_KIND + 1) * (4 // world)
    assert {case["dtype"] for case in cases} == set(TOLERANCE)
    for case in cases:
        assert max(case["error"]) <= TOLERANCE[case["dtype"]], (kind, world, case)
        assert case["finite"], (kind, world, case)
    # the random batches exercised padding added by the balancer
    assert any(case["padding"] > 0 for case in cases)


def test_bad_metadata_raises_on_every_rank_before_any_collective(dist_results):
    for rank_result in dist_results:
        messages = rank_result["bad_input"]
        assert len(messages) == 4, messages
        assert "cu_doc_lens ends at 8 but must end at 6" in messages[0]
        assert "local_k_slice slice(0, 5, None) ends at 5, but rank" in messages[1]
        assert f"must end at {6 * 4}" in messages[2]
        assert "heads (3) divisible by the CP group size (4)" in messages[3]


def test_misused_groups_raise_on_every_rank(dist_results):
    for rank, rank_result in enumerate(dist_results):
        messages = rank_result["misuse"]
        for kind in KINDS:
            assert messages[f"{kind} pair"] == "no error", (rank, kind)
            assert "CP group check failed" in messages[f"{kind} world"], (rank, messages)
            assert f"for rank {rank % 2} of 2 but this process is rank {rank} of 4" in (
                messages[f"{kind} balancer"]
            )
        for kind in ("zig_zag", "ulysses"):
            assert "the ranks hold shards of different batches" in messages[f"{kind} world"]
        assert "does not fit the documents the other ranks hold" in messages["llama3 world"]
        assert "sharded for another rank or CP group size" in messages["llama3 swapped"]
        assert "rank 1 runs ulysses attention but rank 0 runs zig_zag" in messages["mixed schemes"]


needs_ring_flash_attn = pytest.mark.skipif(
    not HAS_RING_FLASH_ATTN, reason="needs ring-flash-attn (dev extra)"
)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
@needs_ring_flash_attn
def test_ring_flash_attn_with_cp_data_batches_equals_full_attention(dist_results, kind, world):
    cases = [
        case
        for result in dist_results
        for key, found in result.items()
        if key[:3] == ("flash", kind, world)
        for case in found
    ]
    assert len(cases) == (FLASH_CASES_PER_KIND + 1) * (4 // world)
    assert {case["kv_heads"] for case in cases} == set(KV_HEADS)
    assert any(case["padding"] > 0 for case in cases)
    for case in cases:
        tol = FLASH_TOLERANCE.get((kind, case["dtype"])) or FLASH_TOLERANCE[case["dtype"]]
        out_err, *grad_err = case["error"]
        assert out_err <= tol[0] and max(grad_err) <= tol[1], (kind, world, case)


@needs_ring_flash_attn
def test_flash_path_refuses_float32_odd_zigzag_documents_and_stray_strides(dist_results):
    for result in dist_results:
        float32, odd, stride = result["flash_refusals"]
        assert "got float32 (ring-flash-attn's zigzag backward also returns wrong gradients" in float32
        assert "local document 0 has odd length 3" in odd
        assert "heads_k_stride is a llama3 setting; zig_zag takes none" in stride
