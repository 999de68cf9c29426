"""One spawn of 4 gloo processes for all the distributed attention tests.

On a 2-core machine, starting the processes and importing torch and transformers costs more
than the cases themselves, so ``test_attention_dist.py`` and ``test_hf_cp.py`` share one launch:
each module's fixture takes its part of :func:`results`, and the first to ask runs everything.
"""

from __future__ import annotations

import importlib.util
from functools import cache

from cp_data.attention.launch import run_gloo

WORLD_SIZE = 4
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _worker(rank: int, world: int) -> dict:
    import test_attention_dist

    results = dict(attention=test_attention_dist.worker(rank, world))
    if HAS_TRANSFORMERS:
        import test_hf_cp

        results["hf"] = test_hf_cp.worker(rank, world)
    return results


@cache
def results() -> list[dict]:
    """Every rank's results of every distributed test module (one launch per test session)."""
    return run_gloo(_worker, WORLD_SIZE, timeout=900)
