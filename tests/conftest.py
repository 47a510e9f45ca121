"""Shared pytest configuration: Hypothesis profiles.

Profiles (select with the environment variable ``FUSEC_HYPOTHESIS_PROFILE``, default ``ci``):

* ``ci``: 25 examples per property, no deadline, derandomized: the same examples on every run, so
  a red CI is reproducible and never an unlucky seed.
* ``deep``: 400 examples per property, no deadline, random seeds, for device runs and occasional
  thorough runs that explore beyond the CI examples.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("deep", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("FUSEC_HYPOTHESIS_PROFILE", "ci"))
