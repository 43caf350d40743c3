"""Source versions: which committed bytes of each source file a reader sees.

A source file is ingested again when its size or fingerprint (etag, else mtime) changes:

- if it only grew (its earlier bytes are unchanged, checked against the source hashes the
  manifests keep, and the earlier version ended on a record boundary), the new batch holds
  only the bytes from the earlier end on, and the version *extends* the earlier one;
- otherwise the new version *supersedes* every earlier one, and readers skip the earlier
  versions' rows and bytes.

A source file that is deleted keeps its last committed version: skyferry loads, it does not
mirror deletions.

Planning reads these versions from a :class:`SourceIndex` in the catalog, one entry per
source file, not from every manifest: planning costs an entry per file it lists, whatever
the history. The manifests stay the truth: see :class:`SourceIndex`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from skyferry.commit.copies import CATALOG
from skyferry.commit.manifest import Catalog, Manifest
from skyferry.errors import ObjectNotFoundError, SkyferryError, SnapshotError
from skyferry.hashing import content_hash, new_hasher
from skyferry.ingest.listing import detect_format
from skyferry.ingest.read import read_range
from skyferry.models import ChunkPart, SourceFile, StoredChunk
from skyferry.storage import safe_key

__all__ = ["LiveSource", "SourceIndex", "grown_from", "live_parts", "live_sources",
           "readable_sources", "source_index"]

logger = logging.getLogger("skyferry.ingest.read")

_APPENDABLE = ("csv", "jsonl", "binary")
_BLOCK = 8 << 20


@dataclass(frozen=True)
class LiveSource:
    """The newest committed version of one source file, and the batches that hold its bytes."""

    file: SourceFile
    batches: frozenset[str]


def live_sources(manifests: Iterable[Manifest]) -> dict[str, LiveSource]:
    """Each source URL's newest version, from manifests in commit order (oldest first)."""
    live: dict[str, LiveSource] = {}
    for manifest in manifests:
        for source in manifest.lineage.sources:
            earlier = live.get(source.url)
            batches = {manifest.batch_id}
            if source.extends and earlier is not None:
                batches |= earlier.batches
            live[source.url] = LiveSource(file=source, batches=frozenset(batches))
    return live


def live_parts(manifest: Manifest, chunk: StoredChunk,
               live: Mapping[str, LiveSource]) -> list[bool]:
    """For each part of ``chunk``: whether a reader sees it (its version is the live one)."""
    out = []
    for part in chunk.parts:
        source = live.get(part.source)
        out.append(source is None or manifest.batch_id in source.batches)
    return out


def readable_sources(manifests: Sequence[Manifest]) -> dict[str, LiveSource]:
    """:func:`live_sources` for a reader of ``manifests`` (a snapshot's), which raises
    :class:`SnapshotError` when it would read a chunk that gc freed: the snapshot has
    expired."""
    live = live_sources(manifests)
    gone = [f"batch {m.batch_id} chunk {c.index}" for m in manifests for c in m.freed
            if any(live_parts(m, c, live))]
    if gone:
        dataset = manifests[0].dataset
        raise SnapshotError(f"this snapshot of {dataset} has expired: gc freed what it reads "
                            f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}) under "
                            "the dataset's retention policy; read a newer snapshot",
                            dataset=dataset)
    return live


def _part_digests(chunk: StoredChunk) -> Sequence[str | None]:
    if chunk.part_digests:
        return chunk.part_digests
    return [chunk.source_digest] if len(chunk.parts) == 1 else [None] * len(chunk.parts)


INDEX_FORMAT = 3
FIRST_DIGITS = 2  # a new index: 16**2 = 256 buckets
SPLIT_AT = 96  # a commit that leaves its buckets this full on average makes 16x as many


class IndexedVersion(BaseModel):
    """One version of a source file: the batch that holds it, the manifest that commits that
    batch, and the batch's parts of the file (``start``, ``end``, source hash or None)."""

    batch_id: str
    manifest: str
    file: SourceFile
    parts: list[tuple[int, int, str | None]]


class IndexEntry(BaseModel):
    url: str
    versions: list[IndexedVersion] = []  # in commit order


class SourceIndex:
    """A dataset's source versions, one entry per source file, kept in the catalog in buckets
    by the hash of the file's URL (``index/<dataset>/sources-<D>/<hex>.json``, ``16**D``
    buckets): planning reads the buckets of the files it lists, not the history's manifests.

    The buckets stay small as the history grows: once a commit leaves the buckets it touched
    holding ``SPLIT_AT`` entries on average, the index is rewritten into 16 times as many
    (``D + 1``), and ``index/<dataset>/index.json`` names the new ``D`` only when every new
    bucket is written. So a commit reads and writes about one small bucket per source file,
    whatever the history; an entry is parsed only when it is looked up.

    A commit records its sources' versions *before* its catalog copy is written (the commit
    point), so an entry never lacks a committed version; a version is taken as live only if
    its manifest is committed (in the catalog, else on a node), so a batch that failed to
    commit, or was retracted, is not. Entries are rebuilt from the manifests, the truth,
    when ``index.json`` is missing or of another format. One run at a time writes a dataset
    (its lease), so one process at a time writes its index.
    """

    def __init__(self, catalog: Catalog, dataset: str) -> None:
        self.catalog, self.dataset = catalog, dataset
        self._committed: dict[str, bool] = {}
        # a bucket's entries; each parsed (an IndexEntry) when first looked up
        self._buckets: dict[str, dict[str, IndexEntry | dict[str, Any]]] = {}
        self._digits: int | None = None

    @property
    def marker_key(self) -> str:
        return safe_key("index", self.dataset, "index.json")

    def _read_marker(self) -> dict[str, Any] | None:
        """The marker, or None when it is missing, unreadable or of another format."""
        try:
            marker = json.loads(self.catalog.store.get(self.marker_key))
        except ObjectNotFoundError:
            return None
        except ValueError:
            logger.warning("the source index of %s is unreadable; it is rebuilt", self.dataset)
            return None
        if not isinstance(marker, dict) or marker.get("format") != INDEX_FORMAT \
                or not isinstance(marker.get("digits"), int):
            return None
        return marker

    @property
    def digits(self) -> int:
        """How many hex digits of the URL's hash name its bucket (from the marker)."""
        if self._digits is None:
            marker = self._read_marker()
            self._digits = marker["digits"] if marker else FIRST_DIGITS
        return self._digits

    def _prefix(self, digits: int) -> str:
        return safe_key("index", self.dataset, f"sources-{digits}")

    def _bucket_key(self, bucket: str) -> str:
        return safe_key("index", self.dataset, f"sources-{len(bucket)}", f"{bucket}.json")

    def _bucket(self, url: str, digits: int | None = None) -> str:
        return content_hash(url.encode())[:digits or self.digits]

    def _load(self, bucket: str) -> dict[str, IndexEntry | dict[str, Any]]:
        if bucket not in self._buckets:
            try:
                raw = json.loads(self.catalog.store.get(self._bucket_key(bucket)))
                self._buckets[bucket] = dict(raw.get("entries", {}))
            except ObjectNotFoundError:
                self._buckets[bucket] = {}
        return self._buckets[bucket]

    def prefetch(self, urls: Iterable[str]) -> None:
        """Read the buckets of ``urls`` at once (one read per bucket, not per file)."""
        buckets = sorted({self._bucket(u) for u in urls} - set(self._buckets))
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(self._load, buckets))

    def entry(self, url: str) -> IndexEntry | None:
        entries = self._load(self._bucket(url))
        found = entries.get(url)
        if isinstance(found, dict):
            found = entries[url] = IndexEntry.model_validate(found)
        return found

    def _is_committed(self, key: str) -> bool:
        if key not in self._committed:
            found = self.catalog.store.exists(key)
            if not found:  # a catalog that lost its copy: a node's copy still commits it
                places = [p for p in self.catalog.places.names if p != CATALOG]
                answers, _ = self.catalog.places.each(places, lambda store: store.exists(key))
                found = any(answers.values())
            self._committed[key] = found
        return self._committed[key]

    def lookup(self, url: str) -> tuple[LiveSource, list[tuple[ChunkPart, str | None]]] | None:
        """The file's live version and the committed parts of it, or None: never committed."""
        entry = self.entry(url)
        if entry is None:
            return None
        committed = [v for v in reversed(entry.versions) if self._is_committed(v.manifest)]
        if not committed:
            return None
        chain = [committed[0]]
        for older in committed[1:]:  # a version that extends the one before it keeps it
            if not chain[-1].file.extends:
                break
            chain.append(older)
        parts = [(ChunkPart(source=url, start=start, end=end, header_end=0, row_groups=()),
                  digest) for v in chain for start, end, digest in v.parts]
        return LiveSource(file=chain[0].file, batches=frozenset(v.batch_id for v in chain)), parts

    def record(self, manifest: Manifest) -> None:
        """Add the manifest's source versions to their entries (before it is committed)."""
        self.prefetch(f.url for f in manifest.lineage.sources)
        touched = self._add(manifest)
        self._save(touched)
        if touched and sum(len(self._buckets[b]) for b in touched) / len(touched) >= SPLIT_AT:
            try:
                self._split()
            except (OSError, SkyferryError) as exc:  # the old buckets stay in force
                self._buckets = {}
                logger.warning("could not split the source index of %s (it stays as it is; "
                               "the next commit tries again): %s", self.dataset, exc)

    def _add(self, manifest: Manifest) -> set[str]:
        """Add the manifest's versions to the buckets in memory; the buckets touched. The
        entries are kept as JSON-ready dicts, parsed again only when looked up."""
        key = self.catalog.key_of(manifest)
        parts: dict[str, list[list[Any]]] = {}
        for chunk in manifest.chunks:
            for part, digest in zip(chunk.parts, _part_digests(chunk), strict=True):
                parts.setdefault(part.source, []).append([part.start, part.end, digest])
        touched = set()
        for source in manifest.lineage.sources:
            bucket = self._bucket(source.url)
            entries = self._load(bucket)
            found = entries.get(source.url)
            raw = found.model_dump(mode="json") if isinstance(found, IndexEntry) \
                else found or {"url": source.url, "versions": []}
            raw["versions"] = [v for v in raw["versions"] if v["batch_id"] != manifest.batch_id]
            raw["versions"].append({"batch_id": manifest.batch_id, "manifest": key,
                                    "file": source.model_dump(mode="json"),
                                    "parts": parts.get(source.url, [])})
            entries[source.url] = raw
            touched.add(bucket)
        self._committed.pop(key, None)
        return touched

    def _save(self, buckets: set[str]) -> None:
        def save(bucket: str) -> None:
            body = {"entries": {u: e.model_dump(mode="json") if isinstance(e, IndexEntry)
                                else e for u, e in self._buckets[bucket].items()}}
            self.catalog.store.put(self._bucket_key(bucket), json.dumps(body).encode())

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(save, sorted(buckets)))

    def _split(self) -> None:
        """Rewrite every entry into 16 times as many buckets, then name them in the marker
        (a crash before that leaves the index as it was), then delete the old buckets."""
        old, new = self.digits, self.digits + 1
        old_keys = [i.key for i in self.catalog.store.list(self._prefix(old))]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(self._load, [k.rsplit("/", 1)[1].removesuffix(".json")
                                       for k in old_keys]))
            for info in list(self.catalog.store.list(self._prefix(new))):
                self.catalog.store.delete(info.key)  # a split that did not finish
        split: dict[str, dict[str, IndexEntry | dict[str, Any]]] = {}
        for bucket, entries in self._buckets.items():
            if len(bucket) == old:
                for url, entry in entries.items():
                    split.setdefault(self._bucket(url, new), {})[url] = entry
        self._buckets = split
        self._save(set(split))
        self._write_marker(new)
        self._digits = new
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(self.catalog.store.delete, old_keys))
        logger.info("the source index of %s now has %d buckets (%d entries)", self.dataset,
                    16 ** new, sum(len(e) for e in split.values()))

    def _write_marker(self, digits: int) -> None:
        self.catalog.store.put(self.marker_key, json.dumps(
            {"format": INDEX_FORMAT, "digits": digits}).encode())

    def ensure(self) -> None:
        """Rebuild the entries from the manifests if the index is missing or outdated."""
        marker = self._read_marker()
        if marker is not None:
            self._digits = marker["digits"]
            return
        self.rebuild()

    def rebuild(self) -> None:
        """Every entry again from every committed manifest, in commit order."""
        logger.info("building the source index of %s from its manifests", self.dataset)
        for info in list(self.catalog.store.list(safe_key("index", self.dataset))):
            self.catalog.store.delete(info.key)
        self._buckets = {}
        manifests = list(self.catalog.manifests(self.dataset))
        files = len({f.url for m in manifests for f in m.lineage.sources})
        digits = FIRST_DIGITS  # the fewest buckets that hold under SPLIT_AT on average
        while files / 16 ** digits >= SPLIT_AT:
            digits += 1
        self._digits = digits
        touched: set[str] = set()
        for manifest in manifests:
            touched |= self._add(manifest)
        self._save(touched)
        self._write_marker(digits)


def _digest_of_range(url: str, start: int, end: int,
                     options: Mapping[str, Any] | None) -> str:
    digest = new_hasher()
    for offset in range(start, end, _BLOCK):
        digest.update(read_range(url, offset, min(offset + _BLOCK, end), options))
    return digest.hexdigest()


def source_index(catalog: Catalog, dataset: str) -> SourceIndex:
    """The dataset's source index, built from its manifests if it has none yet."""
    index = SourceIndex(catalog, dataset)
    index.ensure()
    return index


def grown_from(file: SourceFile, source: LiveSource,
               committed: Sequence[tuple[ChunkPart, str | None]], fmt: str,
               options: Mapping[str, Any] | None = None) -> int:
    """The length of ``source``'s version that ``file`` keeps unchanged, or 0.

    Non-zero only when ``file`` is larger, its format can be appended to, the earlier
    version ended on a record boundary, and every committed part of the earlier version
    (``committed``: see :meth:`SourceIndex.parts_of`) hashes as it did when it was ingested
    (this reads those bytes once).
    """
    before = source.file.size
    if file.size <= before or detect_format(file.url, fmt) not in _APPENDABLE:
        return 0
    if detect_format(file.url, fmt) != "binary" and read_range(
            file.url, before - 1, before, options) != b"\n":
        return 0
    covered = 0
    for part, digest in committed:
        if digest is None or _digest_of_range(file.url, part.start, part.end,
                                              options) != digest:
            return 0
        covered += part.size
    if covered != before:
        return 0
    logger.info("%s grew from %d to %d bytes; only the new bytes are ingested", file.url,
                before, file.size)
    return before
