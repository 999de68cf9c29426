"""The work model: coefficients from model dims, and DP step work equal to inspect's per-rank counting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_data.inspect import shard_metrics
from cp_data.work import PRESETS, RowWork, WorkModel, causal_pairs, row_work

MODEL = WorkModel.preset("llama-1b")


def test_presets_count_the_matmul_parameters_of_the_llama_shapes():
    # Llama 3.1 8B: 8,030,261,248 parameters, of which the 128256 x 4096 input embedding does no
    # matmul and the RMSNorm weights (65 x 4096) are not matmuls: 6 FLOPs per parameter and token.
    m8 = WorkModel.preset("llama-8b")
    assert m8.linear_per_token == pytest.approx(6 * (8_030_261_248 - 128256 * 4096 - 65 * 4096), rel=1e-12)
    # scores and values: 2 multiply-adds x hidden per pair and layer, x3 for forward + backward
    assert m8.attention_per_pair == 3 * 4 * 4096 * 32
    assert set(PRESETS) == {"llama-1b", "llama-8b", "llama-70b"}
    big = WorkModel.preset("llama-70b")
    assert big.linear_per_token / m8.linear_per_token == pytest.approx(69.5 / 7.5, rel=0.01)
    assert WorkModel.from_dims(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_size=128,
                               vocab_size=100, backward_factor=0).linear_per_token == 2 * (2 * (4 * 64 * 64 + 3 * 64 * 128) + 6400)


def test_work_model_errors_name_the_value():
    with pytest.raises(ValueError, match="linear_per_token must be a finite number >= 0, got -1"):
        WorkModel(-1, 1.0)
    with pytest.raises(ValueError, match="both 0"):
        WorkModel(0, 0)
    with pytest.raises(ValueError, match="unknown work model preset 'llama-3b'"):
        WorkModel.preset("llama-3b")
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_size=64"):
        WorkModel.from_dims(hidden_size=64, num_layers=1, num_heads=3, num_kv_heads=1, ffn_size=1, vocab_size=1)
    with pytest.raises(ValueError, match="row_offsets must rise from 0 to len\\(doc_lens\\)=3"):
        MODEL.row_costs([1, 2, 3], [0, 2])
    with pytest.raises(ValueError, match="combine must be 'sum' or 'max', got 'mean'"):
        RowWork(np.ones(3), "mean")


@st.composite
def packed_rows(draw, max_rows=4):
    """Rows of one length S (a multiple of 8) cut into documents: (doc_lens, row_offsets, S)."""
    S = 8 * draw(st.integers(1, 12))
    rows = draw(st.integers(1, max_rows))
    lens, offsets = [], [0]
    for _ in range(rows):
        cuts = sorted(draw(st.sets(st.integers(1, S - 1), max_size=6)))
        lens += np.diff([0, *cuts, S]).tolist()
        offsets.append(len(lens))
    return np.array(lens), np.array(offsets), S


@given(packed_rows(), st.sampled_from([1, 2, 4, 8]), st.sampled_from(["zig_zag", "llama3", "ulysses"]))
def test_step_work_is_the_slowest_cp_rank_as_inspect_counts_it(rows, W, kind):
    lens, offsets, S = rows
    B = len(offsets) - 1
    work = row_work(MODEL, lens, offsets, load_balancer=kind, cp_world_size=W, batch_size=B)
    per_rank = MODEL.shard_costs(shard_metrics(np.concatenate([[0], np.cumsum(lens)]), kind, W))
    step = work.step_work(np.arange(B))
    exact = kind != "llama3" or (W % B == 0 and S % (W // B) == 0)
    # zig_zag and ulysses: every rank does 1/W; llama3 with slices inside rows: the costliest one
    assert work.combine == ("max" if kind == "llama3" and exact else "sum")
    if exact:
        assert step == pytest.approx(per_rank.max(), rel=1e-12)
    else:  # llama3 with slices across rows: the estimate is the ranks' mean
        assert step == pytest.approx(per_rank.mean(), rel=1e-12)
    assert MODEL.row_costs(lens, offsets).sum() == pytest.approx(
        MODEL.cost(S * B, causal_pairs(lens).sum()), rel=1e-12
    )


def test_llama3_with_reordered_documents_is_estimated_by_the_mean():
    lens, offsets = np.array([7, 1, 8]), np.array([0, 2, 3])
    plain = row_work(MODEL, lens, offsets, load_balancer="llama3", cp_world_size=2, batch_size=1)
    reordered = row_work(MODEL, lens, offsets, load_balancer="llama3", cp_world_size=2, batch_size=1,
                         reorder_documents=True)
    assert plain.combine == "max" and reordered.combine == "sum"
    # row 0 = [7, 1] sliced in two: [0, 4) of the 7 and [4, 7) + the 1
    assert plain.work[0] == pytest.approx(MODEL.cost(4, 28 - 10 + 1), rel=1e-12)  # tri(7) - tri(4) + tri(1)
    assert reordered.work[0] == pytest.approx(MODEL.cost(8, 28 + 1) / 2, rel=1e-12)
