"""What gc may free: for every log of commits (new and grown versions of a few files),
rollbacks, quarantines and releases, and every set of kept snapshots, the walk names exactly
the batches and chunks that no kept snapshot reads when each is read as a reader reads it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.commit.manifest import Manifest
from skyferry.commit.snapshots import BatchRef, Snapshot
from skyferry.ingest.versions import live_parts, live_sources
from skyferry.models import ChunkPart, SourceFile, StoredChunk
from skyferry.ops.expire import Unneeded, unneeded
from tests.helpers.sf_data import small_plan

URLS = ["s3://b/a.csv", "s3://b/b.csv", "s3://b/c.csv"]


def _manifest(batch_id: str, files: list[tuple[str, bool]], shapes: list[list[str]]
              ) -> Manifest:
    """A batch holding a version of each of ``files`` (url, grown), in chunks whose parts
    come from the urls each shape lists."""
    sources = [SourceFile(url=u, size=10, fingerprint=batch_id, extends=5 if grown else 0)
               for u, grown in files]
    chunks = [StoredChunk(index=i, key=f"{batch_id}/{i}", format="csv", digest=f"{i:064x}",
                          size=1, source_digest="", rows_in=1, rows_out=1, rows_rejected=0,
                          rejects_key=None, parts=tuple(ChunkPart(source=u, start=0, end=1)
                                                        for u in shape),
                          replicas=())
              for i, shape in enumerate(shapes)]
    plan = small_plan("d", 1)
    lineage = plan.lineage.model_copy(update={"sources": sources})
    return Manifest.from_plan(plan.model_copy(update={"batch_id": batch_id,
                                                      "lineage": lineage}), chunks)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Snapshot], dict[str, Manifest], list[list[str]]]:
    """A log as SnapshotLog.append writes it, its batches' manifests, and what each
    snapshot holds (in order)."""
    entries: list[Snapshot] = []
    manifests: dict[str, Manifest] = {}
    held: dict[str, None] = {}
    hidden: set[str] = set()
    states: list[list[str]] = []
    for seq in range(draw(st.integers(1, 12))):
        added: list[str] = []
        removed: list[str] = []
        kind = draw(st.sampled_from(["commit"] * 4 + ["rollback", "quarantine", "release"]))
        if kind == "rollback" and states:
            target = states[draw(st.integers(0, len(states) - 1))]
            removed = [b for b in held if b not in target]
            added = [b for b in target if b not in held and b not in hidden]
        elif kind == "quarantine" and held:
            batch = draw(st.sampled_from(sorted(held)))
            hidden.add(batch)
            removed = [batch]
        elif kind == "release" and hidden:
            batch = draw(st.sampled_from(sorted(hidden)))
            hidden.discard(batch)
            added = [batch]
        else:
            batch = f"b{seq}"
            urls = draw(st.lists(st.sampled_from(URLS), min_size=1, max_size=3, unique=True))
            files = [(u, draw(st.booleans())) for u in urls]
            shapes = draw(st.lists(st.lists(st.sampled_from(urls), min_size=1, max_size=2),
                                   min_size=1, max_size=3))
            manifests[batch] = _manifest(batch, files, shapes)
            added = [batch]
        for b in removed:
            del held[b]
        for b in added:
            held.setdefault(b)
        states.append(list(held))
        entries.append(Snapshot(
            dataset="d", seq=seq, id=f"{seq:016x}", parent=None, created_at="2026-12-01",
            operation="commit", added=[BatchRef(batch_id=b, digest="", created_at="", rows=1,
                                                bytes=1) for b in added],
            removed=removed, batches=len(held), rows=0, bytes=0, quarantined=sorted(hidden)))
    gone = draw(st.sets(st.sampled_from(sorted(manifests))))  # retracted by an earlier gc
    return entries, {b: m for b, m in manifests.items() if b not in gone}, states


def _brute(entries: list[Snapshot], manifests: dict[str, Manifest], states: list[list[str]],
           kept: set[int], keep: set[str]) -> Unneeded:
    """Read each kept snapshot as a reader would, and name what none of them read."""
    held_by_kept: set[str] = set()
    read: set[tuple[str, int]] = set()
    for seq in kept:
        ordered = [manifests[b] for b in states[seq] if b in manifests]
        live = live_sources(ordered)
        held_by_kept.update(states[seq])
        for manifest in ordered:
            for chunk in manifest.chunks:
                if any(live_parts(manifest, chunk, live)):
                    read.add((manifest.batch_id, chunk.index))
    ever = {r.batch_id for e in entries for r in e.added}
    found = Unneeded()
    for batch_id in sorted(ever & manifests.keys() - keep):
        if batch_id not in held_by_kept:
            found.batches.append(batch_id)
            continue
        idle = [c.index for c in manifests[batch_id].chunks if (batch_id, c.index) not in read]
        if idle:
            found.chunks[batch_id] = idle
    return found


@settings(max_examples=400, deadline=None, derandomize=True)
@given(histories(), st.data())
def test_the_walk_frees_exactly_what_no_kept_snapshot_reads(
        history: tuple[list[Snapshot], dict[str, Manifest], list[list[str]]],
        data: st.DataObject) -> None:
    entries, manifests, states = history
    kept = data.draw(st.sets(st.integers(0, len(entries) - 1)), label="kept")
    kept.add(len(entries) - 1)  # the newest is always kept
    keep = set(entries[-1].quarantined)
    assert unneeded(entries, manifests, kept, keep=keep) == \
        _brute(entries, manifests, states, kept, keep)


def test_a_grown_file_keeps_its_first_version_and_a_rewritten_one_frees_it() -> None:
    first = _manifest("b0", [(URLS[0], False)], [[URLS[0]]])
    grown = _manifest("b1", [(URLS[0], True)], [[URLS[0]]])
    rewritten = _manifest("b2", [(URLS[0], False)], [[URLS[0]]])

    def log(*batches: str) -> list[Snapshot]:
        return [Snapshot(dataset="d", seq=i, id=f"{i:016x}", parent=None, created_at="x",
                         operation="commit", added=[BatchRef(batch_id=b, digest="",
                                                             created_at="", rows=1, bytes=1)],
                         batches=i + 1, rows=0, bytes=0) for i, b in enumerate(batches)]

    both = {"b0": first, "b1": grown}
    assert unneeded(log("b0", "b1"), both, {1}) == Unneeded()  # the grown version reads b0
    every = {**both, "b2": rewritten}
    assert unneeded(log("b0", "b1", "b2"), every, {2}) == \
        Unneeded(chunks={"b0": [0], "b1": [0]})
    assert unneeded(log("b0", "b1", "b2"), every, {1, 2}) == Unneeded()  # 1 still reads them
