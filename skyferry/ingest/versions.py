"""Source versions: which committed bytes of each source file a reader sees.

A source file is ingested again when its size or fingerprint (etag, else mtime) changes:

- if it only grew (its earlier bytes are unchanged, checked against the source hashes the
  manifests keep, and the earlier version ended on a record boundary), the new batch holds
  only the bytes from the earlier end on, and the version *extends* the earlier one;
- otherwise the new version *supersedes* every earlier one, and readers skip the earlier
  versions' rows and bytes.

A source file that is deleted keeps its last committed version: skyferry loads, it does not
mirror deletions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skyferry.commit.manifest import Manifest
from skyferry.hashing import new_hasher
from skyferry.ingest.listing import detect_format
from skyferry.ingest.read import read_range
from skyferry.models import ChunkPart, SourceFile, StoredChunk

__all__ = ["LiveSource", "grown_from", "live_parts", "live_sources"]

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


def _committed_parts(url: str, source: LiveSource, manifests: Iterable[Manifest]
                     ) -> Iterator[tuple[ChunkPart, str | None]]:
    for manifest in manifests:
        if manifest.batch_id not in source.batches:
            continue
        for chunk in manifest.chunks:
            for part, digest in zip(chunk.parts, _part_digests(chunk), strict=True):
                if part.source == url:
                    yield part, digest


def _digest_of_range(url: str, start: int, end: int,
                     options: Mapping[str, Any] | None) -> str:
    digest = new_hasher()
    for offset in range(start, end, _BLOCK):
        digest.update(read_range(url, offset, min(offset + _BLOCK, end), options))
    return digest.hexdigest()


def grown_from(file: SourceFile, source: LiveSource, manifests: Sequence[Manifest], fmt: str,
               options: Mapping[str, Any] | None = None) -> int:
    """The length of ``source``'s version that ``file`` keeps unchanged, or 0.

    Non-zero only when ``file`` is larger, its format can be appended to, the earlier
    version ended on a record boundary, and every committed part of the earlier version
    hashes as it did when it was ingested (this reads those bytes once).
    """
    before = source.file.size
    if file.size <= before or detect_format(file.url, fmt) not in _APPENDABLE:
        return 0
    if detect_format(file.url, fmt) != "binary" and read_range(
            file.url, before - 1, before, options) != b"\n":
        return 0
    covered = 0
    for part, digest in _committed_parts(file.url, source, manifests):
        if digest is None or _digest_of_range(file.url, part.start, part.end,
                                              options) != digest:
            return 0
        covered += part.size
    if covered != before:
        return 0
    logger.info("%s grew from %d to %d bytes; only the new bytes are ingested", file.url,
                before, file.size)
    return before
