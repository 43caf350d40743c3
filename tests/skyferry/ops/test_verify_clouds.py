"""Verify against the S3, GCS and Azure servers: the default level reads no data, and still
sees a replica whose bytes changed, through the store's own checksum."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyferry.ops.verify import verify_dataset
from skyferry.topology import load_topology
from tests.helpers import sf_servers
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

pytestmark = pytest.mark.clouds


def test_the_default_level_sees_changed_bytes_through_the_stores_checksum(
        clouds: sf_servers.CloudEnv, home: Path, tmp_path: Path) -> None:
    path = clouds.topology(tmp_path / "clouds.yaml", home / "catalog",
                           [("s3-node", "s3", "aws"), ("az-node", "az", "azure"),
                            ("gs-node", "gs", "gcp")])
    write_ml_csv(tmp_path / "src" / "a.csv", 3_000, seed=5)
    manifest = commit_without_prefect(tmp_path / "src", "vc", chunk_size="32KB",
                                      topology=str(path), source_cloud="aws")
    topology = load_topology(str(path))
    clean = verify_dataset(topology, "vc")
    assert clean.healthy and clean.bytes_read == 0  # checksums and sizes only
    assert all(c.md5 for c in manifest.chunks)

    changed, gone = manifest.chunks[0], manifest.chunks[1]
    s3 = topology.node("s3-node").open_store()
    original = s3.get(changed.key)
    s3.put(changed.key, bytes(b ^ 0x01 for b in original))  # same size, other bytes
    az = topology.node("az-node").open_store()
    az.delete(gone.key)

    report = verify_dataset(topology, "vc")
    damaged = {(c.chunk, c.node): c.status for c in report.damaged}
    assert damaged[(changed.index, "s3-node")] == "differs"
    assert damaged[(gone.index, "az-node")] == "missing"
    assert report.bytes_read == 0
    deep = verify_dataset(topology, "vc", deep=True)
    assert {(c.chunk, c.node): c.status for c in deep.damaged} == damaged
