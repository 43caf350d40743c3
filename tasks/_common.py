"""What the tasks share: the retry policy of I/O tasks, and the attempt number."""

from __future__ import annotations

import threading
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from skyferry.config import get_settings
from skyferry.errors import is_transient

__all__ = ["attempt", "io_task", "retry_transient", "with_retries"]


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that may pass (timeouts, unavailable nodes), never bad input."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def io_task(name: str) -> Any:
    """``@task`` for a step that does I/O: only transient errors are retried.

    Its retries come from the settings when it is called, through :func:`with_retries`.
    Arguments arrive as in-process references, so there is no input caching.
    """
    return task(name=name, retry_condition_fn=retry_transient, cache_policy=NONE)


_configured: dict[tuple[int, tuple[float, ...], float], Any] = {}
_configured_lock = threading.Lock()


def with_retries(io: Any) -> Any:
    """``io`` with the backoff of the current settings (``SKYFERRY_RETRY_DELAYS``, jittered
    by ``SKYFERRY_RETRY_JITTER``), read now, not when the task was defined."""
    settings = get_settings()
    delays = tuple(settings.retry_delays)
    key = (id(io), delays, settings.retry_jitter)
    with _configured_lock:
        if key not in _configured:
            _configured[key] = io.with_options(
                retries=len(delays), retry_delay_seconds=list(delays),
                retry_jitter_factor=settings.retry_jitter or None)
        return _configured[key]


def attempt() -> int:
    """This task run's attempt: 1, then 2 on its first retry, and so on."""
    return int(task_run.run_count or 1)
