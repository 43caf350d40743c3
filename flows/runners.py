"""The task runner of the stage tasks: threads by default, or Dask (``SKYFERRY_TASK_RUNNER``)."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from skyferry.config import Settings
from skyferry.errors import ConfigError

__all__ = ["make_task_runner", "uses_processes"]


def make_task_runner(settings: Settings, api_url: str | None = None) -> Any:
    """A fresh task runner for the chunk tasks of one run, as ``settings`` asks.

    ``threads``: each stage is a task, sharing the run's in-memory context. ``dask``: the
    fused ``move-chunk`` task runs on Dask worker processes (a local cluster of one process
    per core, or the scheduler at ``SKYFERRY_DASK_ADDRESS``).

    ``api_url`` is the Prefect API the local cluster's workers report to. Without it, on the
    ephemeral API, every worker process would start a temporary API server of its own.
    """
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError("SKYFERRY_TASK_RUNNER=dask needs the dask extra: "
                          "pip install 'skyferry[dask]'") from exc
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # loopback only: the scheduler, the workers and the dashboard (on a free port)
    cluster: dict[str, Any] = {"n_workers": settings.max_workers, "threads_per_worker": 1,
                               "processes": True, "host": "127.0.0.1",
                               "dashboard_address": "127.0.0.1:0"}
    if api_url:
        cluster["env"] = {"PREFECT_API_URL": api_url}
    return DaskTaskRunner(cluster_kwargs=cluster)


def uses_processes(settings: Settings) -> bool:
    """Whether chunk tasks may run in another process (and so must be fused)."""
    return settings.task_runner != "threads"
