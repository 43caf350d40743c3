"""Verify: each kind of damage reported as itself, at the level that can see it."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
from typer.testing import CliRunner

from skyferry.cli import app
from skyferry.commit.manifest import Manifest
from skyferry.ops.verify import verify_dataset
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

runner = CliRunner()


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> Manifest:
    write_ml_csv(tmp_path / "src" / "a.csv", 4_000, seed=21)
    manifest = commit_without_prefect(tmp_path / "src", "v", chunk_size="24KB")
    assert len(manifest.chunks) >= 4
    return manifest


def _replica(home: Path, manifest: Manifest, index: int, which: int = 0) -> tuple[str, Path]:
    chunk = manifest.chunks[index]
    node = chunk.verified[which].node
    return node, home / "nodes" / node / chunk.key


def test_an_untouched_dataset_verifies_at_both_levels(committed: Manifest) -> None:
    replicas = sum(len(c.verified) for c in committed.chunks)
    for deep in (False, True):
        report = verify_dataset(load_topology(), "v", deep=deep)
        assert report.counts() == {"ok": replicas, "missing": 0, "differs": 0, "unreadable": 0}
        assert report.healthy and report.orphans == [] and report.unreachable == {}
    assert report.bytes_read == sum(c.size * len(c.verified) for c in committed.chunks)
    assert runner.invoke(app, ["verify", "v", "--deep"]).exit_code == 0


def test_each_kind_of_damage_is_reported_as_itself(home: Path, committed: Manifest) -> None:
    deleted_node, deleted = _replica(home, committed, 0)
    deleted.unlink()
    short_node, short = _replica(home, committed, 1)
    short.write_bytes(short.read_bytes()[:-10])
    rotten_node, rotten = _replica(home, committed, 2)
    data = bytearray(rotten.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, one byte flipped
    rotten.write_bytes(bytes(data))
    stray = home / "nodes" / "azure-node-1" / "v" / "stray.bin"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"no manifest claims this")

    def damage(deep: bool) -> dict[tuple[int, str], str]:
        report = verify_dataset(load_topology(), "v", deep=deep)
        assert report.orphans == ["azure-node-1:v/stray.bin"]
        return {(c.chunk, c.node): c.status for c in report.damaged}

    # a local store keeps no checksum: the default level sees presence and size
    assert damage(False) == {(0, deleted_node): "missing", (1, short_node): "differs"}
    assert damage(True) == {(0, deleted_node): "missing", (1, short_node): "differs",
                            (2, rotten_node): "differs"}
    out = runner.invoke(app, ["verify", "v", "--deep", "--json"])
    assert out.exit_code == 1
    body = json.loads(out.output)
    assert body["counts"]["differs"] == 2 and body["counts"]["missing"] == 1
    assert not body["healthy"]
    # the damage is only reported: the files are as the test left them
    assert not deleted.exists()
    assert blake3.blake3(rotten.read_bytes()).hexdigest() != committed.chunks[2].digest


def test_a_node_that_is_gone_is_unreachable_not_thousands_missing(
        home: Path, committed: Manifest) -> None:
    node, _ = _replica(home, committed, 0)
    on_node = sum(1 for c in committed.chunks for r in c.verified if r.node == node)
    for path in sorted((home / "nodes" / node).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()  # the node came back empty
    report = verify_dataset(load_topology(), "v")
    assert report.damaged == []
    assert list(report.unreachable) == [node] and "empty" in report.unreachable[node]
    assert report.not_checked == on_node
    out = runner.invoke(app, ["verify", "v"])
    assert out.exit_code == 3 and node in out.output


def test_verify_reads_at_the_rate_it_is_given(committed: Manifest) -> None:
    total = sum(c.size * len(c.verified) for c in committed.chunks)
    rate = total / 1e6 / 0.5  # the whole dataset in half a second, at this rate
    report = verify_dataset(load_topology(), "v", deep=True, max_mb_s=rate)
    assert report.healthy and report.bytes_read == total
    assert report.seconds >= 0.5 * 0.95  # the last read may not start before its due time
