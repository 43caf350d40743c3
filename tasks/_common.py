"""What the stage tasks share: the retry policy of I/O tasks, and stage accounting."""

from __future__ import annotations

import threading
import time
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run
from pydantic import BaseModel

from skyferry.config import get_settings
from skyferry.errors import is_transient
from skyferry.pipeline import RunContext

__all__ = ["finish", "io_task", "retry_transient", "with_retries"]

R = TypeVar("R", bound=BaseModel)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that may pass (timeouts, unavailable nodes), never bad input."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def io_task(name: str) -> Any:
    """``@task`` for a stage that does I/O: only transient errors are retried.

    Its retries come from the settings when it is called, through :func:`with_retries`.
    Arguments arrive as in-process references, so there is no input caching.
    """
    return task(name=name, retry_condition_fn=retry_transient, cache_policy=NONE)


_configured: dict[tuple[int, tuple[float, ...]], Any] = {}
_configured_lock = threading.Lock()


def with_retries(io: Any) -> Any:
    """``io`` with the backoff of the current settings (``SKYFERRY_RETRY_DELAYS``), read
    now, not when the task was defined."""
    delays = tuple(get_settings().retry_delays)
    key = (id(io), delays)
    with _configured_lock:
        if key not in _configured:
            _configured[key] = io.with_options(retries=len(delays),
                                               retry_delay_seconds=list(delays))
        return _configured[key]


def finish(ctx: RunContext, stage: str, record: R, started: float, nbytes: int) -> R:
    """Record a finished item of ``stage`` (bytes, busy time, retries) and stamp its attempts."""
    attempts = int(task_run.run_count or 1)
    ctx.recorder.record(stage, nbytes=nbytes, seconds=time.perf_counter() - started,
                        attempts=attempts)
    return record.model_copy(update={"attempts": attempts})
