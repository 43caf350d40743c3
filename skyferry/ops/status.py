"""``skyferry status``: a run's live state, read from the Prefect API, drawn with rich.

Everything comes from the API (so it works against any server, while a deployment runs):
the flow run and its state, the live fields the run keeps in its progress artifact (stage,
chunks, throughput, ETA, node health), the child runs with their pools, and retried tasks.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from skyferry.errors import SkyferryError

__all__ = ["RunStatus", "fetch_status", "render_status", "status_line", "PIPELINE_FLOW"]

PIPELINE_FLOW = "multicloud-pipeline"
_PAGE, _MAX_PAGES = 200, 25  # retried tasks are counted over the first 5,000 task runs
_STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "FAILED": "red", "CRASHED": "red",
          "CANCELLED": "yellow", "SCHEDULED": "blue", "PENDING": "blue"}


class RunNotFoundError(SkyferryError, LookupError):
    """No flow run matches what ``skyferry status`` was asked for."""


@dataclass
class ChildStatus:
    name: str
    cloud: str
    pool: str
    state: str
    chunks: int | None  # None: the child claims units as it goes


@dataclass
class RunStatus:
    """One snapshot of a pipeline run, as the API tells it."""

    run_id: str
    name: str
    state: str
    state_name: str
    deployment: str | None
    started: datetime | None
    elapsed_s: float
    live: dict[str, str] = field(default_factory=dict)
    progress: float = 0.0
    children: list[ChildStatus] = field(default_factory=list)
    retried_tasks: int = 0
    task_states: dict[str, int] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    @property
    def stage(self) -> str:
        if self.state == "COMPLETED":
            return "committed"
        if self.state in ("SCHEDULED", "PENDING"):
            return "waiting for a worker"
        return self.live.get("stage") or "planning"


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def fetch_status(http: Any, run_id: str | None = None) -> RunStatus:
    """A snapshot of ``run_id``, or of the newest ``multicloud-pipeline`` run.

    ``http`` is an httpx client whose base URL is the Prefect API.
    """
    if run_id is None:
        runs = _post(http, "/flow_runs/filter", {
            "flows": {"name": {"any_": [PIPELINE_FLOW]}},
            "sort": "EXPECTED_START_TIME_DESC", "limit": 20})
        runs = [r for r in runs if r["state_type"] != "SCHEDULED"] or runs
        if not runs:
            raise RunNotFoundError(f"no {PIPELINE_FLOW} run in the Prefect API at {http.base_url}")
        run = runs[0]
    else:
        try:
            response = http.get(f"/flow_runs/{run_id}")
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (404, 422):
                raise RunNotFoundError(
                    f"no flow run {run_id} in the Prefect API at {http.base_url}") from None
            raise
        run = response.json()
    started = _time(run.get("start_time"))
    end = _time(run.get("end_time"))
    if started is not None:
        now = end or datetime.now(started.tzinfo)
        elapsed = (now - started).total_seconds()
    else:
        elapsed = 0.0
    deployment = None
    if run.get("deployment_id"):
        try:
            deployment = http.get(f"/deployments/{run['deployment_id']}").json()["name"]
        except httpx.HTTPStatusError:
            deployment = "(deleted)"
    status = RunStatus(run_id=run["id"], name=run["name"], state=run["state_type"] or "",
                       state_name=run.get("state_name") or "", deployment=deployment,
                       started=started, elapsed_s=elapsed)
    artifacts = _post(http, "/artifacts/filter", {
        "flow_runs": {"id": {"any_": [run["id"]]}}, "artifacts": {"type": {"any_": ["progress"]}},
        "limit": 5})
    if artifacts:
        status.progress = float(artifacts[0].get("data") or 0.0)
        status.live = dict(artifacts[0].get("metadata_") or {})
    task_runs = _post(http, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}},
                                                  "limit": 200})
    kids = []
    if task_runs:
        kids = _post(http, "/flow_runs/filter", {
            "flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in task_runs]}},
            "limit": 200})
    for kid in kids:
        params = kid.get("parameters") or {}
        status.children.append(ChildStatus(
            name=kid["name"], cloud=str(params.get("cloud", "?")),
            pool=kid.get("work_pool_name") or "in-process", state=kid["state_type"] or "",
            chunks=None if params.get("chunks") is None else len(params["chunks"])))
    run_ids = [run["id"], *(k["id"] for k in kids)]
    status.retried_tasks = 0
    states: Counter[str] = Counter()
    for page in range(_MAX_PAGES):  # the API serves at most 200 task runs a call
        batch = _post(http, "/task_runs/filter", {
            "flow_runs": {"id": {"any_": run_ids}}, "sort": "ID_DESC",
            "limit": _PAGE, "offset": page * _PAGE})
        status.retried_tasks += sum(1 for t in batch if (t.get("run_count") or 0) > 1)
        states.update((t.get("state_type") or "PENDING") for t in batch)
        if len(batch) < _PAGE:
            break
    status.task_states = dict(states)
    return status


def _post(http: Any, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = http.post(path, json=body)
    response.raise_for_status()
    return list(response.json())


def _eta(live: dict[str, str]) -> str:
    eta = live.get("eta_s")
    return f"{float(eta):.0f} s" if eta else "-"


def status_line(s: RunStatus) -> str:
    """One line per update, for logs and terminals that are not interactive."""
    live = s.live
    chunks = f"{live.get('chunks_done', '?')}/{live.get('chunks_total', '?')} chunks"
    return (f"{s.name} {s.state_name or s.state} · {s.stage} · {s.progress:.0f}% · {chunks} · "
            f"{live.get('mb_s', '0')} MB/s · ETA {_eta(live)}")


def render_status(s: RunStatus) -> RenderableType:
    """The dashboard: run, stage, progress, throughput and ETA, nodes, child runs."""
    live = s.live
    style = _STYLE.get(s.state, "white")
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", f"{s.name} ({s.run_id})")
    if s.deployment:
        head.add_row("deployment", s.deployment)
    head.add_row("state", Text(s.state_name or s.state, style=f"bold {style}"))
    head.add_row("stage", s.stage)
    if live.get("dataset"):
        head.add_row("batch", f"{live['dataset']} / {live.get('batch', '?')}")
    head.add_row("progress", Group(
        ProgressBar(total=100.0, completed=s.progress, width=40),
        Text(f"{s.progress:.0f}%  ·  {live.get('chunks_done', '0')} of "
             f"{live.get('chunks_total', '?')} chunks")))
    head.add_row("throughput", f"{live.get('mb_s', '0.00')} MB/s")
    if "units_done" in live:
        head.add_row("units", f"{live['units_done']} done · {live['units_held']} claimed · "
                              f"{live['units_free']} free · {live['units_stolen']} stolen · "
                              f"{live['units_retaken']} taken again")
    head.add_row("elapsed / ETA", f"{s.elapsed_s:.0f} s / {_eta(live)}")
    healthy = [n for n in live.get("nodes_healthy", "").split(",") if n]
    down = [n for n in live.get("nodes_down", "").split(",") if n]
    nodes = Text()
    for name in healthy:
        nodes.append(f"● {name}  ", style="green")
    for name in down:
        nodes.append(f"✖ {name} (down)  ", style="bold red")
    head.add_row("nodes", nodes if (healthy or down) else Text("-"))
    order = ("COMPLETED", "RUNNING", "PENDING", "SCHEDULED", "FAILED", "CRASHED", "CANCELLED")
    counts = sorted(s.task_states.items(), key=lambda kv: (
        order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    head.add_row("tasks", " · ".join(f"{n} {state.lower()}" for state, n in counts) or "-")
    head.add_row("retried tasks", str(s.retried_tasks))
    parts: list[RenderableType] = [head]
    if s.children:
        table = Table(title="cloud shares", title_justify="left", expand=False)
        for column in ("cloud", "pool", "chunks", "state"):
            table.add_column(column)
        for kid in sorted(s.children, key=lambda k: (k.cloud, k.name)):
            table.add_row(kid.cloud, kid.pool, "claims" if kid.chunks is None else str(kid.chunks),
                          Text(kid.state, style=_STYLE.get(kid.state, "white")))
        parts.append(table)
    return Panel(Group(*parts), title="skyferry status", border_style=style)


def watch(http: Any, run_id: str | None, interval: float, console: Any) -> RunStatus:
    """Redraw until the run ends; a plain line per change when the output is not a terminal."""
    from rich.live import Live

    status = fetch_status(http, run_id)
    run_id = status.run_id
    if not console.is_terminal:
        last = ""
        while True:
            line = status_line(status)
            if line != last:
                console.print(line, soft_wrap=True, highlight=False)
                last = line
            if status.final:
                console.print(render_status(status))
                return status
            time.sleep(interval)
            status = fetch_status(http, run_id)
    with Live(render_status(status), console=console, refresh_per_second=4) as screen:
        while not status.final:
            time.sleep(interval)
            status = fetch_status(http, run_id)
            screen.update(render_status(status))
    return status
