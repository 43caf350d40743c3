"""The task runner of the chunk tasks: threads by default, or Dask or Ray
(``SKYFERRY_TASK_RUNNER``)."""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from skyferry.config import Settings, get_settings
from skyferry.errors import ConfigError

__all__ = ["SettingsTaskRunner", "make_task_runner", "uses_processes"]


def make_task_runner(settings: Settings, api_env: dict[str, str] | None = None) -> Any:
    """A fresh task runner for the chunk tasks of one run, as ``settings`` asks.

    ``threads``: the tasks share the run's in-memory batch. ``dask``: the
    ``move-chunks-on-worker`` tasks run on Dask worker processes (a local cluster of one
    process per core, or the scheduler at ``SKYFERRY_DASK_ADDRESS``). ``ray``: on Ray workers
    (the cluster at ``SKYFERRY_RAY_ADDRESS``, or a local Ray).

    ``api_env`` points the local cluster's workers at the Prefect API the run reports to
    (``PREFECT_API_URL``, and ``PREFECT_API_AUTH_STRING`` where it asks for one). Without
    it, on the ephemeral API, every worker process would start a temporary API server.
    """
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    if settings.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise ConfigError("SKYFERRY_TASK_RUNNER=ray needs the ray-runner extra: "
                              "pip install 'skyferry[ray-runner]'") from exc
        init: dict[str, Any] = {"runtime_env": {"env_vars": dict(api_env)}} if api_env else {}
        return RayTaskRunner(address=settings.ray_address, init_kwargs=init)
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
    if api_env:
        cluster["env"] = dict(api_env)
    return DaskTaskRunner(cluster_kwargs=cluster)


class SettingsTaskRunner(ThreadPoolTaskRunner[Any]):
    """A flow's task runner, chosen from the settings when a run starts, not at import.

    Prefect starts each flow run with a duplicate of its flow's runner: this one's
    duplicate is the runner the current settings ask for.
    """

    def duplicate(self) -> Any:
        return make_task_runner(get_settings())


def uses_processes(settings: Settings) -> bool:
    """Whether chunk tasks may run in another process (and so must take serializable
    arguments)."""
    return settings.task_runner != "threads"
