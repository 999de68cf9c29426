"""Hypothesis profiles: a deterministic one for CI, a thorough random search for developers.

Pick one with ``HYPOTHESIS_PROFILE`` (default ``ci``):

- ``ci``: derandomised examples and no example database, so one commit gives the same result on
  every machine and every run (a failure found once is not replayed from a local ``.hypothesis/``).
- ``thorough``: random examples, ten times as many, and the local example database, so a failure
  found once is tried first from then on. What developers run before sending a change.
- ``quick``: a few derandomised examples, for iterating on one test file.

Tests never set ``max_examples`` themselves (that would pin them to one size under every
profile); a test whose examples are costly, or so cheap that it can afford more, takes the
matching tier of the active profile: ``@settings(settings.get_profile("few"))`` (a quarter of the
examples) or ``@settings(settings.get_profile("many"))`` (three times as many).
"""

import os

from hypothesis import HealthCheck, settings
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

TIERS = {"few": 0.25, "many": 3.0}
"""Example-count factors of the per-test tiers, relative to the active profile."""

_active = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
for _tier, _factor in TIERS.items():
    settings.register_profile(_tier, _active, max_examples=max(2, round(_active.max_examples * _factor)))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
