"""Balance-aware llama3 document order: a permutation that lowers the busiest rank's work."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cp_data import PAD, RingAttentionLoadBalancerType
from cp_data.balancers.ordering import _check, llama3_balanced_order, llama3_rank_work
from cp_data.balancers.pairs import busiest_rank_bound, fill_work_bound
from cp_data.bench.ordering import MIXES, sample_rows, work_lower_bound
from hypothesis_profiles import few_examples


def brute_force_work(doc_lens, world, length_multiple=None):
    """Pairs each llama3 rank computes, counted token by token from the balancer's own plans."""
    cu = torch.tensor([0, *np.cumsum(doc_lens).tolist()], dtype=torch.int64)
    doc_start = {}
    for d, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        for pos in range(a, b):
            doc_start[pos] = a
    balancer = RingAttentionLoadBalancerType.llama3.create(cp_rank=0, cp_world_size=world)
    plans = balancer.plan_all_ranks(int(cu[-1]), cu, length_multiple=length_multiple)
    return [sum(pos - doc_start[pos] + 1 for pos in plan.index.tolist() if pos != PAD) for plan in plans]


def realistic_row(rng, seq_len=8192, median=300.0, sigma=0.8):
    lens, total = [], 0
    while total < seq_len:
        d = int(np.clip(rng.lognormal(np.log(median), sigma), 1, seq_len - total))
        lens.append(d)
        total += d
    return np.array(lens)


def imbalance(works):
    return works.max() / works.mean()


doc_lens_st = st.lists(st.integers(0, 60), min_size=0, max_size=25).map(np.array)


@given(doc_lens_st, st.integers(1, 6), st.sampled_from([None, 1, 2, 3, 8]))
def test_work_matches_brute_force(lens, world, multiple):
    lens = lens[lens > 0] if lens.size else lens
    if lens.size == 0:
        return
    assert llama3_rank_work(lens, world, multiple).tolist() == brute_force_work(lens, world, multiple)


@given(doc_lens_st, st.integers(1, 6), st.sampled_from([None, 1, 4]))
def test_permutation_never_worse(lens, world, multiple):
    perm = llama3_balanced_order(lens, world, multiple)
    assert perm.dtype == np.int64
    assert sorted(perm.tolist()) == list(range(lens.size))
    before = llama3_rank_work(lens, world, multiple)
    after = llama3_rank_work(lens[perm], world, multiple)
    assert after.sum() == pytest.approx(before.sum())
    assert after.max() <= before.max() * (1 + 1e-12)


@few_examples  # each example orders three 2048-token rows
@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 4, 8]))
def test_lowers_imbalance_on_random_mixes(seed, world):
    rng = np.random.default_rng(seed)
    rows = [realistic_row(rng, seq_len=2048, median=60, sigma=1.0) for _ in range(3)]
    before = np.mean([imbalance(llama3_rank_work(r, world)) for r in rows])
    after = np.mean([imbalance(llama3_rank_work(r[llama3_balanced_order(r, world)], world)) for r in rows])
    assert after < before


def test_near_the_lower_bound_on_realistic_mixes():
    """What the order achieves on 8192-token rows of lognormal documents (median 300), W=4.

    The claim is relative to the bound no order beats: measured over 300 rows, the busiest rank
    is 1.0096x the bound on average and at most 1.047x. The README's 1.10 max/mean target is a
    property of the mix as much as of the order: samples of 40 rows give 1.045-1.107 (mean 1.077
    over 1200 rows) because the bound itself reaches 1.095, so the absolute check is that honest
    bound, over rows from many seeds rather than one.
    """
    rows = [realistic_row(np.random.default_rng(seed)) for seed in range(40)]
    before, after, to_bound = [], [], []
    for lens in rows:
        works = llama3_rank_work(lens, 4)
        ordered = llama3_rank_work(lens[llama3_balanced_order(lens, 4)], 4)
        before.append(imbalance(works))
        after.append(imbalance(ordered))
        to_bound.append(ordered.max() / work_lower_bound(lens, 4))
    assert np.mean(before) > 1.4
    assert max(to_bound) <= 1.06 and np.mean(to_bound) <= 1.02
    assert np.mean(after) <= 1.12


@pytest.mark.parametrize("world", [2, 3, 4])
def test_close_to_exhaustive_optimum_on_small_rows(world):
    rng = np.random.default_rng(world)
    ratios = []
    for _ in range(30):
        lens = np.clip(
            rng.lognormal(np.log(200), 1.0, size=int(rng.integers(1, 7))).astype(np.int64), 1, None
        )
        best = min(
            llama3_rank_work(lens[list(p)], world).max() for p in itertools.permutations(range(lens.size))
        )
        # The benchmark's lower bound must hold for every order, the best included.
        assert work_lower_bound(lens, world) <= best * (1 + 1e-12)
        ratios.append(llama3_rank_work(lens[llama3_balanced_order(lens, world)], world).max() / best)
    assert min(ratios) >= 1 - 1e-12
    assert np.mean(ratios) <= 1.005
    assert max(ratios) <= 1.05


@pytest.mark.parametrize("world", [3, 4])
def test_lower_bound_holds_with_one_long_document(world):
    # The window part of the bound binds here: one long document among short ones.
    rng = np.random.default_rng(10 + world)
    above_mean = 0
    for _ in range(8):
        lens = np.append(rng.integers(5, 60, size=5), rng.integers(150, 400))
        best = min(
            llama3_rank_work(lens[list(p)], world).max() for p in itertools.permutations(range(lens.size))
        )
        bound = work_lower_bound(lens, world)
        assert bound <= best * (1 + 1e-12)
        above_mean += bound > llama3_rank_work(lens, world).mean() * 1.01
    assert above_mean >= 4


def test_deterministic_and_keeps_documents_whole():
    rng = np.random.default_rng(3)
    lens = realistic_row(rng, seq_len=4096, median=100)
    perm = llama3_balanced_order(lens, 4)
    assert np.array_equal(perm, llama3_balanced_order(lens.copy(), 4))
    # Rebuild the row from the new order: every document's tokens stay contiguous and in order.
    tokens = np.arange(lens.sum())
    docs = np.split(tokens, np.cumsum(lens)[:-1])
    reordered = np.concatenate([docs[i] for i in perm])
    assert sorted(reordered.tolist()) == tokens.tolist()
    assert all(
        np.array_equal(part, docs[i])
        for part, i in zip(np.split(reordered, np.cumsum(lens[perm])[:-1]), perm)
    )


def test_example_long_tail_document_moves_off_last_rank():
    lens = np.array([100] * 12 + [800])  # 2000 tokens, W=2: the long document ends the row
    before = llama3_rank_work(lens, 2)
    after = llama3_rank_work(lens[llama3_balanced_order(lens, 2)], 2)
    assert imbalance(before) > 1.5
    assert imbalance(after) < 1.06  # 1.052 is optimal: only one document can cross the cut


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.ones((2, 2), dtype=np.int64), 2), "1-D"),
        ((np.array([3, -1]), 2), "-1"),
        ((np.array([1.5, 2.0]), 2), "integers"),
        ((np.array([1, 2]), 0), "cp_world_size"),
        ((np.array([1, 2]), 2, 0), "length_multiple"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        llama3_balanced_order(*args)


@given(st.lists(st.integers(1, 7), min_size=0, max_size=4), st.integers(0, 30))
def test_fill_work_bound_is_the_least_work_of_pieces(lens, max_tokens):
    """f[c] = least total work of pieces (x_i <= d_i tokens of document i) holding c tokens."""
    f = fill_work_bound(np.array(lens, dtype=np.int64), max_tokens)
    for c in range(max_tokens + 1):
        costs = [
            sum(x * (x + 1) / 2 for x in pieces)
            for pieces in itertools.product(*(range(d + 1) for d in lens))
            if sum(pieces) == c
        ]
        assert f[c] == (min(costs) if costs else sum(d * (d + 1) / 2 for d in lens))


@few_examples
@given(
    st.lists(st.integers(1, 300), min_size=2, max_size=6).map(np.array),
    st.integers(2, 5),
    st.sampled_from([None, 1, 3, 8]),
)
def test_busiest_rank_bound_holds_for_every_order(lens, world, multiple):
    best = min(llama3_rank_work(lens[list(p)], world, multiple).max() for p in itertools.permutations(range(lens.size)))
    assert busiest_rank_bound(*_check(lens, world, multiple)) <= best * (1 + 1e-12)


def test_p90_within_5_percent_of_the_bound_on_flattened_batches():
    """Batches of 4 rows (as the collator flattens them) at W=8, over the benchmark's mixes."""
    gaps = []
    for seed in range(24):
        median, sigma = list(MIXES.values())[seed % len(MIXES)]
        lens = np.concatenate(sample_rows(4, 2048, median / 4, sigma, seed))
        perm = llama3_balanced_order(lens, 8)
        assert sorted(perm.tolist()) == list(range(lens.size))
        gaps.append(llama3_rank_work(lens[perm], 8).max() / work_lower_bound(lens, 8))
    assert min(gaps) >= 1 - 1e-12
    assert np.quantile(gaps, 0.9) <= 1.05


def test_a_pure_function_of_its_inputs():
    rng = np.random.default_rng(5)
    rows = [realistic_row(rng, seq_len=4096, median=m) for m in (60, 300)]
    first = [llama3_balanced_order(r, 4) for r in rows]
    copies = [r.copy() for r in rows]
    # Interleaved calls, list input, another world size in between: same answers, inputs intact.
    llama3_balanced_order(rows[1], 8)
    assert np.array_equal(llama3_balanced_order(rows[0].tolist(), 4), first[0])
    assert np.array_equal(llama3_balanced_order(rows[1], 4), first[1])
    assert all(np.array_equal(r, c) for r, c in zip(rows, copies))


@pytest.mark.parametrize("lens", [[0, 0], [0, 0, 0], [0, 5], [5, 0, 0]])
def test_zero_length_documents_alone_or_with_one_document(lens):
    perm = llama3_balanced_order(np.array(lens), 4)
    assert sorted(perm.tolist()) == list(range(len(lens)))
