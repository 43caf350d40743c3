"""A 1 GB end-to-end run (marked slow: `make test-slow`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import run_pipeline
from skyferry.config import PipelineConfig
from skyferry.ops.export import export_dataset
from tests.helpers.sf_data import replica_digest

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def test_one_gigabyte_binary_end_to_end(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "big.bin"
    src.parent.mkdir()
    rng = np.random.default_rng(1)
    digest = hashlib.sha256()
    with open(src, "wb") as fh:
        for _ in range(16):
            block = rng.bytes(64 * 1000 * 1000)
            digest.update(block)
            fh.write(block)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="big", chunk_size="64MB"))
    assert result.status == "completed", result.error
    assert result.chunks_processed == 16 and result.bytes_stored == 1_024_000_000
    from skyferry.commit.manifest import Catalog
    from skyferry.topology import load_topology

    (manifest,) = Catalog(load_topology().catalog_store()).manifests("big")
    for chunk in manifest.chunks:
        assert len(chunk.verified) == 3
        for r in chunk.verified:
            assert replica_digest(home, r.node, chunk.key) == chunk.digest
    out = tmp_path / "restored"
    export_dataset("big", out)
    restored = hashlib.sha256()
    with open(out / "big.bin", "rb") as fh:
        while block := fh.read(1 << 24):
            restored.update(block)
    assert restored.hexdigest() == digest.hexdigest()


def test_one_gigabyte_csv_end_to_end(home: Path, tmp_path: Path) -> None:
    from importlib import resources

    from skyferry.ops.demo import BAD_ROWS, generate_dataset

    generate_dataset(tmp_path / "csv", total_bytes=1_000_000_000, files=4)
    schema = resources.files("skyferry").joinpath("schemas/demo.yaml")
    result = run_pipeline(PipelineConfig(source=f"{tmp_path}/csv/*.csv", dataset="big-csv",
                                         chunk_size="64MB", schema_path=str(schema)))
    assert result.status == "completed", result.error
    assert result.rows_rejected == len(BAD_ROWS)
    assert result.rows_in == result.rows_stored + result.rows_rejected
    out = tmp_path / "out.parquet"
    report = export_dataset("big-csv", out)
    assert report.rows == result.rows_stored
