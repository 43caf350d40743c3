"""Verified chunk bytes for a reader: from the local cache, else from the nearest replica.

A chunk is fetched into the cache (a folder shared by the workers on a machine, keyed by the
chunk's content hash, with a size limit) through ranged reads, hashed as it lands. Only bytes
whose hash matches the manifest are kept; a replica that is missing or corrupt is noted in the
catalog for the next repair, and the next-nearest replica is read. A cached file is hashed
again each time a reader opens it, so a file damaged on the reader's disk is fetched anew.

Beside a chunk's Parquet file the cache can keep its decoded copy (Arrow IPC, one record batch
per row group), made from the verified Parquet file and hashed when it is made; each open
hashes it again against that hash, and a damaged copy is made again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import blake3
import pyarrow as pa
import pyarrow.parquet as pq

from skyferry.commit.manifest import Catalog
from skyferry.distribute.access import FileOutput, Replicas
from skyferry.errors import TopologyError
from skyferry.read.plan import PlannedChunk
from skyferry.topology import LinkCost, Topology

__all__ = ["ChunkCache", "Fetcher", "Mapped", "Place", "ReadReport", "reader_place"]

logger = logging.getLogger("skyferry.read")

# Environment variables that say which cloud and region a machine is in.
_PLACE_ENV = (("aws", ("AWS_REGION", "AWS_DEFAULT_REGION")),
              ("gcp", ("GOOGLE_CLOUD_REGION", "CLOUDSDK_COMPUTE_REGION", "CLOUD_ML_REGION")),
              ("azure", ("AZURE_REGION", "AZURE_LOCATION")))


@dataclass(frozen=True)
class Place:
    """Where a reader runs."""

    cloud: str
    region: str | None = None
    detected_from: str = "set"


def reader_place(topology: Topology, cloud: str | None = None,
                 region: str | None = None) -> Place:
    """The reader's cloud and region: as given, else ``SKYFERRY_READER_CLOUD`` and
    ``SKYFERRY_READER_REGION``, else the cloud's own region variable (``AWS_REGION``,
    ``GOOGLE_CLOUD_REGION``, ``AZURE_REGION`` ...), else the topology's source cloud."""
    cloud = cloud or os.environ.get("SKYFERRY_READER_CLOUD") or None
    region = region or os.environ.get("SKYFERRY_READER_REGION") or None
    if cloud:
        known = set(topology.clouds) | {topology.source_cloud}
        if cloud not in known:
            raise TopologyError(f"reader cloud {cloud!r} is not in the topology; its clouds "
                                f"are {', '.join(sorted(known))}")
        return Place(cloud, region)
    for name, variables in _PLACE_ENV:
        for variable in variables:
            if os.environ.get(variable):
                return Place(name, region or os.environ[variable], f"${variable}")
    return Place(topology.source_cloud, region or topology.source_region, "the topology")


@dataclass
class ReadReport:
    """What a reader read: bytes from each node, the egress they cost, the cache's part."""

    place: Place
    bytes_from: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    egress_usd: float = 0.0
    cross_cloud_bytes: int = 0
    cache_hits: int = 0
    fetched: int = 0
    failovers: list[str] = field(default_factory=list)
    snapshot: str | None = None  # the id of the snapshot read (None: no snapshot log)

    def as_dict(self) -> dict[str, object]:
        return {"reader": {"cloud": self.place.cloud, "region": self.place.region,
                           "from": self.place.detected_from},
                "bytes_from": dict(self.bytes_from), "egress_usd": round(self.egress_usd, 6),
                "cross_cloud_bytes": self.cross_cloud_bytes, "cache_hits": self.cache_hits,
                "fetched": self.fetched, "failovers": list(self.failovers),
                "snapshot": self.snapshot}


class ChunkCache:
    """Verified chunks on this machine's disk, keyed by content hash: each chunk's Parquet
    file (``.chunk``) and its decoded copy (``.arrow``, with its hash in ``.arrow.sum``). At
    most ``limit`` bytes: the chunks least recently used go first, whole; a file in use by a
    reader stays readable."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = Path(root), limit
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.chunk"

    def decoded_path(self, digest: str) -> Path:
        return self.root / f"{digest}.arrow"

    def recorded(self, digest: str) -> tuple[str, int] | None:
        """The hash and size the decoded copy of ``digest`` had when it was made."""
        try:
            found, size = (self.root / f"{digest}.arrow.sum").read_text().split()
            return found, int(size)
        except (OSError, ValueError):
            return None

    def record(self, digest: str, made: tuple[str, int]) -> None:
        temp = self.temp(digest)
        temp.write_text(f"{made[0]} {made[1]}\n")
        os.replace(temp, self.root / f"{digest}.arrow.sum")

    def forget_decoded(self, digest: str) -> None:
        for path in (self.decoded_path(digest), self.root / f"{digest}.arrow.sum"):
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, digest: str) -> Iterator[None]:
        """One fetch (or decoded copy) of a chunk at a time on this machine: the others
        wait, then find it."""
        with open(self.root / f"{digest}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def temp(self, digest: str) -> Path:
        return self.root / f".tmp-{uuid.uuid4().hex}-{digest}"

    def used(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)

    def trim(self, keep: str) -> None:
        """Drop the least recently used chunks (both their files) until the cache is
        within its limit; never chunk ``keep`` (a digest)."""
        chunks: dict[str, list[float]] = {}  # digest -> [last use, bytes]
        for entry in [*self.root.glob("*.chunk"), *self.root.glob("*.arrow")]:
            if entry.name.startswith("."):  # a file being written
                continue
            with contextlib.suppress(OSError):
                stat = entry.stat()
                seen = chunks.setdefault(entry.name.split(".")[0], [0.0, 0])
                seen[0] = max(seen[0], stat.st_mtime)
                seen[1] += stat.st_size
        total = sum(size for _, size in chunks.values())
        for _, size, digest in sorted((u, s, d) for d, (u, s) in chunks.items()):
            if total <= self.limit:
                return
            if digest == keep:
                continue
            with contextlib.suppress(OSError):
                self.forget_decoded(digest)
                self.path(digest).unlink(missing_ok=True)
                total -= size


_HASH_BLOCK = 64 << 20  # bytes of a mapped file hashed, then let go of, at a time


class Mapped:
    """A cached file mapped read-only, whose pages the process lets go of once read.

    ``buffer`` is the whole file, zero-copy. A page let go of (:meth:`release`) is not
    resident in the process any more; its next read maps it again from the same file (the
    page cache), so the bytes are the ones hashed, and the process's memory holds the pages
    in use, not every page it has read. The mapping stays readable when the cache drops the
    file."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            # an empty file cannot be mapped; it is no verified copy of anything either
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.size = size
        self._buffer: pa.Buffer | None = None

    @property
    def buffer(self) -> pa.Buffer:
        if self._buffer is None:
            self._buffer = pa.py_buffer(self._map if self._map is not None else b"")
        return self._buffer

    def digest(self) -> tuple[str, int]:
        """The content hash and size of the file, a block at a time, each block let go of
        once hashed (on every core: BLAKE3's tree hashing)."""
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if self._map is not None:
            with memoryview(self._map) as view:
                for at in range(0, self.size, _HASH_BLOCK):
                    hasher.update(view[at:at + _HASH_BLOCK])
                    self.release(at, at + _HASH_BLOCK)
        return str(hasher.hexdigest()), self.size

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Let go of the pages that hold bytes ``[start, stop)``, whole (a page let go of is
        read again from the file when next used, so any page of it can go)."""
        self._advise(mmap.MADV_DONTNEED, start, stop)

    def release_arrays(self, table: pa.Table | pa.RecordBatch) -> None:
        """Let go of the pages that hold ``table``'s columns (a record batch read from this
        file, zero-copy)."""
        self._advise(mmap.MADV_DONTNEED, *self._span(table))

    def _span(self, table: pa.Table | pa.RecordBatch) -> tuple[int, int]:
        """The bytes of this file that ``table``'s columns lie in (none: ``(0, 0)``)."""
        base = self.buffer.address
        spans = [(buf.address - base, buf.address - base + buf.size)
                 for column in table.columns
                 for array in (column.chunks if isinstance(column, pa.ChunkedArray)
                               else [column])
                 for buf in array.buffers() if buf is not None and buf.size]
        inside = [(a, b) for a, b in spans if 0 <= a and b <= self.size]
        if not inside:
            return 0, 0
        return min(a for a, _ in inside), max(b for _, b in inside)

    def _advise(self, advice: int, start: int, stop: int | None) -> None:
        if self._map is None:
            return
        stop = self.size if stop is None else min(stop, self.size)
        start -= start % mmap.PAGESIZE
        if stop > start:
            self._map.madvise(advice, start, stop - start)

    def __enter__(self) -> Mapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap now, unless arrays still point into the file (then when they are gone)."""
        self._buffer = None
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()


def _mapped_if(path: Path, expected: tuple[str, int]) -> Mapped | None:
    """``path`` mapped, if its bytes hash to ``expected`` (hash, size)."""
    try:
        mapped = Mapped(path)
    except FileNotFoundError:  # dropped by another reader's trim
        return None
    if mapped.digest() == expected:
        return mapped
    mapped.close()
    return None


def _decode(source: Mapped, path: Path, cache: ChunkCache) -> Mapped:
    """Write ``source``'s rows to ``path`` as an Arrow IPC file (a record batch for each row
    group, one row group in memory at a time), record its hash, and map it."""
    parquet = pq.ParquetFile(pa.BufferReader(source.buffer))
    temp = cache.temp(path.name)
    try:
        with pa.OSFile(str(temp), "wb") as sink, \
                pa.ipc.new_file(sink, parquet.schema_arrow) as writer:
            for group in range(parquet.metadata.num_row_groups):
                table = parquet.read_row_group(group)
                source.release()  # the group's pages, read
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [column.combine_chunks() for column in table.columns],
                    schema=table.schema))
        mapped = Mapped(temp)
        cache.record(path.name.split(".")[0], mapped.digest())
        os.replace(temp, path)
        return mapped
    finally:
        temp.unlink(missing_ok=True)


class Fetcher:
    """Verified local copies of planned chunks, read from the cheapest replica first."""

    def __init__(self, topology: Topology, catalog: Catalog, cache: ChunkCache,
                 place: Place, keys: str | None = None) -> None:
        self.topology, self.catalog, self.cache = topology, catalog, cache
        self.report = ReadReport(place)
        self.chosen: dict[str, tuple[str, ...]] = {}  # digest -> replicas, in the order to try
        # an encrypted chunk is opened as it lands: the cache holds its verified plaintext
        self.replicas = Replicas(topology, catalog, on_bytes=self._account, keys=keys)
        self.replicas.failovers = self.report.failovers
        self._lock = threading.Lock()

    def cost(self, node: str) -> LinkCost:
        """What moving a byte from ``node`` to the reader costs."""
        found = self.topology.node(node)
        place = self.report.place
        return self.topology.link(found.cloud, found.region, place.cloud, place.region)

    def nearest(self, chunk: PlannedChunk) -> list[str]:
        """The chunk's verified replicas, cheapest first: same region, same cloud, then by
        the topology's egress price and latency; or the order :attr:`chosen` holds for it
        (a replica chosen by whoever planned the read)."""
        if chunk.digest in self.chosen:
            return list(self.chosen[chunk.digest])
        known = [n for n in chunk.nodes if any(m.name == n for m in self.topology.nodes)]
        return sorted(known, key=lambda n: (self.cost(n).egress_usd_per_gb,
                                            self.cost(n).latency_ms, n))

    def local(self, chunk: PlannedChunk) -> Path:
        """A verified copy of ``chunk`` on this machine (in the cache)."""
        with self.cache.lock(chunk.digest):
            self._verified(chunk).close()
        self.cache.trim(keep=chunk.digest)
        return self.cache.path(chunk.digest)

    def open(self, chunk: PlannedChunk, *, decoded: bool = True) -> Mapped:
        """A verified copy of ``chunk``, mapped: its decoded copy (an Arrow IPC file with a
        record batch for each of the chunk's row groups, made from its verified Parquet
        file the first time), or its Parquet file. The bytes hashed are the bytes mapped,
        and stay readable when the cache drops the file."""
        with self.cache.lock(chunk.digest):
            mapped = self._decoded(chunk) if decoded else self._verified(chunk)
        self.cache.trim(keep=chunk.digest)
        return mapped

    def _decoded(self, chunk: PlannedChunk) -> Mapped:
        path = self.cache.decoded_path(chunk.digest)
        recorded = self.cache.recorded(chunk.digest)
        if recorded is not None:
            mapped = self._cached(chunk, path, recorded, "decoded copy", "making it again")
            if mapped is not None:
                return mapped
        self.cache.forget_decoded(chunk.digest)
        with self._verified(chunk) as source:
            return _decode(source, path, self.cache)

    def _verified(self, chunk: PlannedChunk) -> Mapped:
        """The cached Parquet file of ``chunk``, hashed now, or fetched (under its lock)."""
        path = self.cache.path(chunk.digest)
        mapped = self._cached(chunk, path, chunk.plain, "cached copy", "fetching it again")
        if mapped is not None:
            return mapped
        path.unlink(missing_ok=True)
        self._fetch(chunk, path)  # hashed as it landed
        return Mapped(path)

    def _cached(self, chunk: PlannedChunk, path: Path, expected: tuple[str, int], what: str,
                then: str) -> Mapped | None:
        """``path`` mapped if it is in the cache and hashes to ``expected``; a damaged file is
        logged (``what`` it is, and what is done ``then``)."""
        if not path.exists():
            return None
        mapped = _mapped_if(path, expected)
        if mapped is None:
            logger.warning("the %s of chunk %d of %s/batch=%s is damaged; %s", what,
                           chunk.index, chunk.dataset, chunk.batch_id, then)
            return None
        self.cache.used(path)
        self._count(cache_hits=1)
        return mapped

    def _fetch(self, chunk: PlannedChunk, path: Path) -> None:
        """Read the chunk into the cache from its nearest good replica, hashed as it lands
        (see :meth:`Replicas.read`)."""
        started = time.perf_counter()
        node = self.replicas.read(chunk, partial(FileOutput, path), self.nearest(chunk))
        self._count(fetched=1)
        logger.debug("fetched chunk %d from %s: %d bytes in %.2fs", chunk.index, node,
                     chunk.size, time.perf_counter() - started)

    def _account(self, node: str, nbytes: int) -> None:
        report, cost = self.report, self.cost(node)
        with self._lock:
            report.bytes_from[node] += nbytes
            report.egress_usd += nbytes / 1e9 * cost.egress_usd_per_gb
            if self.topology.node(node).cloud != report.place.cloud:
                report.cross_cloud_bytes += nbytes

    def _count(self, *, cache_hits: int = 0, fetched: int = 0) -> None:
        with self._lock:  # a reader's threads share the report
            self.report.cache_hits += cache_hits
            self.report.fetched += fetched
