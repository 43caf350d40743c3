"""The task runner of the stage tasks: threads by default, or Dask (``SKYFERRY_TASK_RUNNER``)."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from skyferry.config import Settings
from skyferry.errors import ConfigError

__all__ = ["make_task_runner"]


def make_task_runner(settings: Settings) -> Any:
    """A fresh task runner for one flow run, as ``settings`` asks."""
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError("SKYFERRY_TASK_RUNNER=dask needs the dask extra: "
                          "pip install 'skyferry[dask]'") from exc
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # Threads in one process: the stage tasks share the run's in-memory context.
    return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "processes": False,
                                          "threads_per_worker": settings.max_workers})
