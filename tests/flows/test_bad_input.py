"""Bad input: a typed error naming the thing and the stage, and nothing half-committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import multicloud_pipeline, run_pipeline
from skyferry.config import PipelineConfig
from skyferry.errors import (
    EmptySourceError,
    FormatError,
    InsufficientNodesError,
    SourceNotFoundError,
    StageError,
    TopologyError,
    UnsafeKeyError,
    ZeroByteFileError,
)
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _nothing_visible(home: Path) -> None:
    manifests = home / "catalog" / "manifests"
    assert not manifests.exists() or not any(manifests.rglob("*.json"))


def _cause(config: PipelineConfig) -> tuple[StageError, BaseException]:
    with pytest.raises(StageError) as info:
        multicloud_pipeline(config)
    assert info.value.__cause__ is not None
    return info.value, info.value.__cause__


def test_missing_source(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "data.csv"
    result = run_pipeline(PipelineConfig(source=str(missing), dataset="d"))
    assert result.status == "failed" and result.error_stage == "ingestion"
    assert str(missing) in (result.error or "")
    err, cause = _cause(PipelineConfig(source=str(missing), dataset="d"))
    assert isinstance(cause, SourceNotFoundError) and err.stage == "ingestion"
    _nothing_visible(home)


def test_empty_source_and_zero_byte_file(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _, cause = _cause(PipelineConfig(source=f"{empty}/*.csv", dataset="d"))
    assert isinstance(cause, EmptySourceError) and str(empty) in str(cause)
    (empty / "zero.csv").write_bytes(b"")
    _, cause = _cause(PipelineConfig(source=str(empty), dataset="d"))
    assert isinstance(cause, ZeroByteFileError) and "zero.csv" in str(cause)
    _nothing_visible(home)


def test_wrong_format(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    write_ml_csv(src, 50, seed=1)
    _, cause = _cause(PipelineConfig(source=str(src), dataset="d", format="parquet"))
    assert isinstance(cause, FormatError) and "a.csv" in str(cause) and "Parquet" in str(cause)
    _nothing_visible(home)


def test_invalid_topology(home: Path, tmp_path: Path) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text("nodes:\n  - {name: a, cloud: aws, url: /tmp/x}\n  - {name: a, cloud: gcp,"
                    " region: r, url: /tmp/y}\n")
    err, cause = _cause(PipelineConfig(source=str(tmp_path), dataset="d", topology=str(topo)))
    assert isinstance(cause, TopologyError) and err.stage == "setup"
    assert "nodes.0.region" in str(cause) and str(topo) in str(cause)


def test_too_few_healthy_nodes_for_the_quorum(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload" * 10)
    topo = tmp_path / "topo.yaml"
    topo.write_text(f"""
catalog: "{home}/catalog"
nodes:
  - {{name: a1, cloud: aws, region: r, url: "{home}/nodes/a1"}}
  - {{name: a2, cloud: aws, region: r, url: "{home}/nodes/a2", enabled: false}}
  - {{name: g1, cloud: gcp, region: r, url: "{tmp_path}/a.bin/not-a-dir"}}
""")
    err, cause = _cause(PipelineConfig(source=str(src), dataset="d", topology=str(topo)))
    assert isinstance(cause, InsufficientNodesError)
    assert cause.healthy == 1 and cause.required == 2 and "a2" in str(cause)
    assert "g1" in str(cause)
    _nothing_visible(home)
    assert src.read_bytes() == b"payload" * 10  # the source is untouched


@pytest.mark.parametrize("dataset", ["../escape", "a/../../b", "..", "ok/../.."])
def test_a_key_that_escapes_its_prefix(home: Path, tmp_path: Path, dataset: str) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"x")
    err, cause = _cause(PipelineConfig(source=str(src), dataset=dataset))
    assert isinstance(cause, UnsafeKeyError) and err.stage == "setup"
    assert not (tmp_path / "escape").exists()
    _nothing_visible(home)


def test_a_hostile_batch_id(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"x")
    _, cause = _cause(PipelineConfig(source=str(src), dataset="d", batch_id="../../etc"))
    assert isinstance(cause, UnsafeKeyError)


def test_malformed_rows_are_rejected_not_fatal(home: Path, tmp_path: Path,
                                               schema_file: Path) -> None:
    src = tmp_path / "a.csv"
    write_ml_csv(src, 100, seed=3, bad_rows=True)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="d",
                                         schema_path=str(schema_file)))
    assert result.status == "completed"
    assert (result.rows_in, result.rows_stored, result.rows_rejected) == (102, 100, 2)
