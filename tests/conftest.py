"""Shared fixtures: one Prefect test harness per session, and an isolated data directory."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))  # test-only modules: data builders, faults, transforms

# Before any task module is imported: short retry backoff, quiet Prefect.
os.environ.setdefault("SKYFERRY_RETRY_DELAYS", "[0.05, 0.05]")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from skyferry.config import get_settings  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty SKYFERRY_HOME: the default topology's nodes and catalog live here."""
    root = tmp_path / "home"
    monkeypatch.setenv("SKYFERRY_HOME", str(root))
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


@pytest.fixture
def helpers_on_path() -> Path:
    """tests/helpers is importable, so transforms can be named as module:function."""
    return HELPERS
