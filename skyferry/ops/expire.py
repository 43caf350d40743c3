"""Which committed batches and chunks no kept snapshot reads any more.

A batch is needed while a kept snapshot holds it (see :mod:`skyferry.commit.retention` for
which are kept). A chunk of a needed batch is needed while a kept snapshot that holds its
batch reads one of its parts: a part is read unless a newer version of its source file in
that snapshot superseded it (see :mod:`skyferry.ingest.versions`). So once every kept
snapshot holds a newer version of a file, the chunks of its older versions can go.

The log is walked once, oldest first. For each source file with more than one committed
version, the set of batches whose version a reader of the snapshot at hand would see is
kept up to date as batches come and go; a chunk records the spans of the log in which one
of its parts is read, and a batch the spans in which it is held. Something is needed when a
kept snapshot falls in one of its spans. The cost is one step per batch added or dropped,
whatever the number of snapshots kept.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from skyferry.commit.manifest import Manifest
from skyferry.commit.snapshots import Snapshot
from skyferry.models import SourceFile

__all__ = ["Unneeded", "unneeded"]

_END = 1 << 62


@dataclass
class Unneeded:
    """What no kept snapshot reads: whole batches, and chunks of batches still needed."""

    batches: list[str] = field(default_factory=list)
    chunks: dict[str, list[int]] = field(default_factory=dict)  # batch id -> chunk indices


class _Spans:
    """Spans of the log, ``[start, end)``, in which a thing is held or read."""

    def __init__(self) -> None:
        self.open: dict[object, int] = {}
        self.closed: dict[object, list[tuple[int, int]]] = defaultdict(list)

    def start(self, thing: object, seq: int) -> None:
        self.open.setdefault(thing, seq)

    def stop(self, thing: object, seq: int) -> None:
        began = self.open.pop(thing, None)
        if began is not None and began < seq:
            self.closed[thing].append((began, seq))

    def touches(self, thing: object, kept: Sequence[int]) -> bool:
        spans = list(self.closed.get(thing, ()))
        if thing in self.open:
            spans.append((self.open[thing], _END))
        for start, end in spans:
            at = bisect.bisect_left(kept, start)
            if at < len(kept) and kept[at] < end:
                return True
        return False


def unneeded(entries: Sequence[Snapshot], manifests: Mapping[str, Manifest],
             kept: Collection[int], *, keep: Collection[str] = ()) -> Unneeded:
    """The batches of the log ``entries`` (all of it, oldest first) that no snapshot in
    ``kept`` holds, and the chunks of the others that none of them reads; ``manifests``:
    the committed ones by batch id (a batch without one is never named); ``keep``: batch ids
    kept whatever the log says (the newest snapshot's quarantined batches)."""
    order = sorted(kept)
    sources: dict[str, dict[str, SourceFile]] = {
        b: {s.url: s for s in m.lineage.sources} for b, m in manifests.items()}
    versions = Counter(url for by_url in sources.values() for url in by_url)
    several = {url for url, n in versions.items() if n > 1}
    # the chunks that can be superseded (every part from a file with several versions),
    # by batch and file: one entry per part
    parts_of: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for batch_id, manifest in manifests.items():
        for chunk in manifest.chunks:
            if chunk.parts and all(p.source in several for p in chunk.parts):
                for part in chunk.parts:
                    parts_of[batch_id][part.source].append(chunk.index)

    held: dict[str, None] = {}  # in the order a reader reads them
    live: dict[str, set[str]] = {}  # file -> the batches whose version of it is read
    reading: Counter[tuple[str, int]] = Counter()  # chunk -> its parts being read
    held_spans, read_spans = _Spans(), _Spans()

    def change(url: str, now: set[str], seq: int) -> None:
        before = live.get(url, set())
        for batch_id in before - now:
            for index in parts_of[batch_id][url]:
                reading[(batch_id, index)] -= 1
                if not reading[(batch_id, index)]:
                    read_spans.stop((batch_id, index), seq)
        for batch_id in now - before:
            for index in parts_of[batch_id][url]:
                if not reading[(batch_id, index)]:
                    read_spans.start((batch_id, index), seq)
                reading[(batch_id, index)] += 1
        live[url] = now

    def replay(url: str) -> set[str]:  # as versions.live_sources reads the held batches
        now: set[str] = set()
        for batch_id in held:
            source = sources.get(batch_id, {}).get(url)
            if source is not None:
                now = (now | {batch_id}) if source.extends and now else {batch_id}
        return now

    ever: set[str] = set()
    for entry in entries:
        seq = entry.seq
        for batch_id in entry.removed:
            if batch_id in held:
                del held[batch_id]
                held_spans.stop(batch_id, seq)
                for url in sources.get(batch_id, {}).keys() & several:
                    change(url, replay(url), seq)
        for ref in entry.added:
            batch_id = ref.batch_id
            ever.add(batch_id)
            if batch_id in held:
                continue
            held[batch_id] = None
            held_spans.start(batch_id, seq)
            for url, source in sources.get(batch_id, {}).items():
                if url in several:
                    now = live.get(url, set())
                    change(url, (now | {batch_id}) if source.extends and now else {batch_id},
                           seq)

    found = Unneeded()
    for batch_id in sorted(ever & manifests.keys()):
        if batch_id in keep:
            continue
        if not held_spans.touches(batch_id, order):
            found.batches.append(batch_id)
            continue
        idle = sorted(index for index in {i for ids in parts_of[batch_id].values() for i in ids}
                      if not read_spans.touches((batch_id, index), order))
        if idle:
            found.chunks[batch_id] = idle
    return found
