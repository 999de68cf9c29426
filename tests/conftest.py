"""Loads the hypothesis profile named by ``HYPOTHESIS_PROFILE`` (see ``hypothesis_profiles.py``)."""

import hypothesis_profiles  # noqa: F401  (registers the profiles and loads the active one)
