"""Hypothesis profiles: a deterministic one for CI, a thorough random search for developers.

Pick one with ``HYPOTHESIS_PROFILE`` (default ``ci``):

- ``ci``: derandomised examples and no example database, so one commit gives the same result on
  every machine and every run (a failure found once is not replayed from a local ``.hypothesis/``).
- ``thorough``: random examples, ten times as many, and the local example database, so a failure
  found once is tried first from then on. What developers run before sending a change.
- ``quick``: a few derandomised examples, for iterating on one test file.
- ``mutation``: the ``ci`` examples without shrinking a failure (``tests/mutation.py`` only asks
  whether CI would fail).

Tests never set ``max_examples`` themselves (that would pin them to one size under every
profile). A test whose examples are costly takes ``@few_examples`` (a quarter of the active
profile's count), ``@process_examples`` when each example starts processes (a twelfth); one
whose examples are cheap enough to afford more takes ``@many_examples`` (twice as many).
``tests/conftest.py`` imports this module, so the profile is loaded before
any test; a test module that uses the tiers imports them from here, which also works in the
processes that the distributed tests spawn.
"""

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("quick", max_examples=10, derandomize=True, database=None, **_COMMON)
settings.register_profile(
    "thorough",
    max_examples=1000,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    **_COMMON,
)
settings.register_profile(
    "mutation", settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

few_examples = settings(max_examples=max(2, settings.default.max_examples // 4))
"""For tests whose every example is costly (many torch ops, a dataset built, an exhaustive search)."""
process_examples = settings(max_examples=max(2, settings.default.max_examples // 12))
"""For tests whose every example starts processes (DataLoader workers, gloo groups)."""
many_examples = settings(max_examples=2 * settings.default.max_examples)
"""For cheap vectorised properties that can afford a wider search."""
