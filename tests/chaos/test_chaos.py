"""The chaos suite: faults while a run writes, then repair, then the set checker.

The full suite is marked ``chaos`` (``make chaos`` prints its table); the default test run
takes a shorter version: a clean run, a full disk and corruption (see harness.SHORT).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import SCENARIOS, SHORT, ChaosEnv, Outcome, render, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.clouds,
              pytest.mark.usefixtures("prefect_harness")]

DETECTED = {"1 server SIGKILLed", "2 server hangs, then resumes", "4 node flaps",
            "5 disk full"}


@pytest.fixture(scope="module")
def env(servers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[ChaosEnv]:
    chaos = ChaosEnv(servers, tmp_path_factory.mktemp("chaos"))
    try:
        yield chaos
    finally:
        chaos.close()


def _assert_safe(outcome: Outcome) -> None:
    assert (outcome.lost, outcome.unexpected, outcome.under_replicated) == (0, 0, 0), \
        render([outcome])
    if outcome.name in DETECTED:
        assert outcome.detection_s is not None and outcome.detection_s < 5, render([outcome])


@pytest.mark.parametrize("name", SHORT)
def test_short_chaos(env: ChaosEnv, name: str) -> None:
    outcome = run_scenario(env, name)
    assert outcome.outcome == "committed", render([outcome])
    _assert_safe(outcome)


@pytest.mark.chaos
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in SHORT])
def test_chaos(env: ChaosEnv, name: str, home: Path) -> None:
    outcome = run_scenario(env, name)
    expected = "refused" if name.startswith("9") else "committed"
    assert outcome.outcome == expected, render([outcome])
    _assert_safe(outcome)
    if name.startswith("3"):  # a slow node, chunks queued at it or not: busy, never down
        assert outcome.detection_s is not None, render([outcome])
        assert not any("reported down" in note for note in outcome.notes), render([outcome])
