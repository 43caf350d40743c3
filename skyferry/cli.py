"""The ``skyferry`` command: a thin layer over the library."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from skyferry.config import PipelineConfig, get_settings, parse_duration, parse_size
from skyferry.errors import ConfigError, SkyferryError
from skyferry.memory import tune_allocator
from skyferry.metrics import PipelineResult, rate_text
from skyferry.topology import Topology, load_topology

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Move ML training data across clouds, replicated and verified.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whole for grep


@app.callback()
def _setup_process() -> None:
    # Before any command imports pyarrow or starts Prefect: a thread that has allocated
    # keeps its own glibc arena, which the tuning cannot reach (skyferry/memory.py).
    if get_settings().tune_malloc:
        tune_allocator()


def _prefect_quiet() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Logging is Prefect's to configure (its default, or PREFECT_LOGGING_SETTINGS_PATH).


class _NoEngineFailures(logging.Filter):
    """Keeps Prefect's failure reports (a state line, a traceback of ~70 lines) off the
    terminal: the command prints the typed error itself. Prefect's API still logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and record.name.startswith(("prefect.flow_runs", "prefect.task_runs",
                                                "skyferry.run")))


def _terminal_errors(verbose: bool) -> None:
    """Unless ``verbose``, a failed run shows its typed error in a line or two, not a
    traceback. Call it once Prefect has configured logging (it does so when imported)."""
    if verbose:
        return
    quiet = _NoEngineFailures()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and quiet not in handler.filters:
                handler.addFilter(quiet)


def _settle(result: PipelineResult) -> None:
    """Before this process exits, and stops an ephemeral API with it, let that API record the
    run's last task runs (see ``settle_ephemeral_api``)."""
    from flows.ephemeral import settle_ephemeral_api

    if not settle_ephemeral_api(result):
        err.print("[yellow]warning:[/] Prefect's local API had not recorded every task run of "
                  f"flow run {result.flow_run_id}; its run history may miss the last ones")


def _fail(exc: BaseException, as_json: bool = False) -> None:
    """A user's error in one line, exit 2; with ``--json``, a JSON document on stdout too."""
    if as_json:
        typer.echo(json.dumps({"error": str(exc), "error_type": type(exc).__name__}))
    err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
    raise typer.Exit(code=2)


def _check_output_file(path: Path) -> None:
    """``path`` can be written as a file: not a directory, and under no file."""
    if path.is_dir():
        raise ConfigError(f"--to {path} is a directory; name a file", source=str(path))
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--to {path} is under {parent}, which is a file",
                              source=str(path))


def print_summary(result: PipelineResult, rejects: list[dict[str, Any]] | None = None) -> None:
    status_style = {"completed": "green", "failed": "red"}.get(result.status, "yellow")
    at = f" (snapshot {result.snapshot})" if result.snapshot else ""
    console.print(f"[bold]{result.dataset}[/] batch [bold]{result.batch_id}[/]: "
                  f"[{status_style}]{result.status}[/] in {result.duration_s:.1f}s{at}")
    if result.error:
        err.print(f"[bold red]error:[/] {result.error_type or 'Error'}: {result.error}")
        return
    if result.chunks_at_risk:
        err.print(f"[bold yellow]at risk:[/] {len(result.chunks_at_risk)} chunks have every "
                  "replica in one cloud (--min-clouds 1); losing it loses them: "
                  f"{result.chunks_at_risk[:20]}")
    for url, why in list(result.odd_files.items())[:10]:
        console.print(f"[yellow]passed over[/] {url}: {why}")
    if len(result.odd_files) > 10:
        console.print(f"[yellow]passed over {len(result.odd_files) - 10} more such files[/] "
                      "(--json lists them; --strict fails on them)")
    if result.skipped_files:
        console.print(f"[yellow]passed over {len(result.skipped_files)} hidden or marker "
                      f"files[/] (name them with a glob to take them): "
                      f"{', '.join(result.skipped_files[:5])}")
    if not result.stages:
        return
    stages = Table(title="stages", title_justify="left")
    for col in ("stage", "items", "MB", "busy s", "MB/s", "success", "retries"):
        stages.add_column(col, justify="right" if col != "stage" else "left")
    for name, m in result.stages.items():
        stages.add_row(name, str(m.items), f"{m.bytes / 1e6:.1f}", f"{m.duration_s:.2f}",
                       rate_text(m.mb_s), f"{m.success_rate:.0%}", str(m.retries))
    console.print(stages)
    storage = result.stages["storage"]
    placement = Table(title="replicas", title_justify="left")
    placement.add_column("node")
    placement.add_column("chunks", justify="right")
    for node, count in (storage.by_node or {}).items():
        placement.add_row(node, str(count))
    for cloud, count in (storage.by_cloud or {}).items():
        placement.add_row(f"[bold]{cloud}[/] (cloud)", str(count))
    console.print(placement)
    dist = result.stages["distribution"]
    console.print(f"cross-cloud transfers: {dist.cross_cloud_transfers}   "
                  f"replica success: {(dist.replica_success_rate or 0):.1%}   "
                  f"node failures handled: {result.node_failures_handled}   "
                  f"down: {', '.join(result.down_nodes) or 'none'}")
    console.print(f"rows: {result.rows_in} in + {result.rows_added} added - "
                  f"{result.rows_dropped} dropped by transforms = {result.rows_stored} stored + "
                  f"{result.rows_rejected} rejected; {result.chunks_processed} chunks processed, "
                  f"{result.chunks_skipped} resumed")
    for reject in (rejects or [])[:10]:
        console.print(f"  rejected: {reject.get('reason')} - {reject.get('text')!s:.80}")


def _rejects(result: PipelineResult, topology: str | None) -> list[dict[str, Any]]:
    from skyferry.commit.manifest import open_catalog

    if result.status != "completed" or not result.batch_id:
        return []
    catalog = open_catalog(load_topology(topology))
    manifest = catalog.manifest(result.dataset, result.batch_id)
    found: list[dict[str, Any]] = []
    for chunk in manifest.chunks:
        if chunk.rejects_key:
            found.extend(catalog.load_rejects(chunk.rejects_key))
    return found


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="fsspec URL or local path, optional glob")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset name")],
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    batch_id: Annotated[Optional[str], typer.Option("--batch-id", help="batch id")] = None,
    format: Annotated[str, typer.Option(help="auto|csv|jsonl|parquet|binary")] = "auto",
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="e.g. 64MB, 65536")] = "512MiB",
    replicas: Annotated[int, typer.Option(help="replication factor")] = 3,
    quorum: Annotated[int, typer.Option(help="write quorum")] = 2,
    min_clouds: Annotated[int, typer.Option(
        "--min-clouds", help="clouds each chunk's replicas must span; 1: availability first")
    ] = 2,
    transform: Annotated[Optional[list[str]], typer.Option(help="module:function")] = None,
    schema: Annotated[Optional[str], typer.Option("--schema", help="schema YAML")] = None,
    source_cloud: Annotated[Optional[str], typer.Option(help="cloud of a local source")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="fail on a source file that cannot be taken (empty, a dangling or "
        "directory symlink, a name that is not UTF-8) instead of passing it over")] = False,
    max_egress_usd: Annotated[Optional[float], typer.Option(
        "--max-egress-usd", min=0, help="refuse the run, before anything is written, when "
        "its plan's egress costs more (see skyferry plan)")] = None,
    encrypt: Annotated[Optional[bool], typer.Option(
        "--encrypt/--no-encrypt", help="encrypt every stored chunk (default: as the "
        "topology's encryption section says)")] = None,
    keys: Annotated[Optional[str], typer.Option(
        "--keys", help="where the master keys are: file:PATH, env:VARIABLE or block:NAME")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="show Prefect's tracebacks of a failure")] = False,
) -> None:
    """Run the multicloud-pipeline flow on SOURCE."""
    from skyferry.run.context import open_run

    _prefect_quiet()
    try:
        config = PipelineConfig(
            source=source, dataset=dataset, topology=topology, batch_id=batch_id,
            format=format,  # type: ignore[arg-type]  # pydantic validates the literal
            chunk_size=parse_size(chunk_size), replicas=replicas, quorum=quorum,
            min_clouds=min_clouds, transforms=transform or [], schema_path=schema,
            source_cloud=source_cloud, strict=strict, max_egress_usd=max_egress_usd,
            encrypt=encrypt, master_keys=keys,
        )
        open_run(config)  # the dataset name, topology, schema and transforms, before Prefect
    except (ValueError, SkyferryError) as exc:
        _fail(exc)
    from flows.pipeline import run_pipeline

    _terminal_errors(verbose)
    result = run_pipeline(config)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        print_summary(result, _rejects(result, topology))
    _settle(result)
    if result.status == "failed":
        raise typer.Exit(code=1)


@app.command()
def plan(
    source: Annotated[str, typer.Argument(help="fsspec URL or local path, optional glob")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="dataset name")],
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    format: Annotated[str, typer.Option(help="auto|csv|jsonl|parquet|binary")] = "auto",
    chunk_size: Annotated[str, typer.Option("--chunk-size", help="e.g. 64MB, 65536")] = "512MiB",
    replicas: Annotated[int, typer.Option(help="replication factor")] = 3,
    quorum: Annotated[int, typer.Option(help="write quorum")] = 2,
    min_clouds: Annotated[int, typer.Option(
        "--min-clouds", help="clouds each chunk's replicas must span")] = 2,
    source_cloud: Annotated[Optional[str], typer.Option(help="cloud of a local source")] = None,
    deployed: Annotated[bool, typer.Option(
        "--deployed", help="plan for child runs on every cloud's pool (a deployment run), "
        "not for one process in the source's cloud")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What a run of SOURCE would move and cost, writing nothing: files, bytes, chunks;
    bytes, requests and egress per route; storage a month; an ETA from the last runs."""
    from skyferry.ops.costs import plan_for
    from skyferry.run.context import open_run

    try:
        config = PipelineConfig(
            source=source, dataset=dataset, topology=topology,
            format=format,  # type: ignore[arg-type]  # pydantic validates the literal
            chunk_size=parse_size(chunk_size), replicas=replicas, quorum=quorum,
            min_clouds=min_clouds, source_cloud=source_cloud)
        found = plan_for(open_run(config), deployed=deployed)
    except (ValueError, SkyferryError) as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(found.model_dump_json(indent=1))
        return
    console.print(f"{found.files} files, {found.bytes:,} bytes, {found.chunks} chunks, "
                  f"{found.replicas} replicas; prices {found.prices_version} "
                  f"(effective {found.prices_effective or 'unknown'})")
    table = Table("hop", "route", Column("MB", justify="right"),
                  Column("requests", justify="right"), Column("egress $", justify="right"),
                  Column("requests $", justify="right"))
    for r in found.routes:
        table.add_row(r.hop, r.name, f"{r.bytes / 1e6:,.3f}", f"{r.requests:,}",
                      f"{r.egress_usd:.4f}", f"{r.requests_usd:.4f}")
    console.print(table)
    eta = "unknown" if found.eta_s is None else f"{found.eta_s:,.1f} s"
    console.print(f"egress ${found.egress_usd:.4f}, requests ${found.requests_usd:.4f}, "
                  f"storage ${found.storage_usd_per_month:.4f}/month; ETA {eta} "
                  f"({found.eta_basis}); replicas span {found.min_clouds} clouds: "
                  f"{'yes' if found.spans_min_clouds else 'NO'}")
    for node, why in found.down_nodes.items():
        console.print(f"[yellow]node {node} is down: {why}[/yellow]")
    for warning in found.warnings:
        console.print(f"[yellow]warning: {warning}[/yellow]")


@app.command()
def export(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    to: Annotated[Path, typer.Option("--to", help="output .parquet, .csv or .jsonl")],
    batch: Annotated[Optional[str], typer.Option("--batch", help="one batch only")] = None,
    snapshot: Annotated[Optional[str], typer.Option(
        help="the snapshot to export: its number, id or tag (default: the newest)")] = None,
    as_of: Annotated[Optional[str], typer.Option(
        "--as-of", help="the newest snapshot made at or before this time (ISO 8601)")] = None,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    keys: Annotated[Optional[str], typer.Option(
        "--keys", help="an encrypted dataset's master keys: file:PATH, env:VARIABLE or "
        "block:NAME (default: SKYFERRY_KEYS, then the topology's)")] = None,
) -> None:
    """Read a committed dataset back, verifying every chunk, and write it to a file."""
    from skyferry.ops.export import export_dataset

    try:
        topo = load_topology(topology)
        report = export_dataset(dataset, to, batch_id=batch, topology=topo,
                                snapshot=_snapshot_ref(topo, dataset, snapshot, as_of),
                                keys=keys)
    except SkyferryError as exc:
        _fail(exc)
    at = f" (snapshot {report.snapshot})" if report.snapshot else ""
    console.print(f"exported {report.chunks} chunks ({report.rows} rows, "
                  f"{report.bytes / 1e6:.1f} MB) of {len(report.batches)} batches{at} to {to}")
    for line in report.failovers:
        console.print(f"[yellow]failover[/] {line}")
    for line in report.unreadable:
        err.print(f"[bold red]error:[/] ManifestError: {line}; its batch was not exported")
    if report.unreadable:
        raise typer.Exit(code=1)


@app.command()
def read(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    to: Annotated[Path, typer.Option("--to", help="output .parquet")],
    rank: Annotated[int, typer.Option(min=0, help="this reader's rank")] = 0,
    world_size: Annotated[int, typer.Option("--world-size", min=1, help="ranks in all")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="the shuffle's seed")] = 0,
    epoch: Annotated[int, typer.Option(min=0, help="the epoch (each has its own order)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="rows per batch")
                          ] = 256,
    drop_remainder: Annotated[bool, typer.Option(
        "--drop-remainder", help="drop the rows that do not divide among the ranks, rather "
        "than pad with the epoch's first rows")] = False,
    cloud: Annotated[Optional[str], typer.Option(
        help="the reader's cloud (default: detected, see docs/reading.md)")] = None,
    region: Annotated[Optional[str], typer.Option(help="the reader's region")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help="the chunk cache (default: SKYFERRY_HOME/cache/chunks)")] = None,
    decoded: Annotated[bool, typer.Option(
        "--decoded/--no-decoded", help="keep each chunk's decoded copy in the cache (about "
        "twice its size), so later reads skip decoding")] = True,
    snapshot: Annotated[Optional[str], typer.Option(
        help="the snapshot to read: its number, id or tag (default: the newest)")] = None,
    as_of: Annotated[Optional[str], typer.Option(
        "--as-of", help="the newest snapshot made at or before this time (ISO 8601)")] = None,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    keys: Annotated[Optional[str], typer.Option(
        "--keys", help="an encrypted dataset's master keys: file:PATH, env:VARIABLE or "
        "block:NAME (default: SKYFERRY_KEYS, then the topology's)")] = None,
) -> None:
    """Write the rows one rank of a training job reads, in its order, to a Parquet file:
    each chunk verified, from the nearest replica."""
    from skyferry.read.reader import ReaderConfig, read_to_file

    try:
        _check_output_file(to)
        topo = load_topology(topology)
        config = ReaderConfig(dataset, rank=rank, world_size=world_size, batch_size=batch_size,
                              seed=seed, epoch=epoch, cloud=cloud, region=region,
                              cache_dir=cache_dir, decoded=decoded,
                              snapshot=_snapshot_ref(topo, dataset, snapshot, as_of),
                              remainder="drop" if drop_remainder else "pad", keys=keys)
        rows, report = read_to_file(config, to, topology=topo)
    except SkyferryError as exc:
        _fail(exc)
    place = report.place
    at = f" of snapshot {report.snapshot}" if report.snapshot else ""
    console.print(f"rank {rank} of {world_size}: {rows} rows{at} to {to} (reader in "
                  f"{place.cloud}{'/' + place.region if place.region else ''}, from "
                  f"{place.detected_from})")
    for node, nbytes in sorted(report.bytes_from.items()):
        console.print(f"  read {nbytes / 1e6:.1f} MB from {node}")
    console.print(f"  {report.cache_hits} chunks from the cache; across clouds "
                  f"{report.cross_cloud_bytes / 1e6:.1f} MB, egress ${report.egress_usd:.4f}")
    for line in report.failovers:
        console.print(f"[yellow]failover[/] {line}")


@app.command()
def datasets(
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Every dataset: its snapshots, and the batches, rows and bytes its newest one holds."""
    from skyferry.ops.history import summarize_datasets

    try:
        found = summarize_datasets(load_topology(topology))
    except SkyferryError as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(d) for d in found], indent=1))
        return
    table = Table("dataset", "snapshots", Column("newest", no_wrap=True), "batches", "rows",
                  "MB", Column("changed", no_wrap=True))
    for d in found:
        table.add_row(d.dataset, str(d.snapshots), d.snapshot or "-", str(d.batches),
                      f"{d.rows:,}", f"{d.bytes / 1e6:,.1f}", d.last_change or "-")
    console.print(table)


@app.command()
def log(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    limit: Annotated[int, typer.Option(min=0, help="snapshots shown (0: all)")] = 20,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A dataset's snapshots, newest first: number, id, time, what made it, batches and
    rows (added and removed)."""
    from skyferry.ops.history import dataset_log

    try:
        lines = dataset_log(load_topology(topology), dataset, limit)
    except SkyferryError as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(json.dumps([{**line.snapshot.model_dump(exclude={"added"}),
                           "added": [b.batch_id for b in line.snapshot.added],
                           "rows_added": line.rows_added, "rows_removed": line.rows_removed}
                          for line in lines], indent=1))
        return
    if not lines:
        console.print(f"{dataset} has no snapshots (committed before snapshots, or never)")
        return
    table = Table("#", Column("id", no_wrap=True), Column("time", no_wrap=True), "operation",
                  "batches", "rows", "+rows", "-rows", "note")
    for line in lines:
        e = line.snapshot
        table.add_row(str(e.seq), e.id, e.created_at[:19], e.operation, str(e.batches),
                      f"{e.rows:,}", f"{line.rows_added:,}", f"{line.rows_removed:,}", e.note)
    console.print(table)


def _as_of(value: str | None) -> datetime | None:
    """An ``--as-of`` time: ISO 8601, a date or a date and time (UTC unless it says)."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--as-of {value!r} is not a time (ISO 8601, such as 2026-12-01 or "
                          "2026-12-01T14:30:00+00:00)", source="--as-of") from None


def _snapshot_ref(topology: Topology, dataset: str, snapshot: str | None,
                  as_of: str | None) -> str | None:
    """``--snapshot`` as given, or the id of the snapshot ``--as-of`` names."""
    if as_of is None:
        return snapshot
    if snapshot is not None:
        raise ConfigError("give --snapshot or --as-of, not both", source="--as-of")
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.snapshots import SnapshotLog

    found = SnapshotLog(open_catalog(topology), dataset).resolve(as_of=_as_of(as_of))
    return found.id if found else None


@app.command()
def tag(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    name: Annotated[str, typer.Argument(help="the tag: letters, digits, '.', '_', '-'")],
    snapshot: Annotated[Optional[str], typer.Option(
        help="the snapshot to tag: its number, id or tag (default: the newest)")] = None,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
) -> None:
    """Name a snapshot, for reading it again later (a name is given once)."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.snapshots import SnapshotLog

    try:
        made = SnapshotLog(open_catalog(load_topology(topology)), dataset).tag(name, snapshot)
    except SkyferryError as exc:
        _fail(exc)
    console.print(f"{dataset}: tag {made.name} is snapshot {made.seq} ({made.snapshot})")


@app.command()
def rollback(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    to: Annotated[str, typer.Option("--to", help="the snapshot: its number, id or tag")],
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
) -> None:
    """Make a new snapshot that holds what an older one held. Nothing is deleted: a later
    rollback can bring the newer batches back while the retention policy keeps them."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.snapshots import SnapshotLog

    try:
        made = SnapshotLog(open_catalog(load_topology(topology)), dataset).rollback(to)
    except SkyferryError as exc:
        _fail(exc)
    console.print(f"{dataset}: snapshot {made.seq} ({made.id}) holds {made.batches} batches, "
                  f"{made.rows:,} rows ({made.note or 'unchanged'})")


@app.command()
def quarantine(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    batch: Annotated[str, typer.Option("--batch", help="the batch id")],
    release: Annotated[bool, typer.Option(
        "--release", help="bring a quarantined batch back")] = False,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
) -> None:
    """Hide a bad batch from a new snapshot and every later one (its data stays), or, with
    --release, bring it back."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.snapshots import SnapshotLog

    try:
        catalog = open_catalog(load_topology(topology))
        manifest = catalog.manifest(dataset, batch)  # a committed batch, or BatchNotFoundError
        log = SnapshotLog(catalog, dataset)
        if release:
            made = log.append("release", add=[manifest], release=[batch],
                              note=f"batch {batch} released")
        else:
            made = log.append("quarantine", quarantine=[batch],
                              note=f"batch {batch} quarantined",
                              base=lambda: catalog.manifests(dataset))
        made = made or log.head()
    except SkyferryError as exc:
        _fail(exc)
    assert made is not None
    console.print(f"{dataset}: snapshot {made.seq} ({made.id}) holds {made.batches} batches, "
                  f"{made.rows:,} rows; quarantined: {', '.join(made.quarantined) or 'none'}")


@app.command()
def diff(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    a: Annotated[str, typer.Argument(help="the older snapshot: number, id or tag")],
    b: Annotated[str, typer.Argument(help="the newer snapshot: number, id or tag")],
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What changed between two snapshots: batches, source files, rows and bytes."""
    from skyferry.ops.history import diff_snapshots

    try:
        found = diff_snapshots(load_topology(topology), dataset, a, b)
    except SkyferryError as exc:
        _fail(exc, as_json)
    (rows_in, rows_out), (bytes_in, bytes_out) = found.rows, found.bytes
    if as_json:
        typer.echo(json.dumps({
            "a": found.a.id, "b": found.b.id,
            "batches_added": [r.batch_id for r in found.added],
            "batches_removed": [r.batch_id for r in found.removed],
            "sources_added": found.sources_added, "sources_removed": found.sources_removed,
            "rows_added": rows_in, "rows_removed": rows_out,
            "bytes_added": bytes_in, "bytes_removed": bytes_out}, indent=1))
        return
    console.print(f"{dataset}: snapshot {found.a.seq} ({found.a.id}) -> {found.b.seq} "
                  f"({found.b.id}): +{len(found.added)} -{len(found.removed)} batches, "
                  f"+{rows_in:,} -{rows_out:,} rows, +{bytes_in / 1e6:,.1f} "
                  f"-{bytes_out / 1e6:,.1f} MB")
    for ref in found.added:
        console.print(f"  + batch {ref.batch_id} ({ref.rows:,} rows)")
    for ref in found.removed:
        console.print(f"  - batch {ref.batch_id} ({ref.rows:,} rows)")
    for url in found.sources_added:
        console.print(f"  + {url}")
    for url in found.sources_removed:
        console.print(f"  - {url}")


@app.command()
def retention(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    keep_last: Annotated[Optional[int], typer.Option(
        "--keep-last", min=1, help="keep the last N snapshots")] = None,
    keep_for: Annotated[Optional[str], typer.Option(
        "--keep-for", help="keep the snapshots newer than this: seconds, or 12h/30d")] = None,
    keep_all: Annotated[bool, typer.Option("--keep-all", help="keep every snapshot")] = False,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
) -> None:
    """Show or set which snapshots gc keeps (tagged and pinned ones always stay), and the
    readers' pins."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.commit.retention import Retention, RetentionPolicy
    from skyferry.commit.snapshots import SnapshotLog

    try:
        keeps = Retention(SnapshotLog(open_catalog(load_topology(topology)), dataset))
        if keep_all or keep_last is not None or keep_for is not None:
            if keep_all and (keep_last is not None or keep_for is not None):
                raise ConfigError("--keep-all keeps every snapshot: give it alone",
                                  source="--keep-all")
            policy = keeps.set_policy(RetentionPolicy(
                keep_last=keep_last,
                keep_for_s=parse_duration(keep_for) if keep_for is not None else None))
        else:
            policy = keeps.policy()
        now = time.time()
        pins = [p for p in keeps.pins() if p.live(now)]
    except (ValueError, SkyferryError) as exc:
        _fail(exc)
    console.print(f"{dataset}: {policy.describe()}")
    for pin in pins:
        console.print(f"  pinned: snapshot {pin.seq} ({pin.snapshot}) by {pin.holder}, until "
                      f"{pin.expires_at}")


@app.command()
def tables(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    snapshot: Annotated[Optional[str], typer.Option(
        help="the snapshot: its number, id or tag (default: the newest)")] = None,
    table_format: Annotated[Optional[list[str]], typer.Option(
        "--format", help="iceberg or delta (repeat for both; default: both)")] = None,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
) -> None:
    """Publish a snapshot as Iceberg and Delta tables over its replicas, one per cloud that
    holds every chunk, for DuckDB, Polars, Spark and pyiceberg to read."""
    from skyferry.ops.tables import FORMATS, publish_tables

    try:
        report = publish_tables(load_topology(topology), dataset, snapshot=snapshot,
                                formats=table_format or FORMATS)
    except SkyferryError as exc:
        _fail(exc)
    for line in report.published:
        console.print(f"{dataset} snapshot {report.snapshot}: {line}")
    for line in report.skipped:
        err.print(f"[yellow]no table:[/] {line}")
    if not report.published:
        raise typer.Exit(code=1)


@app.command()
def nodes(
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    watch: Annotated[bool, typer.Option(
        "--watch", help="probe every node each second and show the failure detector's "
        "states live, until Ctrl-C")] = False,
    duration: Annotated[Optional[float], typer.Option(
        help="--watch: stop after this many seconds")] = None,
) -> None:
    """Probe every node and show its cloud, region, health and latency."""
    from skyferry.distribute.placement import NodeHealth
    from skyferry.distribute.probe import probe_nodes

    try:
        topo = load_topology(topology)
    except SkyferryError as exc:
        _fail(exc)
    if watch:
        _watch_nodes(topo, duration)
        return
    health = NodeHealth()
    latencies = probe_nodes(topo, health, get_settings().probe_timeout_s)
    table = Table(title="nodes", title_justify="left")
    for col in ("node", "cloud", "region", "health", "latency ms", "url"):
        table.add_column(col)
    for node in topo.nodes:
        state = health.states.get(node.name, "healthy")
        latency = latencies.get(node.name)
        style = "green" if state == "healthy" else "red"
        table.add_row(node.name, node.cloud, node.region, f"[{style}]{state}[/]",
                      "-" if latency is None else f"{latency * 1000:.1f}", node.url)
    console.print(table)
    for name, reason in health.reasons.items():
        console.print(f"[red]{name}[/]: {reason}")


def _watch_nodes(topo: Topology, duration: float | None) -> None:
    """The failure detector's view of every node, redrawn as it changes."""
    from rich.live import Live

    from skyferry.distribute.detector import DetectorConfig, FailureDetector
    from skyferry.distribute.placement import NodeHealth

    health = NodeHealth()
    changes: list[str] = []
    started = time.monotonic()
    health.listeners.append(lambda node, state, why: changes.append(
        f"{time.monotonic() - started:6.1f}s  {node} {state}" + (f": {why}" if why else "")))
    interval = get_settings().probe_interval_s or 1.0
    detector = FailureDetector(topo.nodes, health, DetectorConfig(interval_s=interval)).start()

    def table() -> Table:
        views = detector.snapshot()
        out = Table(title=f"nodes, probed every {interval:g}s (Ctrl-C to stop)",
                    title_justify="left")
        for col in ("node", "cloud", "state", "phi", "probe ms", "fastest ms", "why"):
            out.add_column(col)
        for node in topo.nodes:
            view = views.get(node.name)
            if view is None:
                out.add_row(node.name, node.cloud, "[dim]disabled[/]", "", "", "", "")
                continue
            style = {"healthy": "green", "suspect": "yellow"}.get(view.state, "red")
            out.add_row(node.name, node.cloud, f"[{style}]{view.state}[/]",
                        f"{min(view.phi, 99.9):.1f}",
                        "-" if view.rtt_s is None else f"{view.rtt_s * 1000:.1f}",
                        "-" if view.fastest_s is None else f"{view.fastest_s * 1000:.1f}",
                        view.reason if view.state != "healthy" else "")
        out.caption = "\n".join(changes[-8:])
        return out

    try:
        with Live(table(), console=console, refresh_per_second=4) as live:
            while duration is None or time.monotonic() - started < duration:
                time.sleep(0.25)
                live.update(table())
    except KeyboardInterrupt:
        pass
    finally:
        detector.stop()


@app.command()
def status(
    run_id: Annotated[Optional[str], typer.Argument(
        help="flow run id; the newest multicloud-pipeline run when omitted")] = None,
    once: Annotated[bool, typer.Option("--once", help="print one snapshot and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between API reads")] = 1.0,
) -> None:
    """A live dashboard of a pipeline run, from the Prefect API (PREFECT_API_URL, or the
    local API that runs reuse)."""
    _prefect_quiet()
    from prefect.client.orchestration import get_client
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import get_current_settings

    from flows.local_api import find_local_api, pointed_at
    from skyferry.ops.status import fetch_status, render_status, watch

    settings = get_current_settings()
    local = None if settings.api.url else find_local_api(settings.home)
    if local is not None:  # the local API that `skyferry run` started and reuses
        settings = pointed_at(settings, local)
    try:
        with SettingsContext(profile=get_settings_context().profile, settings=settings), \
                get_client(sync_client=True) as client:
            http = client._client  # the API's httpx client: a server, Cloud or ephemeral
            if once:
                console.print(render_status(fetch_status(http, run_id)))
                return
            final = watch(http, run_id, interval, console)
    except SkyferryError as exc:
        _fail(exc)
    if final.state != "COMPLETED":
        raise typer.Exit(code=1)


@app.command()
def profile(
    source: Annotated[Optional[str], typer.Argument(
        help="what to run; a synthetic ML CSV of --size when omitted")] = None,
    runs: Annotated[int, typer.Option("-n", "--runs", min=1, help="how many runs")] = 5,
    size: Annotated[str, typer.Option(help="size of the synthetic CSV")] = "64MB",
    chunk_size: Annotated[str, typer.Option("--chunk-size")] = "8MiB",
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    chart: Annotated[Optional[Path], typer.Option(help="PNG chart path")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="keep the runs' datasets")] = False,
) -> None:
    """Run the pipeline N times; print the stage breakdown's spread and the bottlenecks."""
    _prefect_quiet()
    from flows.pipeline import run_pipeline
    from skyferry.ops.demo import generate_dataset
    from skyferry.ops.gc import drop_dataset

    _terminal_errors(False)
    from skyferry.ops.profile import profile_results, profile_table, write_chart

    settings = get_settings()
    if source is None:
        folder = settings.home / "profile" / "source"
        if not sorted(folder.glob("train-*.csv")):
            generate_dataset(folder, total_bytes=parse_size(size))
        source = f"{folder}/*.csv"
    try:
        topo = load_topology(topology)
    except SkyferryError as exc:
        _fail(exc)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for i in range(1, runs + 1):
        dataset = f"profile-{stamp}-{i}"
        result = run_pipeline(PipelineConfig(source=source, dataset=dataset, topology=topology,
                                             chunk_size=parse_size(chunk_size)))
        console.print(f"run {i}/{runs}: {result.status} in {result.duration_s:.2f}s"
                      + (f" ({result.error})" if result.error else ""))
        if not keep:
            drop_dataset(topo, dataset)
        if result.status == "failed":
            _settle(result)
            raise typer.Exit(code=1)
        results.append(result)
    _settle(results[-1])
    report = profile_results(results)
    console.print(profile_table(report))
    for stage, advice in report.recommendations.items():
        console.print(f"[bold red]bottleneck[/] {stage}: {advice}")
    if not report.bottlenecks:
        console.print("no stage takes more than 30% of the time")
    target = chart or settings.home / "profile" / f"profile-{stamp}.png"
    console.print(f"chart: {write_chart(report, target)}")


@app.command()
def verify(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    batch: Annotated[Optional[str], typer.Option("--batch", help="one batch only")] = None,
    snapshot: Annotated[Optional[str], typer.Option(
        help="only the batches of this snapshot: its number, id or tag")] = None,
    as_of: Annotated[Optional[str], typer.Option(
        "--as-of", help="only the batches of the newest snapshot made by then")] = None,
    deep: Annotated[bool, typer.Option("--deep", help="read every byte and check its hash")
                    ] = False,
    concurrency: Annotated[int, typer.Option(help="replicas checked at once")] = 4,
    max_mb_s: Annotated[Optional[float], typer.Option(
        "--max-mb-s", help="--deep: read at most this many MB/s")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    lost: Annotated[Optional[list[str]], typer.Option(
        "--lost", help="a node known to have lost its data: its empty listing means its "
        "replicas are missing (repeat for more)")] = None,
) -> None:
    """Check every replica, and every manifest copy, of a committed dataset. Exit 0: all ok;
    1: one is missing, differs or is unreadable; 3: none damaged, but a node or the catalog
    could not be checked."""
    from skyferry.ops.verify import EXIT_CODES, verify_dataset

    try:
        topo = load_topology(topology)
        report = verify_dataset(topo, dataset, batch_id=batch, deep=deep,
                                concurrency=concurrency, max_mb_s=max_mb_s,
                                lost=lost or (),
                                snapshot=_snapshot_ref(topo, dataset, snapshot, as_of))
    except SkyferryError as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(report.to_json())
    else:
        counts = report.counts()
        mb = report.bytes_read / 1e6
        console.print(f"[bold]{dataset}[/] ({report.level}): "
                      + ", ".join(f"{n} {s}" for s, n in counts.items())
                      + f"; {len(report.orphans)} orphans; {mb:.1f} MB read in "
                      f"{report.seconds:.1f}s")
        console.print("manifest copies: " + ", ".join(
            f"{n} {s}" for s, n in report.copy_counts().items()))
        for copy in report.damaged_copies[:20]:
            console.print(f"[red]manifest copy {copy.status}[/] {copy.place}:{copy.key} "
                          f"{copy.detail}")
        if report.damaged:
            table = Table(title="damaged replicas", title_justify="left")
            for col in ("batch", "chunk", "node", "status", "detail"):
                table.add_column(col)
            for check in report.damaged:
                table.add_row(check.batch_id, str(check.chunk), check.node, check.status,
                              check.detail)
            console.print(table)
        for line in report.orphans[:20]:
            console.print(f"[yellow]orphan[/] {line}")
        for node, why in report.unreachable.items():
            err.print(f"[bold red]unreachable:[/] {node}: {why} "
                      f"({report.not_checked} replicas not checked in all)")
    if report.verdict != "healthy":
        raise typer.Exit(code=EXIT_CODES[report.verdict])


@app.command()
def repair(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    batch: Annotated[Optional[str], typer.Option("--batch", help="one batch only")] = None,
    snapshot: Annotated[Optional[str], typer.Option(
        help="only the batches of this snapshot: its number, id or tag")] = None,
    as_of: Annotated[Optional[str], typer.Option(
        "--as-of", help="only the batches of the newest snapshot made by then")] = None,
    deep: Annotated[bool, typer.Option("--deep", help="find damage by reading every byte")
                    ] = False,
    max_node_share: Annotated[float, typer.Option(
        help="stop, touching nothing, if one node lost more than this share of its replicas")
    ] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    lost: Annotated[Optional[list[str]], typer.Option(
        "--lost", help="a node known to have lost its data: its replicas are re-created "
        "elsewhere although its listing is empty (repeat for more)")] = None,
    node: Annotated[Optional[str], typer.Option(
        "--node", help="only the batches with a replica or a hint on this node (one that came "
        "back)")] = None,
) -> None:
    """Re-create missing and damaged replicas from good ones, and replay hints. Exit 0: every
    chunk has R verified replicas; 1: a chunk is unrecoverable or short, or the repair
    stopped; 3: repaired, but a node could not be checked; 2: an error."""
    from skyferry.ops.repair import repair_dataset
    from skyferry.ops.verify import EXIT_CODES

    try:
        topo = load_topology(topology)
        report = repair_dataset(topo, dataset, batch_id=batch, deep=deep,
                                max_node_share=max_node_share, lost=lost or (), node=node,
                                probe_timeout_s=get_settings().probe_timeout_s,
                                snapshot=_snapshot_ref(topo, dataset, snapshot, as_of))
    except SkyferryError as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(report.to_json())
    else:
        found = report.found.counts()
        console.print(f"[bold]{dataset}[/]: found "
                      + ", ".join(f"{n} {s}" for s, n in found.items())
                      + f"; re-created {len(report.recreated)} replicas "
                      f"({report.bytes_copied / 1e6:.1f} MB), replayed "
                      f"{report.hints_replayed} hints, removed {len(report.removed)} bad "
                      f"copies, restored {len(report.copies_restored)} manifest copies in "
                      f"{report.seconds:.1f}s")
        for line in report.recreated[:20]:
            console.print(f"  {line}")
        if report.snapshot_added:
            console.print(f"  a new snapshot holds {len(report.snapshot_added)} committed "
                          f"batches that no snapshot held: {', '.join(report.snapshot_added)}")
        for node, why in report.braked.items():
            err.print(f"[bold red]stopped:[/] {node}: {why}")
        for line in report.unrecoverable:
            err.print(f"[bold red]unrecoverable:[/] {line}")
        for line in report.short:
            err.print(f"[bold red]short:[/] {line}")
        for line in report.copies_failed:
            err.print(f"[bold red]manifest copy not restored:[/] {line}")
    if report.verdict == "unchecked" and not as_json:
        err.print(f"[bold yellow]not checked:[/] {report.found.summary()}")
    if report.verdict != "healthy":
        raise typer.Exit(code=EXIT_CODES[report.verdict])


@app.command()
def gc(
    grace: Annotated[str, typer.Option(help="grace period in seconds, or 1h/1d")] = "1d",
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Free the batches and chunks that no kept snapshot reads (see `skyferry retention`),
    then delete objects no manifest claims that are older than the grace period."""
    from skyferry.ops.gc import collect_garbage

    try:
        grace_s = parse_duration(grace)
        topo = load_topology(topology)
    except (ValueError, SkyferryError) as exc:
        _fail(exc)
    report = collect_garbage(topo, grace_s=grace_s, dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    console.print(f"{report.snapshots_expired} snapshots expired ({report.pins} pinned kept); "
                  f"{verb} {len(report.batches_freed)} batches and {len(report.chunks_freed)} "
                  "chunks of older source versions")
    console.print(f"scanned {report.scanned}, {'would delete' if dry_run else 'deleted'} "
                  f"{len(report.deleted)} objects, {report.bytes / 1e9:,.3f} GB "
                  f"(${report.usd_per_month:,.2f} a month), kept {report.kept_young} inside "
                  "the grace period")
    for line in report.deleted[:20]:
        console.print(f"  {line}")
    for line in report.errors:
        err.print(f"[bold red]not cleaned:[/] {line}")
    if report.errors:
        raise typer.Exit(code=1)


@app.command()
def demo(
    size: Annotated[str, typer.Option(help="size of the synthetic CSV")] = "300MB",
    chunk_size: Annotated[str, typer.Option("--chunk-size")] = "32MiB",
    out: Annotated[Optional[Path], typer.Option(help="export the dataset here")] = None,
) -> None:
    """Generate a synthetic ML dataset, run it through the pipeline, and show what happened."""
    _prefect_quiet()
    from importlib import resources

    from flows.pipeline import run_pipeline
    from skyferry.ops.demo import generate_dataset
    from skyferry.ops.export import export_dataset

    _terminal_errors(False)
    settings = get_settings()
    source = settings.home / "demo" / "source"
    started = time.perf_counter()
    files = sorted(source.glob("train-*.csv"))
    if not files:
        files = generate_dataset(source, total_bytes=parse_size(size))
    total = sum(p.stat().st_size for p in files)
    console.print(f"source: {len(files)} CSV files, {total / 1e6:.0f} MB, in "
                  f"{time.perf_counter() - started:.1f}s under {source}")
    schema = resources.files("skyferry").joinpath("schemas/demo.yaml")
    config = PipelineConfig(source=f"{source}/*.csv", dataset="demo-train",
                            schema_path=str(schema), chunk_size=parse_size(chunk_size))
    console.print("running multicloud-pipeline (the first run starts Prefect's local API; "
                  "later runs reuse it)")
    result = run_pipeline(config)
    print_summary(result, _rejects(result, None))
    _settle(result)
    if result.status == "up_to_date":
        console.print("the demo files are already committed (incremental run: nothing new); "
                      f"delete {settings.home} to run it afresh")
    if result.status == "failed":
        raise typer.Exit(code=1)
    target = out or settings.home / "demo" / "export" / "demo-train.parquet"
    report = export_dataset("demo-train", target, batch_id=result.batch_id)
    console.print(f"read back {report.chunks} verified chunks, {report.rows} rows -> {target}")
    console.print(json.dumps({"status": result.status, "rows_stored": result.rows_stored,
                              "rows_rejected": result.rows_rejected}))


@app.command()
def rekey(
    dataset: Annotated[str, typer.Argument(help="dataset name")],
    to: Annotated[str, typer.Option("--to", help="the master key id to wrap every data key by")],
    keys: Annotated[Optional[str], typer.Option(
        "--keys", help="master keys holding the old and the new key: file:PATH, env:VARIABLE "
        "or block:NAME (default: SKYFERRY_KEYS, then the topology's)")] = None,
    topology: Annotated[Optional[str], typer.Option(help="topology YAML file")] = None,
) -> None:
    """Wrap every data key of an encrypted dataset by master key TO alone; no data object
    is rewritten. Then the old master key can be retired."""
    from skyferry.ops.rekey import rekey_dataset

    try:
        report = rekey_dataset(load_topology(topology), dataset, to=to, keys=keys)
    except SkyferryError as exc:
        _fail(exc)
    console.print(f"{dataset}: {report.chunks} data keys wrapped by {to} in "
                  f"{len(report.manifests)} manifests; {report.unchanged} unchanged; no data "
                  "object rewritten")


keys_app = typer.Typer(no_args_is_help=True, help="Master keys for encryption at rest.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    key_id: Annotated[str, typer.Argument(help="the new key's id, e.g. team-2026")],
) -> None:
    """Print a new random 256-bit master key as one id:base64 line, for a key file or an
    environment variable (keep it secret: whoever holds it reads the data)."""
    from skyferry.crypto import new_master_key

    try:
        typer.echo(new_master_key(key_id))
    except SkyferryError as exc:
        _fail(exc)


api_app = typer.Typer(no_args_is_help=True,
                      help="The local Prefect API that runs start and reuse "
                           "(without PREFECT_API_URL; see docs/operations.md).")
app.add_typer(api_app, name="api")


@api_app.command("status")
def api_status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Where the local API runs for this PREFECT_HOME, if it does; exit 1 if none runs."""
    from prefect.settings import get_current_settings

    from flows.local_api import find_local_api

    home = get_current_settings().home
    local = find_local_api(home)
    if as_json:
        typer.echo(json.dumps(None if local is None else {
            "url": local.url, "pid": local.pid, "started": local.started}))
    elif local is None:
        console.print(f"no local Prefect API runs for {home}")
    else:
        console.print(f"local Prefect API at {local.url} (pid {local.pid}, up "
                      f"{time.time() - local.started:.0f} s; PREFECT_HOME {home})")
    if local is None:
        raise typer.Exit(code=1)


@api_app.command("stop")
def api_stop() -> None:
    """Stop the local API of this PREFECT_HOME (the next run starts another)."""
    from prefect.settings import get_current_settings

    from flows.local_api import stop_local_api

    home = get_current_settings().home
    pid = stop_local_api(home)
    console.print(f"stopped the local Prefect API (pid {pid})" if pid is not None
                  else f"no local Prefect API runs for {home}")


if __name__ == "__main__":
    app()
