"""Shared test helpers: real-data lookup that skips (or fails in CI) when data is absent."""

import os
from pathlib import Path

import pytest


def require_data(relpath: str) -> Path:
    """The path of a benchmark data file; skips (or fails when RETROACT_REQUIRE_DATA=1) if absent."""
    from retroact.paths import data_root

    path = data_root() / relpath
    if not path.exists():
        reason = f"benchmark data {relpath} not found under {data_root()} (set RETROACT_DATA)"
        if os.environ.get("RETROACT_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
