"""Source versions: which committed bytes of each source file a reader sees.

A source file is ingested again when its size or fingerprint (etag, else mtime) changes:

- if it only grew (its earlier bytes are unchanged, checked against the source hashes the
  manifests keep, and the earlier version ended on a record boundary), the new batch holds
  only the bytes from the earlier end on, and the version *extends* the earlier one;
- otherwise the new version *supersedes* every earlier one, and readers skip the earlier
  versions' rows and bytes.

A source file that is deleted keeps its last committed version: skyferry loads, it does not
mirror deletions.

Planning reads these versions from a :class:`SourceIndex` (``index/<dataset>/sources.json``
in the catalog), not from every manifest: each commit folds its manifest in, so planning
costs one listing of the manifests' keys plus the new files, whatever the history. The
manifests stay the truth: an index that misses a manifest folds it in, and one that holds
a manifest no longer listed (retracted, or lost from the catalog) is rebuilt from them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from skyferry.commit.manifest import Catalog, Manifest
from skyferry.errors import StorageError
from skyferry.hashing import new_hasher
from skyferry.ingest.listing import detect_format
from skyferry.ingest.read import read_range
from skyferry.models import ChunkPart, SourceFile, StoredChunk
from skyferry.storage import safe_key

__all__ = ["LiveSource", "SourceIndex", "grown_from", "index_key", "live_parts", "live_sources",
           "load_index", "rebuild_index"]

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


def _part_digests(chunk: StoredChunk) -> Sequence[str | None]:
    if chunk.part_digests:
        return chunk.part_digests
    return [chunk.source_digest] if len(chunk.parts) == 1 else [None] * len(chunk.parts)


INDEX_FORMAT = 1


class IndexedSource(BaseModel):
    """One source file's live version, the batches that hold it, and their parts of it
    (``start``, ``end``, source hash or None)."""

    file: SourceFile
    batches: list[str]
    parts: list[tuple[int, int, str | None]]


class SourceIndex(BaseModel):
    """A dataset's live source versions, folded from its manifests in commit order."""

    format: int = INDEX_FORMAT
    dataset: str
    manifests: list[str] = []  # the manifest keys folded in
    newest: tuple[str, str] = ("", "")  # (created_at, batch_id) of the newest of them
    sources: dict[str, IndexedSource] = {}

    def fold(self, manifest: Manifest, key: str) -> None:
        """Add a manifest committed after every one already folded."""
        parts: dict[str, list[tuple[int, int, str | None]]] = {}
        for chunk in manifest.chunks:
            for part, digest in zip(chunk.parts, _part_digests(chunk), strict=True):
                parts.setdefault(part.source, []).append((part.start, part.end, digest))
        for source in manifest.lineage.sources:
            earlier = self.sources.get(source.url)
            batches, held = {manifest.batch_id}, []
            if source.extends and earlier is not None:
                batches |= set(earlier.batches)
                held = list(earlier.parts)
            self.sources[source.url] = IndexedSource(
                file=source, batches=sorted(batches), parts=held + parts.get(source.url, []))
        self.manifests.append(key)
        self.newest = max(self.newest, (manifest.created_at, manifest.batch_id))

    def live(self) -> dict[str, LiveSource]:
        return {url: LiveSource(file=s.file, batches=frozenset(s.batches))
                for url, s in self.sources.items()}

    def parts_of(self, url: str) -> list[tuple[ChunkPart, str | None]]:
        """The committed parts of ``url``'s live version, with their source hashes."""
        held = self.sources.get(url)
        return [] if held is None else [
            (ChunkPart(source=url, start=start, end=end, header_end=0, row_groups=()), digest)
            for start, end, digest in held.parts]


def index_key(dataset: str) -> str:
    return safe_key("index", dataset, "sources.json")


def _save(catalog: Catalog, index: SourceIndex) -> None:
    """Best effort: an index that could not be written costs the next plan a fold."""
    try:
        catalog.store.put(index_key(index.dataset), index.model_dump_json().encode())
    except StorageError as exc:
        logger.warning("the source index of %s was not saved (the next run rebuilds it): %s",
                       index.dataset, exc)


def rebuild_index(catalog: Catalog, dataset: str) -> SourceIndex:
    """The index folded from every committed manifest (the catalog's and the nodes'), saved."""
    index = SourceIndex(dataset=dataset)
    for manifest in catalog.manifests(dataset):
        index.fold(manifest, catalog.key_of(manifest))
    _save(catalog, index)
    return index


def load_index(catalog: Catalog, dataset: str) -> SourceIndex:
    """The dataset's source index, checked against one listing of the catalog's manifests.

    Manifests the index lacks, committed after everything it holds, are read and folded
    in (and the index saved). Anything else (no index, one holding a manifest that is not
    listed, or lacking an older one) rebuilds it from the manifests.
    """
    listed = {o.key for o in catalog.store.list(safe_key("manifests", dataset))
              if o.key.endswith(".json")}
    index: SourceIndex | None = None
    try:
        index = SourceIndex.model_validate_json(catalog.store.get(index_key(dataset)))
    except (StorageError, ValidationError, ValueError):
        index = None
    if index is not None and index.format == INDEX_FORMAT and index.dataset == dataset:
        known = set(index.manifests)
        if known <= listed:
            if known == listed:
                return index
            try:
                fresh = [Manifest.model_validate_json(catalog.store.get(key))
                         for key in sorted(listed - known)]
            except (StorageError, ValidationError, ValueError):
                fresh = []
            fresh.sort(key=lambda m: (m.created_at, m.batch_id))
            if fresh and (fresh[0].created_at, fresh[0].batch_id) > index.newest:
                for manifest in fresh:
                    index.fold(manifest, catalog.key_of(manifest))
                _save(catalog, index)
                return index
    logger.info("rebuilding the source index of %s from its manifests", dataset)
    return rebuild_index(catalog, dataset)


def _digest_of_range(url: str, start: int, end: int,
                     options: Mapping[str, Any] | None) -> str:
    digest = new_hasher()
    for offset in range(start, end, _BLOCK):
        digest.update(read_range(url, offset, min(offset + _BLOCK, end), options))
    return digest.hexdigest()


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
