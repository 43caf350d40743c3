"""A catalog with no single point of loss: every manifest is also kept on the nodes that hold
its batch, so losing the catalog's location, or any one cloud with it, loses nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skyferry.cli import app
from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.config import PipelineConfig
from skyferry.errors import UnsafeKeyError
from skyferry.ops.export import export_dataset
from skyferry.ops.verify import verify_dataset
from skyferry.run.batch import new_source_files
from skyferry.run.context import open_run
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

runner = CliRunner()


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> list[Manifest]:
    """Two batches of one dataset, and the export of both, taken before any loss."""
    write_ml_csv(tmp_path / "src" / "a.csv", 4_000, seed=5)
    first = commit_without_prefect(tmp_path / "src", "c", chunk_size="24KB")
    write_ml_csv(tmp_path / "src" / "b.csv", 2_000, seed=6, start_id=4_000)
    second = commit_without_prefect(tmp_path / "src", "c", chunk_size="24KB")
    export_dataset("c", tmp_path / "before.parquet")
    return [first, second]


def _copies(home: Path, key: str) -> dict[str, bytes]:
    """Every copy of a manifest, read straight off the disk: place -> bytes."""
    places = {"catalog": home / "catalog" / key}
    places.update({n.name: home / "nodes" / n.name / key for n in load_topology().nodes})
    return {name: path.read_bytes() for name, path in places.items() if path.is_file()}


def test_every_manifest_is_kept_in_the_catalog_and_on_each_node_holding_its_batch(
        home: Path, committed: list[Manifest]) -> None:
    catalog = open_catalog(load_topology())
    for manifest in committed:
        copies = _copies(home, catalog.key_of(manifest))
        assert set(copies) == {"catalog", *manifest.holders()}
        assert len(set(copies.values())) == 1  # the same bytes everywhere
        assert len({manifest.holders()[n] for n in copies if n != "catalog"}) >= 2


def test_without_the_catalog_export_verify_and_planning_read_the_node_copies(
        home: Path, tmp_path: Path, committed: list[Manifest]) -> None:
    kept = {m.batch_id: _copies(home, open_catalog(load_topology()).key_of(m))["catalog"]
            for m in committed}
    shutil.rmtree(home / "catalog")
    export_dataset("c", tmp_path / "after.parquet")
    assert (tmp_path / "after.parquet").read_bytes() == (tmp_path / "before.parquet"
                                                         ).read_bytes()
    # the incremental listing still knows both files: nothing is ingested twice
    setup = open_run(PipelineConfig(source=str(tmp_path / "src"), dataset="c"))
    assert new_source_files(setup).files == []
    found = verify_dataset(load_topology(), "c")
    assert found.damaged == []
    assert sorted((c.place, c.status) for c in found.damaged_copies) == [
        ("catalog", "missing"), ("catalog", "missing")]
    assert runner.invoke(app, ["verify", "c"]).exit_code == 1
    out = runner.invoke(app, ["repair", "c", "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["copies_restored"]) == 2
    for manifest in committed:  # the catalog's own copy is back, byte for byte
        key = open_catalog(load_topology()).key_of(manifest)
        assert (home / "catalog" / key).read_bytes() == kept[manifest.batch_id]
    assert runner.invoke(app, ["verify", "c", "--deep"]).exit_code == 0


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
@pytest.mark.parametrize("with_catalog", [False, True])
def test_losing_any_one_cloud_loses_nothing(home: Path, tmp_path: Path,
                                            committed: list[Manifest], cloud: str,
                                            with_catalog: bool) -> None:
    for node in load_topology().nodes:
        if node.cloud == cloud:
            shutil.rmtree(home / "nodes" / node.name, ignore_errors=True)
    if with_catalog:  # the catalog's location was in the lost cloud
        shutil.rmtree(home / "catalog")
    export_dataset("c", tmp_path / "after.parquet")
    assert (tmp_path / "after.parquet").read_bytes() == (tmp_path / "before.parquet"
                                                         ).read_bytes()


def test_a_damaged_node_copy_is_found_and_rewritten(home: Path,
                                                    committed: list[Manifest]) -> None:
    manifest = committed[0]
    key = open_catalog(load_topology()).key_of(manifest)
    node = sorted(manifest.holders())[0]
    copy = home / "nodes" / node / key
    copy.write_bytes(copy.read_bytes().replace(b'"rows_in"', b'"rows_xx"'))  # same size
    for deep in (False, True):  # every copy is read and parsed, at either level
        found = verify_dataset(load_topology(), "c", deep=deep)
        assert [(c.place, c.status, c.detail) for c in found.damaged_copies] == [
            (node, "differs", "not a valid manifest")]
    assert runner.invoke(app, ["repair", "c", "--deep"]).exit_code == 0
    assert copy.read_bytes() == (home / "catalog" / key).read_bytes()


def test_a_dataset_name_the_nodes_use_is_refused(home: Path, tmp_path: Path) -> None:
    for name in ("manifests", "_probe"):
        with pytest.raises(UnsafeKeyError, match="reserved"):
            open_run(PipelineConfig(source=str(tmp_path), dataset=name))
