from __future__ import annotations

from pathlib import Path

import pytest

from skyferry.commit.manifest import BatchPlan, Catalog, Manifest, chunk_key
from skyferry.errors import BatchNotFoundError
from skyferry.models import ReplicaRecord, StoredChunk
from skyferry.storage import Store
from tests.helpers.sf_data import small_plan


def _plan() -> BatchPlan:
    return small_plan("ds", 3, "csv")


def _stored(plan: BatchPlan, i: int) -> StoredChunk:
    c = plan.chunks[i]
    return StoredChunk(index=i, key=plan.key(c), format="csv", digest=f"{i:064d}", size=100 + i,
                       source_digest="0" * 64, rows_in=10, rows_out=9, rows_rejected=1,
                       rejects_key=None, parts=c.parts,
                       replicas=(ReplicaRecord(node="n1", cloud="aws", state="verified"),
                                 ReplicaRecord(node="n2", cloud="gcp", state="verified")))


def test_pending_batch_is_invisible_until_commit(tmp_path: Path) -> None:
    catalog = Catalog(Store(str(tmp_path / "cat"), name="catalog"))
    plan = _plan()
    catalog.save_plan(plan)
    catalog.record_chunk(plan, _stored(plan, 0))
    with pytest.raises(BatchNotFoundError):
        catalog.manifest("ds")
    assert set(catalog.done_chunks("ds", "b1")) == {0}
    assert catalog.load_plan("ds", "b1") == plan

    manifest = Manifest.from_plan(plan, [_stored(plan, i) for i in (2, 0, 1)])
    key = catalog.commit(manifest)
    catalog.drop_pending("ds", "b1")
    assert key == "manifests/ds/date=2026-11-22/batch=b1.json"
    loaded = catalog.manifest("ds", "b1")
    assert loaded == manifest
    assert [c.index for c in loaded.chunks] == [0, 1, 2]
    assert (loaded.rows_in, loaded.rows_stored, loaded.rows_rejected) == (30, 27, 3)
    assert loaded.bytes_stored == 303
    assert catalog.load_plan("ds", "b1") is None
    leftovers = [p.name for p in (tmp_path / "cat").rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


def test_layout_is_dataset_date_batch() -> None:
    assert chunk_key("ds", "2026-11-22", "b1", 7, "csv") == \
        "ds/date=2026-11-22/batch=b1/chunk-00007.parquet"
    assert chunk_key("ds", "2026-11-22", "b1", 7, "binary").endswith("chunk-00007.bin")
