"""Manifest copies that disagree are a conflict, not a choice.

One node's copy of a batch's manifest is rewritten with a higher revision and only half of
its chunks, and the catalog is then lost: no reader picks either copy, verify fails, repair
leaves the batch alone, and gc deletes nothing that any copy claims.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.errors import ManifestConflictError
from skyferry.ops.export import DatasetReader, export_dataset
from skyferry.ops.gc import collect_garbage
from skyferry.ops.repair import repair_dataset
from skyferry.ops.verify import verify_dataset
from skyferry.read.reader import ReaderConfig, TrainingReader
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv


@pytest.fixture
def tampered(home: Path, tmp_path: Path) -> tuple[Manifest, str, dict[str, bytes]]:
    """The batch's manifest, the node whose copy was rewritten, and every data file."""
    write_ml_csv(tmp_path / "src" / "a.csv", 6_000, seed=7)
    manifest = commit_without_prefect(tmp_path / "src", "c", chunk_size="24KB")
    assert len(manifest.chunks) >= 6
    key = open_catalog(load_topology()).key_of(manifest)
    node = sorted(manifest.holders())[0]
    half = manifest.model_copy(update={"chunks": manifest.chunks[:len(manifest.chunks) // 2],
                                       "revision": manifest.revision + 5})
    (home / "nodes" / node / key).write_bytes(half.to_json())
    shutil.rmtree(home / "catalog" / "manifests")
    data = {str(p): p.read_bytes() for p in (home / "nodes").rglob("*.parquet")}
    return manifest, node, data


def test_readers_raise_a_typed_error_naming_the_batch_and_the_copies(
        tampered: tuple[Manifest, str, dict[str, bytes]], tmp_path: Path) -> None:
    manifest, node, _ = tampered
    for read in (lambda: DatasetReader("c").read_table(),
                 lambda: export_dataset("c", tmp_path / "out.parquet"),
                 lambda: TrainingReader(ReaderConfig("c")).manifests()):
        with pytest.raises(ManifestConflictError) as info:
            read()
        assert info.value.batch_id == manifest.batch_id
        assert node in info.value.places and len(info.value.places) >= 2
        assert manifest.batch_id in str(info.value) and node in str(info.value)
    assert not (tmp_path / "out.parquet").exists()


def test_verify_fails_and_repair_and_gc_touch_nothing(
        home: Path, tampered: tuple[Manifest, str, dict[str, bytes]]) -> None:
    manifest, node, data = tampered
    report = verify_dataset(load_topology(), "c")
    assert not report.healthy  # `skyferry verify` exits 1
    conflicts = [c for c in report.damaged_copies if c.detail.startswith("conflict")]
    assert conflicts and all(c.status == "differs" for c in conflicts)
    assert report.orphans == []  # no chunk of either copy is called unclaimed

    repaired = repair_dataset(load_topology(), "c")
    assert any("disagree" in line for line in repaired.copies_failed)
    assert repaired.recreated == [] and repaired.removed == []

    swept = collect_garbage(load_topology(), grace_s=0, dry_run=True)
    assert swept.deleted == []
    collect_garbage(load_topology(), grace_s=0)
    assert {str(p): p.read_bytes() for p in (home / "nodes").rglob("*.parquet")} == data
