"""Shared test configuration: Hypothesis profiles and small helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci": what CI runs (100 random models per property, Hypothesis's default, deterministic; the
# fuzz profiles of tests/testing/test_fuzz.py run 2,000 more through the same passes);
# "dev": quick local runs; "deep": a long search for a local hunt (HYPOTHESIS_PROFILE=deep).
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session measures into its own latency cache, never the user's."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
