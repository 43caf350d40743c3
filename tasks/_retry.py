"""Retry policy shared by the I/O tasks: only transient errors are retried."""

from __future__ import annotations

from typing import Any

from skyferry.config import get_settings
from skyferry.errors import is_transient

__all__ = ["retry_delays", "retry_transient"]


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def retry_delays() -> list[float]:
    return list(get_settings().retry_delays)
