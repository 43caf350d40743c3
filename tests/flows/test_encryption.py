"""Encryption at rest, end to end on local nodes: what the nodes hold, what export gives
back, and what works without a key."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Manifest
from skyferry.config import PipelineConfig
from skyferry.crypto import HEADER_SIZE, MAGIC, cipher_size, new_master_key
from skyferry.errors import IntegrityError, KeyUnavailableError
from skyferry.ops.export import export_dataset
from skyferry.ops.gc import collect_garbage
from skyferry.ops.rekey import rekey_dataset
from skyferry.ops.repair import repair_dataset
from skyferry.ops.verify import verify_dataset
from skyferry.read.reader import ReaderConfig, TrainingReader
from skyferry.topology import load_topology
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

Committed = Callable[[str], list[Manifest]]


@pytest.fixture
def keys(tmp_path: Path) -> str:
    path = tmp_path / "master.keys"
    path.write_text(new_master_key("team-a") + "\n")
    return f"file:{path}"


def node_bytes(home: Path) -> dict[Path, bytes]:
    """Every object on every default node (their folders in SKYFERRY_HOME)."""
    return {p: p.read_bytes() for p in sorted((home / "nodes").rglob("*")) if p.is_file()}


def test_an_encrypted_csv_batch_leaves_no_plaintext_on_any_node(
        home: Path, tmp_path: Path, keys: str, committed: Committed) -> None:
    src = tmp_path / "secret-customers.csv"
    write_ml_csv(src, 3000, seed=5)
    known = [b"category", b"bird", b"label", b"secret-customers"]  # a plain chunk holds each
    result = run_pipeline(PipelineConfig(source=str(src), dataset="enc", chunk_size="40KB",
                                         encrypt=True, master_keys=keys))
    assert result.status == "completed", result.error
    (manifest,) = committed("enc")
    assert all(c.sealed is not None and list(c.sealed.wrapped) == ["team-a"]
               for c in manifest.chunks)
    objects = node_bytes(home)
    data = {p: b for p, b in objects.items() if p.suffix == ".parquet"}
    assert len(data) == 3 * len(manifest.chunks)
    for path, blob in data.items():
        assert blob[:8] == MAGIC, path
        assert b"PAR1" not in blob
    for chunk in manifest.chunks:
        assert chunk.sealed is not None and chunk.size == cipher_size(chunk.sealed.plain_size)
    for value in known:
        assert not [p for p, b in data.items() if value in b], value
    # no source name in any object of any node, any manifest copy or the snapshot log
    catalog = {p: p.read_bytes() for folder in ("manifests", "snapshots")
               for p in (home / "catalog" / folder).rglob("*") if p.is_file()}
    copies = [p for p in objects if "manifests" in p.parts]
    assert copies and catalog
    for path, blob in [*objects.items(), *catalog.items()]:
        assert b"secret-customers" not in blob and str(tmp_path).encode() not in blob, path
    assert all(f.url.startswith("sealed:") for f in manifest.lineage.sources)
    # the same file again is no new file: its pseudonym is the same
    again = run_pipeline(PipelineConfig(source=str(src), dataset="enc", chunk_size="40KB",
                                        encrypt=True, master_keys=keys))
    assert again.status == "up_to_date", again.error

    reader = TrainingReader(ReaderConfig(dataset="enc", batch_size=500, keys=keys,
                                         cache_dir=tmp_path / "cache"))
    ids = sorted(i for table in reader for i in table.column("id").to_pylist())
    reader.close()
    assert ids == sorted(pd.read_csv(src)["id"])
    cached = [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached and all(b[:8] != MAGIC for b in cached)  # the cache holds plaintext

    out = tmp_path / "out.parquet"
    export_dataset("enc", out, keys=keys)
    exported = pq.read_table(out).to_pandas()
    source = pd.read_csv(src)
    assert len(exported) == len(source)
    assert sorted(exported["id"]) == sorted(source["id"])

    # without the key: a typed error naming the master key, and nothing written
    with pytest.raises(KeyUnavailableError, match="team-a"):
        export_dataset("enc", tmp_path / "nokey.parquet")
    assert not (tmp_path / "nokey.parquet").exists()
    other = tmp_path / "other.keys"
    other.write_text(new_master_key("team-b") + "\n")
    with pytest.raises(KeyUnavailableError, match="team-a"):
        export_dataset("enc", tmp_path / "wrong.parquet", keys=f"file:{other}")
    assert not (tmp_path / "wrong.parquet").exists()


def test_verify_and_repair_need_no_key_and_a_damaged_replica_is_never_exported(
        home: Path, tmp_path: Path, keys: str, committed: Committed,
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "blob.bin"
    payload = random.Random(11).randbytes(300_000)
    src.write_bytes(payload)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="encb", chunk_size="64KB",
                                         encrypt=True, master_keys=keys))
    assert result.status == "completed", result.error
    (manifest,) = committed("encb")
    chunk = manifest.chunks[1]
    first = chunk.verified[0].node
    topology = load_topology()
    replica = Path(topology.node(first).url) / chunk.key
    blob = bytearray(replica.read_bytes())
    blob[HEADER_SIZE + 10] ^= 0x01  # one bit of the first segment
    replica.write_bytes(bytes(blob))

    out = tmp_path / "out"
    report = export_dataset("encb", out, keys=keys)  # fails over to a good replica
    assert report is not None
    files = [p for p in out.rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in files] == [payload]
    assert [p.name for p in files] == ["blob.bin"]  # its real name, from the sealed names

    monkeypatch.delenv("SKYFERRY_KEYS", raising=False)  # no key anywhere from here on
    found = verify_dataset(topology, "encb", deep=True)
    assert [(c.chunk, c.node) for c in found.replicas if c.status != "ok"] == [
        (chunk.index, first)]
    repaired = repair_dataset(topology, "encb", deep=True)
    assert repaired.recreated and not repaired.unrecoverable
    again = verify_dataset(topology, "encb", deep=True)
    assert again.counts()["ok"] == 3 * len(manifest.chunks)
    assert replica.read_bytes()[:8] == MAGIC

    # every replica of a chunk damaged the same way: nothing is exported
    for record in chunk.verified:
        path = Path(topology.node(record.node).url) / chunk.key
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x80
        path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        export_dataset("encb", tmp_path / "never", keys=keys)
    assert not any((tmp_path / "never").rglob("*.bin"))


def test_rekey_rewraps_every_data_key_and_rewrites_no_data(
        home: Path, tmp_path: Path, committed: Committed) -> None:
    old_line, new_line = new_master_key("k-2025"), new_master_key("k-2026")
    old, both, new = (tmp_path / "old.keys", tmp_path / "both.keys", tmp_path / "new.keys")
    old.write_text(old_line + "\n")
    both.write_text(f"{old_line}\n{new_line}\n")
    new.write_text(new_line + "\n")
    src = tmp_path / "blob.bin"
    payload = random.Random(5).randbytes(200_000)
    src.write_bytes(payload)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="rk", chunk_size="64KB",
                                         encrypt=True, master_keys=f"file:{old}"))
    assert result.status == "completed", result.error
    before = node_bytes(home)
    data_before = {p: b for p, b in before.items() if p.suffix == ".bin"}
    assert data_before

    with pytest.raises(KeyUnavailableError, match="k-2026"):  # the new key must be held
        rekey_dataset(load_topology(), "rk", to="k-2026", keys=f"file:{old}")
    report = rekey_dataset(load_topology(), "rk", to="k-2026", keys=f"file:{both}")
    (manifest,) = committed("rk")
    assert report.chunks == len(manifest.chunks) and len(report.manifests) == 1
    assert all(list(c.sealed.wrapped) == ["k-2026"] for c in manifest.chunks if c.sealed)
    assert manifest.revision == 1
    after = node_bytes(home)
    assert {p: b for p, b in after.items() if p.suffix == ".bin"} == data_before

    out = tmp_path / "out"
    export_dataset("rk", out, keys=f"file:{new}")
    assert [p.read_bytes() for p in out.rglob("*") if p.is_file()] == [payload]
    with pytest.raises(KeyUnavailableError, match="k-2026"):
        export_dataset("rk", tmp_path / "refused", keys=f"file:{old}")
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").rglob("*.*"))
    again = rekey_dataset(load_topology(), "rk", to="k-2026", keys=f"file:{new}")
    assert again.chunks == 0 and again.manifests == []
    # the dataset's names key was rewrapped too: a run with the new key alone finds its file
    rerun = run_pipeline(PipelineConfig(source=str(src), dataset="rk", chunk_size="64KB",
                                        encrypt=True, master_keys=f"file:{new}"))
    assert rerun.status == "up_to_date", rerun.error


def _tamper(blob: bytes, how: str) -> bytes:
    from skyferry.crypto import SEGMENT, TAG

    step = SEGMENT + TAG
    header, body = blob[:HEADER_SIZE], blob[HEADER_SIZE:]
    segs = [body[i:i + step] for i in range(0, len(body), step)]
    if how == "bit":
        return blob[:HEADER_SIZE + 5] + bytes([blob[HEADER_SIZE + 5] ^ 0x10]) + blob[
            HEADER_SIZE + 6:]
    if how == "dropped":
        return header + b"".join(segs[:1] + segs[2:])
    if how == "truncated":
        return header + b"".join(segs[:-1])
    assert how == "swapped"
    return header + segs[1] + segs[0] + b"".join(segs[2:])


@pytest.mark.parametrize("how", ["bit", "dropped", "truncated", "swapped"])
def test_a_tampered_replica_is_caught_and_repaired_without_the_key(
        home: Path, tmp_path: Path, keys: str, committed: Committed, how: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "blob.bin"
    payload = random.Random(13).randbytes(600_000)
    src.write_bytes(payload)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="tamper",
                                         chunk_size="300KB", encrypt=True, master_keys=keys))
    assert result.status == "completed", result.error
    (manifest,) = committed("tamper")
    chunk = manifest.chunks[0]
    assert chunk.sealed is not None and chunk.sealed.plain_size > 3 * 65536
    topology = load_topology()
    replicas = [Path(topology.node(r.node).url) / chunk.key for r in chunk.verified]
    original = replicas[0].read_bytes()
    replicas[0].write_bytes(_tamper(original, how))

    out = tmp_path / "out"  # the first replica fails; the export fails over and is whole
    export_dataset("tamper", out, keys=keys)
    assert b"".join(p.read_bytes() for p in sorted(out.rglob("*.bin"))) == payload

    monkeypatch.delenv("SKYFERRY_KEYS", raising=False)
    repaired = repair_dataset(topology, "tamper", deep=True)
    assert repaired.recreated and not repaired.unrecoverable
    assert replicas[0].read_bytes() == original  # the same ciphertext, copied without a key

    for path in replicas:  # every replica tampered the same way: nothing comes out
        path.write_bytes(_tamper(original, how))
    with pytest.raises(IntegrityError):
        export_dataset("tamper", tmp_path / "never", keys=keys)
    assert not list((tmp_path / "never").rglob("*.bin"))


def test_chunks_moved_on_dask_workers_are_encrypted_with_their_own_keys(
        home: Path, tmp_path: Path, keys: str, committed: Committed,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from skyferry.config import get_settings

    src = tmp_path / "blob.bin"
    payload = random.Random(17).randbytes(400_000)
    src.write_bytes(payload)
    monkeypatch.setenv("SKYFERRY_TASK_RUNNER", "dask")
    monkeypatch.setenv("SKYFERRY_MAX_WORKERS", "2")
    get_settings.cache_clear()
    result = run_pipeline(PipelineConfig(source=str(src), dataset="encd", chunk_size="64KB",
                                         encrypt=True, master_keys=keys))
    get_settings.cache_clear()
    assert result.status == "completed", result.error
    (manifest,) = committed("encd")
    ids = [c.sealed.key_id for c in manifest.chunks if c.sealed is not None]
    assert len(ids) == len(manifest.chunks) > 4 and len(set(ids)) == len(ids)
    out = tmp_path / "out"
    export_dataset("encd", out, keys=keys)
    assert b"".join(p.read_bytes() for p in sorted(out.rglob("*.bin"))) == payload


def test_a_dataset_keeps_its_encryption_and_a_grown_file_extends_under_its_pseudonym(
        home: Path, tmp_path: Path, keys: str, committed: Committed) -> None:
    src = tmp_path / "logs" / "events.csv"
    write_ml_csv(src, 400, seed=8)
    first = run_pipeline(PipelineConfig(source=str(src.parent), dataset="grow",
                                        chunk_size="20KB", encrypt=True, master_keys=keys))
    assert first.status == "completed", first.error
    with open(src, "a") as fh:  # the file grows by whole rows
        for i in range(400, 450):
            fh.write(f"{i},0.5,0.25,cat,1\n")
    grown = run_pipeline(PipelineConfig(source=str(src.parent), dataset="grow",
                                        chunk_size="20KB", encrypt=True, master_keys=keys))
    assert grown.status == "completed", grown.error
    manifests = committed("grow")
    assert len(manifests) == 2
    (later,) = manifests[1].lineage.sources
    assert later.url == manifests[0].lineage.sources[0].url and later.extends > 0
    out = tmp_path / "all.parquet"
    export_dataset("grow", out, keys=keys)
    assert sorted(pq.read_table(out).column("id").to_pylist()) == list(range(450))
    # gc needs no key: the pseudonyms tell the versions apart, and it frees nothing read
    before = node_bytes(home)
    swept = collect_garbage(load_topology(), grace_s=0)
    assert swept.errors == [] and swept.deleted == [] and node_bytes(home) == before

    # a run without encryption may not add to it, nor an encrypted run to a plain dataset
    plain = run_pipeline(PipelineConfig(source=str(src.parent), dataset="grow"))
    assert plain.status == "failed" and "is encrypted" in str(plain.error)
    other = tmp_path / "plain.csv"
    write_ml_csv(other, 50, seed=9)
    assert run_pipeline(PipelineConfig(source=str(other), dataset="plain")).status == (
        "completed")
    mixed = run_pipeline(PipelineConfig(source=str(other), dataset="plain", encrypt=True,
                                        master_keys=keys))
    assert mixed.status == "failed" and "written without encryption" in str(mixed.error)
