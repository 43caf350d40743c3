"""Repair: every chunk back to R replicas that hash right, checked on disk, not through
skyferry's reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import blake3
import pytest
from typer.testing import CliRunner

import skyferry
from skyferry.cli import app
from skyferry.commit.manifest import Catalog, Manifest
from skyferry.ops.export import export_dataset
from skyferry.ops.repair import repair_dataset
from skyferry.ops.verify import verify_dataset
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

runner = CliRunner()


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> Manifest:
    write_ml_csv(tmp_path / "src" / "a.csv", 6_000, seed=31)
    manifest = commit_without_prefect(tmp_path / "src", "r", chunk_size="24KB")
    assert len(manifest.chunks) >= 6
    return manifest


def _on_disk(home: Path, manifest: Manifest) -> dict[int, list[str]]:
    """Per chunk, the nodes whose file hashes to the chunk's digest (read straight off disk)."""
    good: dict[int, list[str]] = {}
    for chunk in manifest.chunks:
        good[chunk.index] = sorted(
            node.name for node in load_topology().nodes
            if (home / "nodes" / node.name / chunk.key).is_file() and blake3.blake3(
                (home / "nodes" / node.name / chunk.key).read_bytes()).hexdigest()
            == chunk.digest)
    return good


def _file(home: Path, manifest: Manifest, index: int, which: int) -> Path:
    chunk = manifest.chunks[index]
    return home / "nodes" / chunk.verified[which].node / chunk.key


def test_repair_brings_every_chunk_back_to_r_verified_replicas(
        home: Path, tmp_path: Path, committed: Manifest) -> None:
    before = tmp_path / "before.parquet"
    export_dataset("r", before)
    _file(home, committed, 0, 0).unlink()                          # one missing
    _file(home, committed, 1, 0).unlink()                          # two missing:
    _file(home, committed, 1, 1).unlink()                          # one good copy left
    rotten = _file(home, committed, 2, 0)
    rotten.write_bytes(rotten.read_bytes()[::-1])                  # changed, same size
    corrupt = _file(home, committed, 3, 1)
    corrupt.write_bytes(b"x" * 10)                                 # changed, shorter
    out = runner.invoke(app, ["repair", "r", "--deep", "--json"])
    assert out.exit_code == 0, out.output
    body = json.loads(out.output)
    assert len(body["recreated"]) == 5 and body["unrecoverable"] == [] and body["complete"]
    repaired = Catalog(load_topology().catalog_store()).manifest("r")
    on_disk = _on_disk(home, repaired)
    for chunk in repaired.chunks:
        listed = sorted(r.node for r in chunk.verified)
        assert len(listed) == 3 and on_disk[chunk.index] == listed  # hashed off the disk
        for node in load_topology().nodes:  # and no bad copy is left anywhere
            path = home / "nodes" / node.name / chunk.key
            assert not path.exists() or node.name in listed
        assert len({r.cloud for r in chunk.verified}) >= 2
    assert verify_dataset(load_topology(), "r", deep=True).healthy
    assert runner.invoke(app, ["verify", "r", "--deep"]).exit_code == 0
    after = tmp_path / "after.parquet"
    export_dataset("r", after)
    assert after.read_bytes() == before.read_bytes()


def test_a_chunk_with_no_good_copy_is_named_and_fails_the_repair(
        home: Path, committed: Manifest) -> None:
    chunk = committed.chunks[4]
    for replica in chunk.verified:
        path = home / "nodes" / replica.node / chunk.key
        path.write_bytes(path.read_bytes()[::-1])
    out = runner.invoke(app, ["repair", "r", "--deep"])
    assert out.exit_code == 1
    assert f"chunk {chunk.index}" in out.output and "unrecoverable" in out.output
    # its bad copies are left alone: nothing verified replaced them
    for replica in chunk.verified:
        assert (home / "nodes" / replica.node / chunk.key).exists()


def test_repair_stops_before_touching_a_node_that_lost_most_of_its_replicas(
        home: Path, committed: Manifest) -> None:
    node = committed.chunks[0].verified[0].node
    held = [c for c in committed.chunks if node in {r.node for r in c.verified}]
    for chunk in held[:-1]:  # all but one: the listing is not empty, the node is reachable
        (home / "nodes" / node / chunk.key).unlink()
    report = repair_dataset(load_topology(), "r")
    assert list(report.braked) == [node] and report.recreated == [] and not report.complete
    assert Catalog(load_topology().catalog_store()).manifest("r") == committed
    out = runner.invoke(app, ["repair", "r"])
    assert out.exit_code == 1 and node in out.output
    assert repair_dataset(load_topology(), "r", max_node_share=1.0).complete
    assert verify_dataset(load_topology(), "r").healthy


def test_a_hint_is_replayed_once_its_node_is_back(home: Path, committed: Manifest) -> None:
    catalog = Catalog(load_topology().catalog_store())
    chunk = committed.chunks[0]
    gone = chunk.verified[-1]
    (home / "nodes" / gone.node / chunk.key).unlink()
    # as a run records a replica it could not place: the node it wanted, as a hint
    hinted = chunk.model_copy(update={"replicas": tuple(
        r if r.node != gone.node else r.model_copy(update={"state": "hinted"})
        for r in chunk.replicas)})
    catalog.commit(committed.model_copy(update={"chunks": [hinted, *committed.chunks[1:]]}))
    report = repair_dataset(load_topology(), "r")
    assert report.hints_replayed == 1 and report.complete
    repaired = catalog.manifest("r").chunks[0]
    assert sorted(r.node for r in repaired.verified) == sorted(r.node for r in chunk.verified)
    assert [r for r in repaired.replicas if r.state == "hinted"] == []
    assert blake3.blake3((home / "nodes" / gone.node / chunk.key).read_bytes()).hexdigest() \
        == chunk.digest


def test_a_replica_an_export_failed_over_is_read_by_the_next_verify(
        home: Path, tmp_path: Path, committed: Manifest) -> None:
    """A local store keeps no checksum, so the default level cannot see changed bytes of the
    same size; an export that failed over from them leaves a note, and then it can."""
    rotten = _file(home, committed, 0, 0)
    rotten.write_bytes(rotten.read_bytes()[::-1])
    assert verify_dataset(load_topology(), "r").healthy  # unseen at the default level
    report = export_dataset("r", tmp_path / "out.parquet")
    assert len(report.failovers) == 1
    found = verify_dataset(load_topology(), "r")
    assert [(c.chunk, c.node, c.status) for c in found.damaged] == [
        (0, committed.chunks[0].verified[0].node, "differs")]
    assert repair_dataset(load_topology(), "r").complete
    assert Catalog(load_topology().catalog_store()).suspects("r") == set()
    assert verify_dataset(load_topology(), "r", deep=True).healthy


def test_repair_does_not_act_on_a_node_that_lists_empty(home: Path, committed: Manifest) -> None:
    node = committed.chunks[0].verified[0].node
    for path in sorted((home / "nodes" / node).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    out = runner.invoke(app, ["repair", "r", "--json"])
    assert out.exit_code == 3
    body = json.loads(out.output)
    assert body["recreated"] == [] and body["removed"] == []
    assert node in body["found"]["unreachable"]
    assert Catalog(load_topology().catalog_store()).manifest("r") == committed
    # the operator knows the node lost its data: its replicas are re-created elsewhere
    out = runner.invoke(app, ["repair", "r", "--lost", node, "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["recreated"]) == sum(
        1 for c in committed.chunks if node in {r.node for r in c.verified})
    assert verify_dataset(load_topology(), "r", deep=True).healthy


def test_a_node_emptied_under_its_own_marker_has_its_replicas_missing_and_repair_recreates_them(
        home: Path, committed: Manifest) -> None:
    node = committed.chunks[0].verified[0].node
    held = sum(1 for c in committed.chunks for r in c.verified if r.node == node)
    shutil.rmtree(home / "nodes" / node / "r")  # every replica gone; the node and its marker stay
    marker = json.loads((home / "nodes" / node / "_skyferry" / "node.json").read_text())
    assert marker["node"] == node
    out = runner.invoke(app, ["verify", "r", "--json"])
    assert out.exit_code == 1, out.output
    body = json.loads(out.output)
    assert body["unreachable"] == {} and body["emptied"] == [node]
    assert sorted(c["node"] for c in body["replicas"] if c["status"] == "missing") == \
        [node] * held
    out = runner.invoke(app, ["repair", "r", "--json"])  # all of one node's: no brake
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.output)["recreated"]) == held
    assert verify_dataset(load_topology(), "r", deep=True).verdict == "healthy"


def test_a_node_pointed_at_an_empty_folder_is_unreachable_and_repair_touches_nothing(
        home: Path, committed: Manifest, tmp_path: Path) -> None:
    node = committed.chunks[0].verified[0].node
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    default = (Path(skyferry.__file__).parent / "default_topology.yaml").read_text()
    assert f'"{{home}}/nodes/{node}"' in default
    topology = tmp_path / "moved.yaml"
    topology.write_text(default.replace(f'"{{home}}/nodes/{node}"', f'"{elsewhere}"'))
    out = runner.invoke(app, ["verify", "r", "--topology", str(topology)])
    assert out.exit_code == 3, out.output
    assert "no skyferry node marker" in out.output and node in out.output
    out = runner.invoke(app, ["repair", "r", "--topology", str(topology), "--json"])
    assert out.exit_code == 3, out.output
    body = json.loads(out.output)
    assert body["recreated"] == [] and body["removed"] == []
    assert list(elsewhere.rglob("*")) == []  # not a replica, not a marker
    assert Catalog(load_topology().catalog_store()).manifest("r") == committed
