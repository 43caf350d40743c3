"""Typed configuration: the environment settings object and the flow's parameters.

Nothing else in skyferry reads ``os.environ``; it asks :func:`get_settings`.

Examples::

    >>> parse_size("64MB")
    64000000
    >>> parse_size("1MiB")
    1048576
    >>> PipelineConfig(source="data/*.csv", dataset="train").chunk_size
    536870912
    >>> parse_duration("1d"), parse_duration("90"), parse_duration("1.5h")
    (86400.0, 90.0, 5400.0)
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "Format",
    "PipelineConfig",
    "Settings",
    "describe_validation_error",
    "get_settings",
    "parse_duration",
    "parse_size",
]

Format = Literal["auto", "csv", "jsonl", "parquet", "binary"]
# Large enough that Prefect's cost per chunk (a task run) is under 2% of a run's time, and
# free to be: a chunk streams in blocks, so memory does not grow with it (docs/benchmarks.md).
DEFAULT_CHUNK_SIZE = 512 * 1024 * 1024

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Parse ``65536``, ``"64MB"`` (decimal) or ``"64MiB"`` (binary) into bytes."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"invalid size {value!r}: use bytes or units like 64MB, 64MiB, 1GB")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """Parse ``"90"`` (seconds), ``"15m"``, ``"1h"`` or ``"1d"`` into seconds."""
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"invalid duration {value!r}: use seconds or units like 90s, 15m, 1h, "
                         "1d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


class Settings(BaseSettings):
    """Environment settings (prefix ``SKYFERRY_``)."""

    model_config = SettingsConfigDict(env_prefix="SKYFERRY_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".skyferry",
        description="Data directory: the catalog and the default nodes' folders.",
    )
    max_workers: int = Field(default=4, ge=1, description="Task runner threads.")
    max_in_flight: int = Field(
        default=4, ge=1, description="Chunks in flight at once; bounds memory."
    )
    retry_delays: list[float] = Field(
        default=[1.0, 4.0, 16.0], description="Backoff between retries of I/O tasks."
    )
    retry_jitter: float = Field(
        default=0.5, ge=0,
        description="Prefect's retry_jitter_factor for those retries: a delay d becomes a "
                    "random delay of at most d × (1 + this) averaging d, so tasks that failed "
                    "together do not retry together.")
    probe_timeout_s: float = Field(default=5.0, gt=0, description="Node probe timeout.")
    chunks_per_task: int = Field(
        default=4, ge=1,
        description="On a Dask or Ray cluster, chunks one task run moves in turn (journaling "
                    "each): "
                    "Prefect's cost per task run is paid once for them.")
    task_runner: Literal["threads", "dask", "ray"] = Field(
        default="threads", description="Task runner of the chunk stages; see docs/operations.md."
    )
    block_size: int = Field(
        default=4 << 20, ge=64 << 10,
        description="A chunk streams through read, hash, process and write in blocks of about "
                    "this many bytes: memory is chunks in flight times a few blocks, whatever "
                    "the chunk size.")
    tune_malloc: bool = Field(
        default=True,
        description="Keep big buffers' memory in the process (glibc mallopt), so each chunk "
                    "does not fault in fresh pages; see skyferry/memory.py.",
    )
    probe_interval_s: float = Field(
        default=1.0, ge=0,
        description="During a run, each node is probed this often by the failure detector "
                    "(skyferry/distribute/detector.py); 0 turns it off.")
    durable_writes: bool = Field(
        default=True,
        description="Flush (fsync) each local replica, manifest and journal entry, and its "
                    "folder, before it counts. false is only for data you can re-create: a "
                    "power loss can then lose replicas counted as verified.")
    dask_address: str | None = Field(
        default=None, description="Dask scheduler to use; a local cluster when unset."
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (the head's host:port); a local Ray "
        "when unset.")
    prefect_api: Literal["local", "ephemeral"] = Field(
        default="local",
        description="Without PREFECT_API_URL: 'local' starts one Prefect API server per "
                    "PREFECT_HOME that later runs reuse (flows/local_api.py); 'ephemeral' is "
                    "Prefect's temporary server in every process.")
    prefect_api_idle_s: float = Field(
        default=900.0, gt=0,
        description="The local Prefect API server exits after this many seconds unused.")

    @property
    def catalog_url(self) -> str:
        return str(self.home / "catalog")


def describe_validation_error(exc: ValidationError) -> str:
    """``field.path: message; ...`` without the offending values (they may be secrets)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
        for e in exc.errors())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# Bytes, or a string with units; the JSON schema (a deployment's parameter form) takes both.
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 1},
              {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[A-Za-z]*\s*$"}],
    "title": "Size", "description": "Bytes, or units: 64MB, 64MiB, 1GB"})]


class PipelineConfig(BaseModel):
    """Parameters of one run of ``multicloud-pipeline``."""

    source: str = Field(..., description="fsspec URL or local path, with an optional glob.")
    dataset: str = Field(..., description="Dataset name; the first level of the layout.")
    topology: str | None = Field(
        default=None, description="Topology YAML file; the embedded default when unset."
    )
    batch_id: str | None = Field(
        default=None, description="Batch id; derived from the source listing when unset."
    )
    format: Format = Field(default="auto", description="Input format; auto uses extensions.")
    chunk_size: Size = Field(default=DEFAULT_CHUNK_SIZE, description="Target chunk size.")
    replicas: int = Field(default=3, ge=1, description="Replication factor.")
    quorum: int = Field(default=2, ge=1, description="Verified replicas a chunk needs.")
    min_clouds: int = Field(
        default=2, ge=1,
        description="Clouds a chunk's verified replicas must span (at most the topology's "
                    "clouds), so that losing one cloud loses no committed chunk. 1 takes "
                    "availability instead: the manifest then lists the chunks at risk.")
    strict: bool = Field(
        default=False, description="Fail the run on a source file that cannot be taken (empty, "
        "a dangling or directory symlink, a name that is not UTF-8) instead of passing it over "
        "and naming it in the result.")
    transforms: list[str] = Field(
        default_factory=list, description="DataFrame -> DataFrame functions, module:function."
    )
    schema_path: str | None = Field(default=None, description="Schema YAML file.")
    tables: list[Literal["iceberg", "delta"]] = Field(
        default_factory=list, description="After the commit, publish the new snapshot as these "
        "tables for other engines (skyferry/ops/tables.py; the [tables] extra).")
    source_cloud: str | None = Field(
        default=None, description="Cloud of a local source; inferred from the URL otherwise."
    )
    source_options: dict[str, object] = Field(
        default_factory=dict, description="fsspec storage options for the source."
    )
    dispatch: Literal["auto", "deployments", "in-process"] = Field(
        default="auto",
        description="How cloud shares run: child deployments on the clouds' work pools, or "
                    "in-process subflows. auto: deployments when this run is itself deployed.",
    )
    max_egress_usd: float | None = Field(
        default=None, ge=0,
        description="Refuse the run, before anything is written, when its plan's egress "
                    "(skyferry plan) costs more than this many USD.",
    )
    work_units: Literal["flow", "fixed"] = Field(
        default="flow",
        description="Deployed: 'flow' cuts the batch into small units that children claim "
                    "as they go, taking other clouds' units when their own run out; 'fixed' "
                    "gives each child one share of its cloud's bytes at the start and no "
                    "stealing (a baseline to compare with).",
    )
    claim_ttl_s: float = Field(
        default=60.0, gt=0,
        description="A child's claim on a unit of work expires this long after its last "
                    "renewal (it renews every third of it); another child then takes the unit.",
    )
    encrypt: bool | None = Field(
        default=None,
        description="Encrypt what the run stores (AES-256-GCM, a data key per chunk wrapped by "
                    "the master keys); None: as the topology's encryption says.")
    master_keys: str | None = Field(
        default=None,
        description="Where the master keys are (file:PATH, env:VARIABLE or block:NAME); "
                    "replaces the topology's encryption.master_keys.")
    child_start_timeout_s: float = Field(
        default=120.0, gt=0,
        description="A child run no worker picked up within this time is cancelled, and its "
                    "share goes to another pool.",
    )

    @field_validator("transforms")
    @classmethod
    def _check_transforms(cls, value: list[str]) -> list[str]:
        for item in value:
            if ":" not in item:
                raise ValueError(f"transform {item!r} must be module:function")
        return value

    @model_validator(mode="after")
    def _check_quorum(self) -> PipelineConfig:
        if self.quorum > self.replicas:
            raise ValueError(f"quorum {self.quorum} exceeds replicas {self.replicas}")
        return self
