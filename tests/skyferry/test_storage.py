"""The storage layer's contract, run unchanged on every backend the suite can reach."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyferry.config import get_settings
from skyferry.errors import ObjectNotFoundError, UnsafeKeyError
from skyferry.hashing import content_hash
from skyferry.storage import Store, safe_key
from skyferry.topology import load_topology


@pytest.fixture(params=["file", "memory", "s3", "gs", "az"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same store contract on every backend; s3/gs/az are real local servers."""
    if request.param == "file":
        yield Store(f"file://{tmp_path}/node", name="local-node")
    elif request.param in ("s3", "gs", "az"):
        clouds = request.getfixturevalue("clouds")
        clouds.make_bucket(request.param, "contract")
        options = {**clouds.options(request.param), "skip_instance_cache": True}
        store = Store(f"{request.param}://contract/node", options,
                      name=f"{request.param}-node")
        yield store
    else:
        root = f"memory://skyferry-test-{uuid.uuid4().hex}"
        s = Store(root, name="memory-node")
        yield s
        if s.fs.exists(s.root):
            s.fs.rm(s.root, recursive=True)


class TestStoreContract:
    def test_put_get_and_ranged_reads(self, store: Store) -> None:
        data = bytes(range(256)) * 40
        store.put("ds/date=2026-01-01/chunk-00000.bin", data)
        assert store.get("ds/date=2026-01-01/chunk-00000.bin") == data
        assert store.get("ds/date=2026-01-01/chunk-00000.bin", start=100, end=356) == data[100:356]
        assert store.size("ds/date=2026-01-01/chunk-00000.bin") == len(data)

    def test_create_writes_once_of_many_at_the_same_moment(
            self, store: Store, request: pytest.FixtureRequest) -> None:
        from concurrent.futures import ThreadPoolExecutor
        from threading import Barrier

        if store.name == "gs-node":  # real GCS refuses with 412; the emulator writes
            request.applymarker(pytest.mark.xfail(
                strict=True, reason="gcp-storage-emulator ignores ifGenerationMatch=0"))
        assert store.create("claims/unit-0.json", b"first")
        assert not store.create("claims/unit-0.json", b"second")
        assert store.get("claims/unit-0.json") == b"first"
        start = Barrier(8)

        def race(i: int) -> bool:
            start.wait()
            return store.create("claims/unit-1.json", f"writer {i}".encode())

        with ThreadPoolExecutor(max_workers=8) as pool:
            won = list(pool.map(race, range(8)))
        assert won.count(True) == 1
        assert store.get("claims/unit-1.json") == f"writer {won.index(True)}".encode()

    def test_overwrite_replaces_bytes(self, store: Store) -> None:
        store.put("k/a", b"first version")
        store.put("k/a", b"second")
        assert store.get("k/a") == b"second"

    def test_list_is_recursive_with_sizes(self, store: Store) -> None:
        store.put("ds/a/1", b"x")
        store.put("ds/b/2", b"yy")
        store.put("other/3", b"zzz")
        listed = {o.key: o.size for o in store.list("ds")}
        assert listed == {"ds/a/1": 1, "ds/b/2": 2}

    def test_names_are_one_level_without_sizes(self, store: Store) -> None:
        for key in ("log/000000000001.json", "log/000000000002.json", "log/tags/v1.json",
                    "logs/000000000009.json"):
            store.put(key, b"{}")
        assert sorted(store.names("log")) == ["000000000001.json", "000000000002.json", "tags"]
        assert sorted(store.names("log/tags")) == ["v1.json"]
        assert store.names("nothing/here") == []

    def test_missing_object_is_a_typed_error_naming_node_and_key(self, store: Store) -> None:
        with pytest.raises(ObjectNotFoundError) as info:
            store.get("nope/missing")
        assert info.value.node == store.name and info.value.key == "nope/missing"
        assert store.name in str(info.value)

    def test_delete_is_idempotent(self, store: Store) -> None:
        store.put("d/x", b"1")
        store.delete("d/x")
        store.delete("d/x")
        assert not store.exists("d/x")

    @pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs/x", "a//b", "", "a/./b",
                                     "a\\b", "bad\x00name", "s3://bucket/k"])
    def test_hostile_keys_are_refused(self, store: Store, key: str) -> None:
        with pytest.raises(UnsafeKeyError):
            store.put(key, b"x")

    def test_stored_checksum_is_the_md5_of_the_bytes_where_the_store_keeps_one(
            self, store: Store) -> None:
        import hashlib

        data = b"checksum me " * 1000
        store.put("sum/x", data)
        size, md5 = store.stored_md5("sum/x")
        assert size == len(data)
        if store.url.startswith(("s3://", "gs://", "az://")):
            assert md5 == hashlib.md5(data).hexdigest()
        else:
            assert md5 is None  # local stores are verified by reading back

    def test_digest_of_streams_the_stored_bytes_through_the_content_hash(
            self, store: Store) -> None:
        import numpy as np

        data = np.random.default_rng(7).bytes(3 * 1024 * 1024 + 17)
        store.put("hash/many-blocks", data)
        store.put("hash/empty", b"")
        assert store.digest_of("hash/many-blocks", block=1 << 20) == (
            content_hash(data), len(data))
        # a block that is no multiple of a page: a local store's windows round down to one
        assert store.digest_of("hash/many-blocks", block=1_000_003) == (
            content_hash(data), len(data))
        assert store.digest_of("hash/empty") == (content_hash(b""), 0)
        with pytest.raises(ObjectNotFoundError) as info:
            store.digest_of("hash/missing")
        assert info.value.node == store.name and info.value.key == "hash/missing"

    def test_probe_round_trips(self, store: Store) -> None:
        assert store.probe() >= 0
        assert [o for o in store.list("_probe")] == []


def test_safe_key_joins_parts() -> None:
    assert safe_key("a", "b/c", "d") == "a/b/c/d"
    with pytest.raises(UnsafeKeyError):
        safe_key("dataset", "..", "x")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_local_replica_is_hashed_a_window_at_a_time(tmp_path: Path) -> None:
    """Mapped pages count toward resident memory: only one window's worth may be mapped."""
    size = 256 << 20
    script = f"""
import re
from skyferry.storage import Store
def hwm_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
store = Store("file://{tmp_path}/node", name="local-node")
with open(store.path("big"), "wb") as fh:
    fh.truncate({size})  # sparse: no pages of it are resident yet
before = hwm_kb()
digest, found = store.digest_of("big", block=8 << 20)
print(found, (hwm_kb() - before) // 1024)
"""
    (tmp_path / "node").mkdir()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) == size
    assert int(out[1]) < 64  # MB; the whole file mapped at once would add 256


def test_scrubbing_masks_secrets_and_leaves_modes_and_words_alone() -> None:
    from skyferry.secrets import register_options, scrub

    register_options({"token": "anon", "key": "AKIAEXAMPLEKEY9", "endpoint_url": "http://h:1",
                      "connection_string": "AccountName=a;AccountKey=c2VjcmV0a2V5MTIz;"})
    text = scrub("CanonicalRequest via http://h:1 with AKIAEXAMPLEKEY9 and c2VjcmV0a2V5MTIz")
    assert text == "CanonicalRequest via http://h:1 with *** and ***"


def test_a_local_write_is_flushed_file_and_folders_before_it_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``put`` and ``create`` return from has been fsynced: the bytes, the new name in its
    folder, and every folder the write had to create."""
    import os

    flushed: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = Store(f"file://{tmp_path}/node", name="n")
    store.put("ds/date=1/batch=b/chunk-00000.bin", b"replica")
    folder = tmp_path / "node" / "ds" / "date=1" / "batch=b"
    assert (folder / "chunk-00000.bin").read_bytes() == b"replica"
    temp = [p for p in flushed if Path(p).name.startswith(".tmp-")]
    assert len(temp) == 1 and Path(temp[0]).parent == folder  # the bytes, before the rename
    # each folder the write created, in its parent; then the final name, in its folder
    assert [p for p in flushed if p not in temp] == [
        str(tmp_path), str(tmp_path / "node"), str(tmp_path / "node" / "ds"),
        str(tmp_path / "node" / "ds" / "date=1"), str(folder)]
    flushed.clear()
    assert store.create("lease.json", b"{}")
    # the bytes in a temp file, hard-linked to the key, then the folder; no temp file is left
    assert [Path(p).name[:5] for p in flushed] == [".tmp-", "node"]
    assert Path(flushed[0]).name.endswith("-lease.json") and flushed[1] == str(tmp_path / "node")
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == ["ds", "lease.json"]
    # with durable writes switched off (SKYFERRY_DURABLE_WRITES=false): atomic, not flushed
    flushed.clear()
    monkeypatch.setenv("SKYFERRY_DURABLE_WRITES", "false")
    get_settings.cache_clear()
    topology = tmp_path / "topology.yaml"
    topology.write_text(f'nodes: [{{name: n, cloud: aws, region: r, url: "{tmp_path}/scratch"}}]\n')
    try:  # the settings reach a node's store through the topology loaded with them
        scratch = load_topology(str(topology)).node("n").open_store()
        scratch.put("ds/a.bin", b"scratch")
    finally:
        get_settings.cache_clear()
    assert (tmp_path / "scratch" / "ds" / "a.bin").read_bytes() == b"scratch"
    assert flushed == []


def test_a_streamed_local_write_starts_writing_back_as_it_goes_and_flushes_at_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FLUSH_EVERY bytes the next range starts going to disk without waiting; the
    commit's fsync waits for all of it; the file holds the bytes written."""
    import os

    from skyferry.storage import local, uploads

    ranges: list[tuple[int, int]] = []
    real = local.start_writeback

    def start(fd: int, offset: int, length: int) -> None:
        ranges.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(uploads, "FLUSH_EVERY", 1000)
    monkeypatch.setattr(local, "start_writeback", start)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    payload = bytes(range(256)) * 20  # 5,120 bytes, written 300 at a time
    out = Store(f"file://{tmp_path}/node", name="n").writer("ds/chunk.bin")
    for at in range(0, len(payload), 300):
        out.write(payload[at:at + 300])
    out.commit()
    assert (tmp_path / "node" / "ds" / "chunk.bin").read_bytes() == payload
    # consecutive ranges from 0, each at least FLUSH_EVERY, none past what was written
    assert [offset for offset, _ in ranges] == [0] + [sum(n for _, n in ranges[:i])
                                                      for i in range(1, len(ranges))]
    assert all(n >= 1000 for _, n in ranges) and len(ranges) == 4
    assert sum(n for _, n in ranges) <= len(payload)
    # the whole file, once, before the rename
    assert len([p for p in synced if Path(p).name.startswith(".tmp-")]) == 1
    with pytest.raises(OSError):  # a real call: a closed descriptor is an error, not ignored
        fd = os.open(tmp_path / "node" / "ds" / "chunk.bin", os.O_RDONLY)
        os.close(fd)
        real(fd, 0, 1)


def test_an_abandoned_requests_connection_error_is_no_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request cancelled or reset under a failing node ends, unawaited, with a connection
    error: that is logged at debug level, while any other unretrieved error still shows."""
    import asyncio

    from skyferry.storage.store import _quiet_abandoned_requests

    loop = asyncio.new_event_loop()
    try:
        _quiet_abandoned_requests(loop)
        with caplog.at_level(logging.DEBUG):
            loop.call_exception_handler({"message": "Task exception was never retrieved",
                                         "exception": ConnectionResetError("closing")})
            loop.call_exception_handler({"message": "Task exception was never retrieved",
                                         "exception": ValueError("a real bug")})
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [str(r.exc_info[1]) for r in errors if r.exc_info] == ["a real bug"]
    assert any("ConnectionResetError" in r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG)
