"""The source index: planning reads one index and one listing, not every manifest, and the
index always agrees with the manifests it is folded from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import fsspec
import pytest

from skyferry.commit.manifest import Catalog, Manifest, open_catalog
from skyferry.config import PipelineConfig
from skyferry.distribute.probe import probe_nodes
from skyferry.hashing import content_hash
from skyferry.ingest.versions import SourceIndex, live_sources, source_index
from skyferry.run.batch import commit_batch, journal_chunk, new_source_files, plan_batch
from skyferry.run.chunk import move_chunk
from skyferry.run.context import open_run
from skyferry.topology import load_topology
from tests.helpers.sf_data import write_ml_csv


def _run(source: Path, dataset: str) -> list[str]:
    """One batch of what is new under ``source``; the paths it took."""
    setup = open_run(PipelineConfig(source=str(source), dataset=dataset, chunk_size="64KB"))
    probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
    files = new_source_files(setup).files
    if not files:
        return []
    run = plan_batch(setup, files)
    try:
        stored = [move_chunk(c, run)[0] for c in run.plan.chunks]
        for chunk in stored:
            journal_chunk(run, chunk)
        commit_batch(run, stored)
    finally:
        run.close()
    return sorted(f.path for f in files)


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every manifest parsed from here on."""
    count: list[int] = []
    real = Manifest.model_validate_json.__func__  # type: ignore[attr-defined]

    def parse(cls: type[Manifest], data: object, **kw: object) -> Manifest:
        count.append(1)
        return real(cls, data, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(Manifest, "model_validate_json", classmethod(parse))
    return count


def _agrees(catalog: Catalog, dataset: str) -> None:
    """Every file's live version in the index is the one the manifests give."""
    truth = live_sources(catalog.manifests(dataset))
    index = source_index(catalog, dataset)
    for url, live in truth.items():
        found = index.lookup(url)
        assert found is not None and found[0] == live, url


def test_planning_reads_no_manifest_once_the_index_is_built(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for i in range(4):  # four batches of history, one file each
        write_ml_csv(src / f"f{i}.csv", 300, seed=i)
        assert _run(src, "idx") == [f"f{i}.csv"]
    catalog = open_catalog(load_topology())
    write_ml_csv(src / "new.csv", 300, seed=9)
    reads = _reads(monkeypatch)
    setup = open_run(PipelineConfig(source=str(src), dataset="idx"))
    assert [f.path for f in new_source_files(setup).files] == ["new.csv"]
    assert reads == []  # an entry per listed file: no manifest read, no manifest listed
    monkeypatch.undo()
    _agrees(catalog, "idx")
    index = SourceIndex(catalog, "idx")
    before = {u: index.entry(u) for u in live_sources(catalog.manifests("idx"))}
    index.rebuild()
    assert {u: index.entry(u) for u in before} == before


def test_the_index_follows_the_manifests(home: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 300, seed=1)
    assert _run(src, "st") == ["a.csv"]
    catalog = open_catalog(load_topology())
    index = SourceIndex(catalog, "st")
    catalog.store.delete(index.marker_key)  # no index: built again from the manifests
    assert _run(src, "st") == []
    catalog.store.put(index.marker_key, b"{not json")  # a damaged one: the same
    assert _run(src, "st") == []
    write_ml_csv(src / "b.csv", 300, seed=2)

    def refuse(*args: object, **kwargs: object) -> str:
        raise OSError("the catalog went away (injected)")

    with monkeypatch.context() as patch:  # b.csv's version is recorded, its batch not committed
        patch.setattr(Catalog, "commit", refuse)
        with pytest.raises(OSError, match="injected"):
            _run(src, "st")
    assert index.entry(f"file://{src}/b.csv") is not None
    assert _run(src, "st") == ["b.csv"]  # not live: b.csv is taken, once
    assert _run(src, "st") == []
    (second,) = [m for m in catalog.manifests("st")
                 if [f.path for f in m.lineage.sources] == ["b.csv"]]
    catalog.retract(second)  # a batch no longer committed: its file is new again
    assert _run(src, "st") == ["b.csv"]
    _agrees(catalog, "st")


def _bucket_keys(catalog: Catalog, dataset: str) -> dict[int, int]:
    """How many bucket objects the index has, per digit count."""
    counts: dict[int, int] = {}
    for info in catalog.store.list(f"index/{dataset}"):
        folder = info.key.split("/")[-2]
        if folder.startswith("sources-"):
            digits = int(folder.removeprefix("sources-"))
            counts[digits] = counts.get(digits, 0) + 1
    return counts


def _bucket_of(src: Path, i: int) -> str:
    """The one-digit bucket of ``src/a{i}.csv``'s URL."""
    return content_hash(fsspec.filesystem("file").unstrip_protocol(
        str(src / f"a{i}.csv")).encode())[:1]


def _names(src: Path, candidates: Iterable[int], keep: Callable[[str, set[str]], bool],
           count: int) -> list[int]:
    """The first ``count`` candidates whose bucket ``keep`` accepts, given those taken."""
    picked: list[int] = []
    taken: set[str] = set()
    for i in candidates:
        digit = _bucket_of(src, i)
        if keep(digit, taken):
            picked.append(i)
            taken.add(digit)
            if len(picked) == count:
                return picked
    raise AssertionError(f"no {count} candidates fit")


def test_buckets_split_as_the_history_grows_and_a_broken_split_changes_nothing(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skyferry.ingest import versions

    monkeypatch.setattr(versions, "FIRST_DIGITS", 1)  # 16 buckets
    monkeypatch.setattr(versions, "SPLIT_AT", 2)  # split once touched buckets hold 2 each
    src = tmp_path / "src"
    # the buckets depend on the URL (so on tmp_path): the files are picked by their bucket
    first = _names(src, range(100), lambda digit, taken: digit not in taken, 2)
    for i in first:
        write_ml_csv(src / f"a{i}.csv", 50, seed=i)
    assert len(_run(src, "sp")) == 2  # two buckets of one entry each: no split
    catalog = open_catalog(load_topology())
    assert SourceIndex(catalog, "sp").digits == 1 and set(_bucket_keys(catalog, "sp")) == {1}

    # a split that fails before its marker is written leaves the old buckets in force
    second = [i for i in range(100) if i not in first][:38]  # 40 in 16 buckets: a split
    for i in second:
        write_ml_csv(src / f"a{i}.csv", 50, seed=i)

    def refuse(self: SourceIndex, digits: int) -> None:
        raise OSError("the catalog went away (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(SourceIndex, "_write_marker", refuse)
        assert len(_run(src, "sp")) == 38  # the batch commits; the split waits
    assert SourceIndex(catalog, "sp").digits == 1
    assert set(_bucket_keys(catalog, "sp")) == {1, 2}  # the unfinished split's buckets
    _agrees(catalog, "sp")  # every committed file found through the old buckets
    assert _run(src, "sp") == []  # that batch committed before the split failed

    # the next commit splits: 16 times as many buckets, the old ones deleted, all agreeing
    held = {_bucket_of(src, i) for i in [*first, *second]}
    for i in _names(src, range(100, 400), lambda digit, taken: digit in held, 4):
        write_ml_csv(src / f"a{i}.csv", 50, seed=i)  # each into a bucket that holds one
    assert len(_run(src, "sp")) == 4
    index = SourceIndex(catalog, "sp")
    assert index.digits == 2
    assert set(_bucket_keys(catalog, "sp")) == {2}
    _agrees(catalog, "sp")
    assert _run(src, "sp") == []

    # a rebuild sizes the buckets for the files it finds
    index.rebuild()
    assert SourceIndex(catalog, "sp").digits == 2 and set(_bucket_keys(catalog, "sp")) == {2}
    _agrees(catalog, "sp")
