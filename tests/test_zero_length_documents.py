"""Zero-length documents (repeated ``cu_doc_lens`` values) change no figure of an inspection."""

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from cp_data.inspect import REORDERED, compare_balancers

FIGURES = ("tokens", "padding", "documents", "work", "padding_work")


def cumulative(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


@given(
    st.lists(st.integers(0, 23) | st.just(0), min_size=1, max_size=9),
    st.integers(1, 4),
    st.sampled_from([None, 1, 3]),
)
@example([0, 0], 2, None)  # all documents empty
@example([0, 0, 0], 3, None)
@example([0, 5, 0, 0, 7, 0], 2, 1)
def test_compare_balancers_with_zero_length_documents(lengths, world, factor):
    multiple = None if factor is None else factor * world  # a multiple every balancer accepts
    got = compare_balancers(cumulative(lengths), world, length_multiple=multiple)
    assert list(got.metrics) == ["zig_zag", "llama3", "ulysses", REORDERED]
    nonzero = [n for n in lengths if n]
    if not nonzero:  # nothing to hold, pad or compute on any rank
        for m in got.metrics.values():
            assert all(getattr(m, f).tolist() == [0] * world for f in FIGURES)
        return
    # The same row without its empty documents: every balancer and the reordering agree on it.
    want = compare_balancers(cumulative(nonzero), world, length_multiple=multiple)
    for name, m in got.metrics.items():
        for f in FIGURES:
            assert getattr(m, f).tolist() == getattr(want.metrics[name], f).tolist(), (name, f)
    assert got.metrics[REORDERED].work.sum() == got.metrics["llama3"].work.sum()
