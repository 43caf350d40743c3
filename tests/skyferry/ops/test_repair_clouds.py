"""Repair, and the loss of the catalog or of a whole cloud, against the S3, GCS and Azure
servers: checked by hashing the objects through fsspec, not through skyferry's reader."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import blake3
import fsspec
import pytest

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.ops.export import export_dataset
from skyferry.ops.repair import repair_dataset
from skyferry.ops.verify import verify_dataset
from skyferry.topology import Topology, load_topology
from tests.helpers import sf_servers
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

pytestmark = pytest.mark.clouds

NODES = (("s3-a", "s3", "aws"), ("s3-b", "s3", "aws"), ("gs-a", "gs", "gcp"),
         ("gs-b", "gs", "gcp"), ("az-a", "az", "azure"))


@pytest.fixture
def on_clouds(clouds: sf_servers.CloudEnv, home: Path, tmp_path: Path
              ) -> tuple[Topology, Manifest]:
    path = clouds.topology(tmp_path / "clouds.yaml", home / "catalog", NODES)
    write_ml_csv(tmp_path / "src" / "a.csv", 3_000, seed=8)
    manifest = commit_without_prefect(tmp_path / "src", "rc", chunk_size="24KB",
                                      topology=str(path), source_cloud="aws")
    assert len(manifest.chunks) >= 4
    topology = load_topology(str(path))
    export_dataset("rc", tmp_path / "before.parquet", topology=topology)
    return topology, manifest


def _fs(clouds: sf_servers.CloudEnv, topology: Topology, node: str) -> tuple[Any, str]:
    """fsspec straight to the node's bucket (not skyferry's Store), and the node's root."""
    url = topology.node(node).url
    protocol = url.split("://")[0]
    fs = fsspec.filesystem(protocol, **clouds.options(protocol), skip_instance_cache=True)
    return fs, url.split("://")[1]


def _same_export(topology: Topology, tmp_path: Path, name: str) -> bool:
    export_dataset("rc", tmp_path / name, topology=topology)
    return (tmp_path / name).read_bytes() == (tmp_path / "before.parquet").read_bytes()


def test_repair_on_the_cloud_servers(clouds: sf_servers.CloudEnv, tmp_path: Path, home: Path,
                                     on_clouds: tuple[Topology, Manifest]) -> None:
    topology, manifest = on_clouds
    for index, which in ((0, 0), (1, 0), (1, 1), (2, 2)):  # chunk 1: one good copy left
        chunk = manifest.chunks[index]
        node = chunk.verified[which].node
        fs, root = _fs(clouds, topology, node)
        fs.rm_file(f"{root}/{chunk.key}")
    rotten = manifest.chunks[3]
    fs, root = _fs(clouds, topology, rotten.verified[0].node)
    fs.pipe_file(f"{root}/{rotten.key}", bytes(b ^ 1 for b in fs.cat_file(
        f"{root}/{rotten.key}")))  # same size: the store's checksum sees it
    shutil.rmtree(home / "catalog")  # and the catalog with it

    found = verify_dataset(topology, "rc")
    assert len(found.damaged) == 5 and found.bytes_read == 0
    assert {c.place for c in found.damaged_copies} == {"catalog"}
    report = repair_dataset(topology, "rc", max_node_share=1.0)  # few chunks: brakes off
    assert report.complete and report.unrecoverable == [] and len(report.recreated) == 5
    repaired = open_catalog(topology).manifest("rc")
    for chunk in repaired.chunks:
        assert len(chunk.verified) == 3 and len({r.cloud for r in chunk.verified}) >= 2
        for replica in chunk.verified:  # hashed off the server
            fs, root = _fs(clouds, topology, replica.node)
            assert blake3.blake3(fs.cat_file(f"{root}/{chunk.key}")).hexdigest() \
                == chunk.digest
    key = open_catalog(topology).key_of(repaired)
    assert Manifest.model_validate_json((home / "catalog" / key).read_bytes()) == repaired
    assert verify_dataset(topology, "rc", deep=True).healthy
    assert _same_export(topology, tmp_path, "after.parquet")

    # a hint: a replica a run could not place is written once its node answers
    chunk = repaired.chunks[0]
    gone = chunk.verified[-1]
    fs, root = _fs(clouds, topology, gone.node)
    fs.rm_file(f"{root}/{chunk.key}")
    hinted = chunk.model_copy(update={"replicas": tuple(
        r.model_copy(update={"state": "hinted"}) if r == gone else r for r in chunk.replicas)})
    open_catalog(topology).commit(repaired.model_copy(update={
        "chunks": [hinted, *repaired.chunks[1:]], "revision": repaired.revision + 1}))
    report = repair_dataset(topology, "rc")
    assert report.complete and report.hints_replayed == 1
    assert blake3.blake3(fs.cat_file(f"{root}/{chunk.key}")).hexdigest() == chunk.digest


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_losing_one_cloud_and_the_catalog_on_the_servers(
        clouds: sf_servers.CloudEnv, tmp_path: Path, home: Path, cloud: str,
        on_clouds: tuple[Topology, Manifest]) -> None:
    topology, _ = on_clouds
    for node in (n for n in topology.nodes if n.cloud == cloud):
        fs, root = _fs(clouds, topology, node.name)
        fs.rm(root, recursive=True)
        assert fs.find(root) == []
    shutil.rmtree(home / "catalog")
    assert _same_export(topology, tmp_path, "after.parquet")
