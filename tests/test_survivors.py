"""Bugs that mutation testing planted and the other tests missed (``python tests/mutation.py``).

Each test here fails on one of them: CP-aware packing that pads an aligned document, a shard of
an empty sequence padded with zeros instead of the pad value, and ``unshard`` accepting plans that
cover a position twice. (The others are caught where
they live: attention tolerances in ``test_attention_dist.py``, the DP x CP checks and mesh ranks
in ``test_dp_cp.py``.)
"""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from cp_data import PAD, ShardPlan, unshard
from cp_data.packing import PackingConfig, plan_packing


@given(
    st.lists(st.integers(0, 50), max_size=30),
    st.integers(1, 4),
    st.integers(1, 6),
    st.sampled_from(["bfd", "concat"]),
    st.sampled_from(["split", "truncate"]),
)
@example([8, 16, 5, 24], 2, 2, "bfd", "split")  # exactly S, a multiple below S, one above
def test_cp_multiple_pads_each_document_minimally(lengths, W, k, algorithm, long_docs):
    m, S = 2 * W, 2 * W * k
    plan = plan_packing(lengths, PackingConfig(S, algorithm=algorithm, long_docs=long_docs, cp_multiple=m))
    kept = np.minimum(lengths, S) if long_docs == "truncate" else np.array(lengths, dtype=np.int64)
    n = len(lengths)
    tokens = np.bincount(plan.doc, weights=plan.length, minlength=n).astype(np.int64)
    padding = np.bincount(plan.doc, weights=plan.pad, minlength=n).astype(np.int64)
    assert tokens.tolist() == kept.tolist()
    # a document's padding is exactly what brings it to the next multiple: none when aligned
    assert padding.tolist() == ((-kept) % m).tolist()
    if algorithm == "bfd":  # pieces of S tokens from the start, then the rest: S tokens are one piece
        pieces = np.bincount(plan.doc, minlength=n)
        assert pieces.tolist() == (-(-kept // S)).tolist()


def test_padding_a_shard_of_an_empty_sequence_writes_the_pad_value():
    plan = ShardPlan.from_index(torch.tensor([PAD, PAD, PAD]), 0, 0, 1)
    assert plan.shard(torch.zeros(2, 0, dtype=torch.int64), 1, -7).tolist() == [[-7] * 3] * 2
    assert plan.shard(torch.zeros(0, 2), 0, 0.5).tolist() == [[0.5, 0.5]] * 3


def test_unshard_rejects_plans_that_cover_a_position_twice():
    # Every position is covered, one of them by both ranks: the plans cannot come from a balancer.
    plans = [ShardPlan.from_index(torch.tensor(i), 4, r, 2) for r, i in enumerate([[0, 1, 2], [2, 3, PAD]])]
    shards = [plan.shard(torch.arange(4) * 10, 0, -1) for plan in plans]
    with pytest.raises(ValueError, match=r"exactly once \(e.g. positions \[2\]\)"):
        unshard(shards, plans, 0)
