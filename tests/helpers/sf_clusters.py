"""A batch through a Dask or Ray cluster whose worker dies mid-chunk, checked end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog
from skyferry.config import PipelineConfig, get_settings
from skyferry.storage import Store
from tests.helpers.sf_data import replica_digest, write_ml_csv


def run_with_a_worker_killed(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             runner: str, address: str, dataset: str, seed: int) -> None:
    """A batch on the cluster at ``address`` (``SKYFERRY_TASK_RUNNER=runner``) whose worker
    process dies in the middle of a chunk (``tests.helpers.sf_faults:kill_own_process_once``;
    the workers' ``$SF_KILL_MARKER`` is ``tmp_path/killed``): the batch commits once, every
    chunk on 3 verified replicas whose bytes hash as the manifest says."""
    source = tmp_path / "train.csv"
    rows = write_ml_csv(source, 8_000, seed=seed)
    monkeypatch.setenv("SKYFERRY_TASK_RUNNER", runner)
    monkeypatch.setenv(f"SKYFERRY_{runner.upper()}_ADDRESS", address)
    get_settings.cache_clear()
    result = run_pipeline(PipelineConfig(
        source=str(source), dataset=dataset, chunk_size="64KB",
        transforms=["tests.helpers.sf_faults:kill_own_process_once"]))
    assert result.status == "completed", result.error
    assert (tmp_path / "killed").exists()  # a worker died in the middle of a chunk
    catalog = Catalog(Store(f"{home}/catalog", name="catalog"))
    (manifest,) = catalog.manifests(dataset)
    assert sorted(c.index for c in manifest.chunks) == list(range(len(manifest.chunks)))
    assert manifest.rows_stored + manifest.rows_rejected == rows
    for chunk in manifest.chunks:
        assert len(chunk.verified) == 3
        for replica in chunk.verified:
            assert replica_digest(home, replica.node, chunk.key) == chunk.digest
