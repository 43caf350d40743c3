"""The I/O tasks take their retry policy from the settings when they are called."""

from __future__ import annotations

import pytest

from skyferry.config import get_settings
from tasks._common import with_retries
from tasks.move import move_chunk


@pytest.mark.parametrize("delays, jitter", [([0.5], "0"), ([1.0, 2.0, 4.0], "0.5")])
def test_retries_follow_the_settings_of_the_moment(delays: list[float], jitter: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFERRY_RETRY_DELAYS", str(delays))
    monkeypatch.setenv("SKYFERRY_RETRY_JITTER", jitter)
    get_settings.cache_clear()
    try:
        configured = with_retries(move_chunk)
        assert configured.retries == len(delays)
        assert configured.retry_delay_seconds == delays
        assert configured.retry_jitter_factor == (float(jitter) or None)
        assert configured.name == "move-chunk"
        assert configured.retry_condition_fn is move_chunk.retry_condition_fn
    finally:
        get_settings.cache_clear()
