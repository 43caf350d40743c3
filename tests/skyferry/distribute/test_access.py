"""Replica access (skyferry/distribute/access.py) on a local disk and on the S3, GCS and Azure
servers: a replica corrupted mid-file, one cut short, one missing and one whose read fails
halfway through its stream. Export, the training reader and repair each get only verified
bytes, and each bad replica is recorded once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blake3
import fsspec
import pyarrow as pa
import pytest

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.distribute import access
from skyferry.ops.export import export_dataset
from skyferry.ops.repair import repair_dataset
from skyferry.ops.verify import verify_dataset
from skyferry.read.reader import ReaderConfig, TrainingReader
from skyferry.storage import Store
from skyferry.storage.errors import translate
from skyferry.topology import Topology, load_topology
from tests.helpers import sf_servers
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

BLOCK = 4096  # small blocks, so that a chunk streams in several


def _topology(tmp_path: Path, home: Path, backend: str,
              clouds: sf_servers.CloudEnv | None) -> Path:
    nodes = [(f"n{i}", backend, cloud) for i, cloud in enumerate(("aws", "gcp", "azure"))]
    path = tmp_path / "topology.yaml"
    if backend != "local":
        assert clouds is not None  # bucket names take 3 characters or more
        return clouds.topology(path, home / "catalog", nodes, bucket=lambda n: f"access-{n}")
    path.write_text(f'catalog: "{home}/catalog"\nnodes:\n' + "".join(
        f'  - {{name: {name}, cloud: {cloud}, region: r, url: "{home}/nodes/{name}"}}\n'
        for name, _, cloud in nodes))
    return path


def _fs(topology: Topology, node: str, clouds: sf_servers.CloudEnv | None
        ) -> tuple[Any, str]:
    """fsspec straight to the node (not skyferry's Store), and the node's root."""
    url = topology.node(node).url
    if "://" not in url:
        return fsspec.filesystem("file"), url
    protocol, root = url.split("://")
    assert clouds is not None
    return fsspec.filesystem(protocol, **clouds.options(protocol),
                             skip_instance_cache=True), root


@pytest.fixture(params=["local", "s3", "gs", "az"])
def damaged(request: pytest.FixtureRequest, home: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A committed dataset of 3 replicas per chunk with the first replica of chunks 0-3
    damaged four ways, and the export of it before the damage."""
    backend = request.param
    clouds = None
    if backend != "local":
        clouds = request.getfixturevalue("clouds")
        request.applymarker(pytest.mark.clouds)
    path = _topology(tmp_path, home, backend, clouds)
    write_ml_csv(tmp_path / "src" / "a.csv", 3_000, seed=31)
    manifest = commit_without_prefect(tmp_path / "src", "acc", chunk_size="24KB",
                                      topology=str(path), replicas=3, quorum=3)
    assert len(manifest.chunks) >= 4 and all(len(c.verified) == 3 for c in manifest.chunks)
    assert all(c.size > 2 * BLOCK for c in manifest.chunks[:4])
    topology = load_topology(str(path))
    before = tmp_path / "before.parquet"
    export_dataset("acc", before, topology=topology)

    bad: dict[int, str] = {}
    for index in range(3):
        chunk = manifest.chunks[index]
        node = bad[index] = chunk.verified[0].node
        fs, root = _fs(topology, node, clouds)
        target = f"{root}/{chunk.key}"
        data = fs.cat_file(target)
        if index == 0:  # corrupted mid-file: the same size, one byte flipped
            mid = len(data) // 2
            fs.pipe_file(target, data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
        elif index == 1:  # cut short
            fs.pipe_file(target, data[:len(data) // 2])
        else:  # missing
            fs.rm_file(target)
    # chunk 3: its first replica is whole, but a read of it fails after its first block
    broken = manifest.chunks[3]
    bad[3] = broken.verified[0].node
    get = Store.get

    def failing_get(self: Store, key: str, start: int | None = None,
                    end: int | None = None) -> bytes:
        if self.name == bad[3] and key == broken.key and start:
            raise translate(ConnectionResetError("connection reset (injected)"), self.name,
                            key, "read")
        return get(self, key, start, end)

    monkeypatch.setattr(Store, "get", failing_get)
    monkeypatch.setattr(access, "BLOCK", BLOCK)
    return {"topology": topology, "manifest": manifest, "bad": bad, "before": before,
            "clouds": clouds}


def _suspects(topology: Topology, manifest: Manifest) -> set[tuple[int, str]]:
    found = open_catalog(topology).suspects("acc")
    assert {b for b, _, _ in found} <= {manifest.batch_id}
    return {(chunk, node) for _, chunk, node in found}


def test_export_read_and_repair_get_only_verified_bytes(damaged: dict[str, Any],
                                                        tmp_path: Path) -> None:
    topology: Topology = damaged["topology"]
    manifest: Manifest = damaged["manifest"]
    bad: dict[int, str] = damaged["bad"]
    expected = set(bad.items())

    # export: byte for byte the export before the damage; one failover per damaged chunk
    report = export_dataset("acc", tmp_path / "after.parquet", topology=topology)
    assert (tmp_path / "after.parquet").read_bytes() == damaged["before"].read_bytes()
    assert len(report.failovers) == 4
    for index, node in bad.items():
        (line,) = [f for f in report.failovers if f.startswith(f"chunk {index} ")]
        assert f"={manifest.batch_id}: {node}: " in line and line.split(" -> read ")[1] != node
    assert _suspects(topology, manifest) == expected  # each bad replica recorded once

    # the training reader: every chunk fetched and verified, the same rows
    reader = TrainingReader(ReaderConfig("acc", cache_dir=tmp_path / "cache"),
                            topology=topology)
    for chunk in manifest.chunks:  # the damaged replica first, as the export read them
        reader.fetcher.chosen[chunk.digest] = tuple(r.node for r in chunk.verified)
    rows = pa.concat_tables(list(reader)).sort_by("id")
    assert rows.column("id").to_pylist() == sorted(
        pa.parquet.read_table(damaged["before"]).column("id").to_pylist())
    fetched = {p.name.split(".")[0] for p in (tmp_path / "cache").glob("*.chunk")}
    assert fetched == {c.digest for c in manifest.chunks}
    for chunk in manifest.chunks:
        cached = (tmp_path / "cache" / f"{chunk.digest}.chunk").read_bytes()
        assert blake3.blake3(cached).hexdigest() == chunk.digest
    assert len(reader.fetcher.report.failovers) == 4
    assert _suspects(topology, manifest) == expected

    # repair: the damaged replicas re-created from good ones; chunk 3's first replica was
    # never bad, and its suspicion is cleared
    repaired = repair_dataset(topology, "acc", max_node_share=1.0)
    assert repaired.verdict == "healthy", repaired.to_json()
    assert sorted(repaired.recreated) == sorted(
        f"batch={manifest.batch_id} chunk {i} -> {bad[i]}" for i in (0, 1, 2))
    assert _suspects(topology, manifest) == set()
    for index in (0, 1, 2, 3):
        chunk = manifest.chunks[index]
        fs, root = _fs(topology, bad[index], damaged["clouds"])
        assert blake3.blake3(fs.cat_file(f"{root}/{chunk.key}")).hexdigest() == chunk.digest
    assert verify_dataset(topology, "acc", deep=True).verdict == "healthy"


def test_a_repair_whose_copy_fails_mid_stream_copies_from_the_next(
        damaged: dict[str, Any]) -> None:
    """Chunk 3's only replicas that can feed a new one: its second; when the first copy
    read for the new replica (chunk 2's) fails mid-stream, nothing it sent is committed."""
    topology: Topology = damaged["topology"]
    manifest: Manifest = damaged["manifest"]
    chunk = manifest.chunks[2]
    source = chunk.verified[1].node  # the first good copy a repair reads
    get = Store.get

    def failing_get(self: Store, key: str, start: int | None = None,
                    end: int | None = None) -> bytes:
        if self.name == source and key == chunk.key and start:
            raise translate(ConnectionResetError("connection reset (injected)"), self.name,
                            key, "read")
        return get(self, key, start, end)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Store, "get", failing_get)
        # deep: no reader has read chunk 0 yet, and a local disk keeps no checksum
        repaired = repair_dataset(topology, "acc", max_node_share=1.0, deep=True)
    assert repaired.verdict == "healthy", repaired.to_json()
    assert f"batch={manifest.batch_id} chunk 2 -> {damaged['bad'][2]}" in repaired.recreated
    fs, root = _fs(topology, damaged["bad"][2], damaged["clouds"])
    assert blake3.blake3(fs.cat_file(f"{root}/{chunk.key}")).hexdigest() == chunk.digest
    assert verify_dataset(topology, "acc", deep=True).verdict == "healthy"
