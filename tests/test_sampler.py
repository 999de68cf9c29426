"""The global sampler: exactly-once epochs, balanced steps, and a state that resumes on any topology."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_data.loader import DataParallelSampler
from cp_data.loader.balance import _rounds, balanced_assignment, least_busiest, strided_assignment, window_objective
from cp_data.loader.state import Consumed
from cp_data.work import RowWork

REPO = Path(__file__).resolve().parents[1]


def lockstep(samplers, stop=None):
    """Steps of all dp ranks together until the epoch ends (on every rank at once) or ``stop`` steps."""
    steps, left, iterators = [], len(samplers[0]), [iter(s) for s in samplers]
    while len(steps) != stop:
        step = [next(it, None) for it in iterators]
        if None in step:
            assert step == [None] * len(step), "dp ranks disagree on the number of steps"
            break
        steps.append(tuple(step))
        assert len(steps) <= left, f"more steps than the {left} the sampler announced"
    return steps


def make(n, dp, batch_size, work=None, lookahead=1, **kwargs):
    return [DataParallelSampler(n, dp_rank=r, dp_world_size=dp, batch_size=batch_size, row_work=work,
                                lookahead=lookahead, **kwargs) for r in range(dp)]


works = st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=60).map(np.array)


@given(works, st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans(),
       st.sampled_from(["sum", "max"]))
def test_every_sample_once_per_epoch_and_batch_size_rows_per_rank(work, dp, B, lookahead, balance, drop_last, combine):
    n = len(work)
    row_work = RowWork(work, combine) if balance else None
    samplers = make(n, dp, B, row_work, lookahead, drop_last=drop_last)
    steps = lockstep(samplers)
    assert len(steps) == len(samplers[0]) if steps else True
    seen = [i for step in steps for rows in step for i in rows]
    full, tail = divmod(n, dp * B)
    assert all(len(rows) == B for step in steps[:full] for rows in step)
    if drop_last or not tail:
        assert len(steps) == full and len(seen) == len(set(seen)) == full * dp * B
    else:  # the last step repeats the order's first samples so that every rank gets the same count
        assert [len(rows) for rows in steps[-1]] == [-(-tail // dp)] * dp
        assert sorted(set(seen)) == list(range(n)) and len(seen) - n == -tail % dp
        repeated = collections.Counter(seen) - collections.Counter(range(n))
        # the order's first samples, as DistributedSampler repeats them
        assert sorted(repeated.elements()) == sorted(np.resize(samplers[0].order(0), -tail % dp).tolist())
    # every rank stays in the same epoch; the next pass is the next epoch
    assert {s.epoch for s in samplers} == {1}


def test_unbalanced_steps_are_the_distributed_sampler_split():
    samplers = make(10, 2, 2, shuffle=False)
    assert lockstep(samplers) == [([0, 2], [1, 3]), ([4, 6], [5, 7])]


@given(st.integers(1, 80), st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3),
                                              st.booleans(), st.integers(0, 4)), min_size=1, max_size=4),
       st.integers(0, 2**32 - 1))
def test_topology_changes_at_random_steps_consume_the_epoch_exactly_once(n, segments, seed):
    """(dp, batch_size, lookahead, balanced) -> another at random steps, the state saved by dp rank 0."""
    work = RowWork(np.random.default_rng(seed).lognormal(0, 1, n))
    seen, state, last_step = [], None, None
    for dp, B, lookahead, balance, stop in segments:
        samplers = make(n, dp, B, work if balance else None, lookahead, seed=3)
        last_step = dp * B
        if state is not None:
            for s in samplers:
                s.load_state_dict(json.loads(json.dumps(state)))  # JSON-safe
            if samplers[0].epoch == 1:  # what is left cannot fill one global batch of this layout
                break
        steps = lockstep(samplers, stop or None)
        seen += [i for step in steps for rows in step for i in rows]
        states = [s.state_dict() for s in samplers]
        assert all(st_ == states[0] for st_ in states)  # the same on every rank
        state = states[0]
        if state["epoch"] == 1:
            break
    assert len(seen) == len(set(seen))
    if samplers[0].epoch == 1:  # the epoch ended: only a tail smaller than the last global batch is left
        assert n - last_step < len(seen) <= n
    else:
        assert state["samples_consumed"] == len(seen)
        rest = make(n, 1, 1, seed=3)
        rest[0].load_state_dict(state)
        assert sorted(seen + [i for step in lockstep(rest) for i in step[0]]) == list(range(n))


@given(works, st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.integers(1, 6))
def test_resume_on_the_same_layout_is_bit_exact(work, dp, B, lookahead, balance, stop):
    n = len(work)
    row_work = RowWork(work) if balance else None
    plain = make(n, dp, B, row_work, lookahead, seed=9)
    epochs = [lockstep(plain), lockstep(plain)]
    first = make(n, dp, B, row_work, lookahead, seed=9)
    head = lockstep(first, stop)
    again = make(n, dp, B, row_work, lookahead, seed=9)
    for s in again:
        s.load_state_dict(first[0].state_dict())
    # a state taken after the epoch's last step starts the next epoch
    assert head + lockstep(again) == (epochs[0] if len(head) < len(epochs[0]) else epochs[0] + epochs[1])


def test_state_is_small_json_and_names_what_differs():
    work = RowWork(np.random.default_rng(0).random(100))
    s = DataParallelSampler(100, dp_rank=0, dp_world_size=4, batch_size=2, row_work=work, lookahead=3,
                            fingerprint=dict(row_lengths="abc", packing=None))
    next(iter(s))
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state and len(json.dumps(state)) < 600
    assert state["samples_consumed"] == 8 and state["window"]["steps_done"] == 1
    other = DataParallelSampler(100, dp_rank=0, dp_world_size=4, seed=1, fingerprint=dict(row_lengths="abd"))
    with pytest.raises(ValueError, match='seed: 0 in the state, 1 here; row_lengths: "abc" in the state, "abd" here'):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples: 100 in the state, 99 here"):
        DataParallelSampler(99, dp_rank=0, dp_world_size=1).load_state_dict(state)
    bad = [
        ({**state, "epoch": -1}, "epoch must be an int >= 0, got -1"),
        ({**state, "samples_consumed": 9}, "samples_consumed=9 but 'consumed' holds 8 places"),
        ({**state, "consumed": {"prefix": 0, "beyond": "zz"}}, "'consumed' must be"),
        ({**state, "window": {**state["window"], "batch_size": 0}}, "window must hold ints >= 1"),
        ({**state, "consumed": {"prefix": 101, "beyond": "0"}, "samples_consumed": 101}, "beyond the 100 samples"),
    ]
    for broken, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            DataParallelSampler(100, dp_rank=0, dp_world_size=4, batch_size=2, row_work=work).load_state_dict(broken)
    # the same layout but other row work: the window cannot be continued
    with pytest.raises(ValueError, match="its window does not lead to its consumed samples"):
        forged = {**state, "window": {**state["window"], "balance": None, "lookahead": 1}}
        DataParallelSampler(100, dp_rank=0, dp_world_size=4, batch_size=2).load_state_dict(forged)


@given(st.lists(st.sets(st.integers(0, 70), max_size=20), min_size=1, max_size=5), st.integers(0, 80))
def test_consumed_places_behave_as_a_set(batches, count):
    consumed, model = Consumed(), set()
    for places in batches:
        consumed = consumed.add(np.array(sorted(places), dtype=np.int64))
        model |= places
        assert consumed.count == len(model)
        assert not consumed.beyond & 1 and consumed.prefix not in model
        free = [p for p in range(75) if p not in model]
        assert consumed.free(count, 75).tolist() == free[:count]
        assert Consumed.from_json(json.loads(json.dumps(consumed.to_json())), "x") == consumed


@given(works, st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.sampled_from(["sum", "max"]))
def test_balanced_assignment_is_a_partition_never_slower_than_the_plain_split(work, dp, B, steps, combine):
    n = steps * dp * B
    work = RowWork(np.resize(work, n), combine)
    got = balanced_assignment(work, dp, B, steps)
    assert got.shape == (steps, dp, B) and sorted(got.ravel().tolist()) == list(range(n))
    assert (np.diff(got, axis=2) > 0).all()  # each rank's rows in window order
    assert window_objective(got, work) <= window_objective(strided_assignment(steps, dp, B), work)


@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=2, max_size=40, unique=True))
def test_lpt_rounds_pair_the_heaviest_rows_with_the_lightest(values):
    """With two rows per rank, LPT in rounds is the optimal pairing: i-th heaviest with i-th lightest."""
    work = RowWork(np.array(values[: len(values) // 2 * 2]))
    dp = work.work.size // 2
    heaviest = np.argsort(-work.work, kind="stable")
    pairs = {frozenset(p) for p in _rounds(heaviest, work, dp).tolist()}
    assert pairs == {frozenset((heaviest[i], heaviest[-1 - i])) for i in range(dp)}


def best_split(work, dp, B):
    """The least busiest-rank work over every split of the rows into dp groups of B (exhaustive)."""
    best = np.inf
    rows = list(range(len(work)))

    def place(left, loads):
        nonlocal best
        if max(loads, default=0) >= best:
            return
        if not left:
            best = max(loads)
            return
        for rest in itertools.combinations(left[1:], B - 1):
            group = (left[0], *rest)
            place([r for r in left if r not in group], loads + [work[list(group)].sum()])

    place(rows, [])
    return best


@given(st.integers(2, 3), st.integers(2, 3), st.data())
def test_balanced_assignment_is_close_to_the_exhaustive_optimum(dp, B, data):
    work = np.array(data.draw(st.lists(st.integers(1, 1000), min_size=dp * B, max_size=dp * B)), dtype=float)
    got = RowWork(work).step_work(balanced_assignment(RowWork(work), dp, B)[0]).max()
    best = best_split(work, dp, B)
    assert least_busiest(work, B, dp) <= best  # a bound: no split beats it
    # Worst of 3000 examples: 1.071, e.g. [1, 1, 1, 39, 100, 119, 128, 147, 246] at dp=B=3 (286 vs 267:
    # the heaviest rank must take two of the 1s, a three-way exchange that no single swap finds).
    assert got <= 1.08 * best


def test_the_assignment_is_the_same_in_another_process():
    code = (
        "import json, numpy as np; from cp_data.loader import DataParallelSampler; from cp_data.work import RowWork;"
        "w = RowWork(np.random.default_rng(5).lognormal(0, 1, 300));"
        "s = DataParallelSampler(300, dp_rank=0, dp_world_size=8, batch_size=4, row_work=w, lookahead=2, seed=11);"
        "print(json.dumps([i.tolist() for i, _ in s.global_steps()]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    w = RowWork(np.random.default_rng(5).lognormal(0, 1, 300))
    here = DataParallelSampler(300, dp_rank=0, dp_world_size=8, batch_size=4, row_work=w, lookahead=2, seed=11)
    assert json.loads(out.stdout) == [i.tolist() for i, _ in here.global_steps()]
