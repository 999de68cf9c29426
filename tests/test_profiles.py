"""The hypothesis profiles: CI is deterministic, and every property test follows the profile."""

import re
from pathlib import Path

from hypothesis import settings

from hypothesis_profiles import few_examples, many_examples, process_examples

TESTS = Path(__file__).resolve().parent


def test_ci_profile_is_derandomised_without_a_database():
    ci = settings.get_profile("ci")
    assert ci.derandomize is True and ci.database is None
    thorough = settings.get_profile("thorough")
    assert thorough.derandomize is False and thorough.database is not None
    assert thorough.max_examples == 10 * ci.max_examples


def test_tiers_scale_with_the_active_profile():
    active = settings.default
    assert few_examples.max_examples == max(2, active.max_examples // 4)
    assert many_examples.max_examples == 2 * active.max_examples
    assert process_examples.max_examples == max(2, active.max_examples // 12)
    for tier in (few_examples, many_examples, process_examples):
        assert (tier.derandomize, tier.database) == (active.derandomize, active.database)


def test_no_test_pins_its_own_example_count():
    # An explicit max_examples would keep the thorough profile away from that test.
    pinned = [
        f"{path.name}:{n}"
        for path in sorted(TESTS.glob("test_*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"max_examples\s*=[^=]", line)
    ]
    assert pinned == []
