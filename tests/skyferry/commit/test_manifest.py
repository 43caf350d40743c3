from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from skyferry.commit.manifest import BatchPlan, Catalog, Manifest, chunk_key
from skyferry.errors import BatchNotFoundError, ManifestQuorumError
from skyferry.models import ReplicaRecord, StoredChunk
from skyferry.storage import Store
from skyferry.topology import Node
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


def _nodes(tmp_path: Path, *specs: tuple[str, str]) -> list[Node]:
    return [Node(name=name, cloud=cloud, region="r1", url=str(tmp_path / name))
            for name, cloud in specs]


def test_a_commit_copies_the_manifest_to_every_node_holding_the_batch(tmp_path: Path) -> None:
    nodes = _nodes(tmp_path, ("n1", "aws"), ("n2", "gcp"), ("n3", "azure"))
    catalog = Catalog(Store(str(tmp_path / "cat"), name="catalog"), nodes)
    plan = _plan()
    manifest = Manifest.from_plan(plan, [_stored(plan, i) for i in range(3)])
    key = catalog.commit(manifest)
    body = (tmp_path / "cat" / key).read_bytes()
    assert (tmp_path / "n1" / key).read_bytes() == body
    assert (tmp_path / "n2" / key).read_bytes() == body
    assert not (tmp_path / "n3" / key).exists()  # it holds none of the batch
    shutil.rmtree(tmp_path / "cat")
    assert catalog.manifest("ds") == manifest  # found on the nodes
    assert catalog.datasets() == ["ds"]


def test_too_few_node_copies_commit_nothing_and_leave_no_copy(tmp_path: Path) -> None:
    nodes = _nodes(tmp_path, ("n1", "aws"), ("n2", "gcp"))
    (tmp_path / "n2").write_bytes(b"a file where the node's folder should be")
    catalog = Catalog(Store(str(tmp_path / "cat"), name="catalog"), nodes)
    plan = _plan()
    manifest = Manifest.from_plan(plan, [_stored(plan, i) for i in range(3)])
    with pytest.raises(ManifestQuorumError, match="n2") as caught:
        catalog.commit(manifest)
    assert caught.value.written == ["n1"] and set(caught.value.failed) == {"n2"}
    assert not list(tmp_path.glob("**/*.json"))  # neither the catalog's nor n1's copy
    with pytest.raises(BatchNotFoundError):
        catalog.manifest("ds")


def test_the_highest_revision_of_the_node_copies_is_read(tmp_path: Path) -> None:
    nodes = _nodes(tmp_path, ("n1", "aws"), ("n2", "gcp"))
    catalog = Catalog(Store(str(tmp_path / "cat"), name="catalog"), nodes)
    plan = _plan()
    first = Manifest.from_plan(plan, [_stored(plan, i) for i in range(3)])
    key = catalog.commit(first)
    newer = first.model_copy(update={"revision": 1, "rows_in": 99})
    (tmp_path / "n2" / key).write_bytes(newer.to_json())
    assert catalog.manifest("ds") == first  # the catalog's copy, while it reads
    (tmp_path / "cat" / key).write_bytes(b"{ torn")
    assert catalog.manifest("ds") == newer  # else the newest node copy
    (tmp_path / "n1" / key).write_bytes(b"{ torn")
    (tmp_path / "n2" / key).write_bytes(b"{ torn")
    manifests, unreadable = catalog.scan("ds")
    assert manifests == [] and [e.key for e in unreadable] == [key]


def test_a_node_the_run_knows_is_down_is_not_waited_for(tmp_path: Path) -> None:
    nodes = _nodes(tmp_path, ("n1", "aws"), ("n2", "gcp"), ("n3", "azure"))
    catalog = Catalog(Store(str(tmp_path / "cat"), name="catalog"), nodes)
    plan = _plan()
    third = ReplicaRecord(node="n3", cloud="azure", state="verified")
    chunks = [_stored(plan, i) for i in range(3)]
    chunks = [c.model_copy(update={"replicas": (*c.replicas, third)}) for c in chunks]
    key = catalog.commit(Manifest.from_plan(plan, chunks), down={"n3"})
    assert (tmp_path / "n1" / key).is_file() and (tmp_path / "n2" / key).is_file()
    assert not (tmp_path / "n3" / key).exists()  # writable, but never tried: 2 of 3 suffice
