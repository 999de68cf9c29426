"""llama3_balanced_order on rows with zero-length documents (repeated cu_doc_lens values)."""

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from cp_data.balancers.ordering import llama3_balanced_order, llama3_rank_work

# Any lengths with at least one zero among them; all-zero rows included.
zero_containing = st.tuples(
    st.lists(st.integers(0, 60), max_size=12), st.integers(0, 12)
).map(lambda t: np.insert(np.array(t[0], dtype=np.int64), min(t[1], len(t[0])), 0))


@given(zero_containing, st.integers(1, 6), st.sampled_from([None, 1, 4]))
@example(np.array([0, 0]), 2, None)
@example(np.array([0, 0, 0, 0]), 2, None)
@example(np.array([0, 0, 0]), 3, None)
@example(np.array([0, 7, 0]), 2, 4)
def test_zero_length_documents_change_nothing(lens, world, multiple):
    perm = llama3_balanced_order(lens, world, multiple)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(lens.size))
    # Zero-length documents hold no work: the order found is exactly as good as without them.
    real = lens[lens > 0]
    without = llama3_rank_work(real[llama3_balanced_order(real, world, multiple)], world, multiple)
    assert llama3_rank_work(lens[perm], world, multiple).tolist() == without.tolist()
    assert without.max() <= llama3_rank_work(lens, world, multiple).max() * (1 + 1e-12)
