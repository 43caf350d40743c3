"""The source index: planning reads one index and one listing, not every manifest, and the
index always agrees with the manifests it is folded from."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyferry.commit.manifest import Manifest, open_catalog
from skyferry.config import PipelineConfig
from skyferry.distribute.probe import probe_nodes
from skyferry.ingest.versions import index_key, load_index, rebuild_index
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


def test_planning_reads_no_manifest_once_the_index_is_current(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for i in range(4):  # four batches of history, one file each
        write_ml_csv(src / f"f{i}.csv", 300, seed=i)
        assert _run(src, "idx") == [f"f{i}.csv"]
    catalog = open_catalog(load_topology())
    assert catalog.store.exists(index_key("idx"))
    write_ml_csv(src / "new.csv", 300, seed=9)
    reads = _reads(monkeypatch)
    setup = open_run(PipelineConfig(source=str(src), dataset="idx"))
    assert [f.path for f in new_source_files(setup).files] == ["new.csv"]
    assert reads == []  # the index and one listing: no manifest read
    monkeypatch.undo()
    index = load_index(catalog, "idx")
    assert index.model_dump() == rebuild_index(catalog, "idx").model_dump()
    assert sorted(index.sources) == sorted(f"file://{src}/f{i}.csv" for i in range(4))


def test_a_lost_or_stale_index_is_rebuilt_from_the_manifests(
        home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 300, seed=1)
    assert _run(src, "st") == ["a.csv"]
    catalog = open_catalog(load_topology())
    stale = catalog.store.get(index_key("st"))
    write_ml_csv(src / "b.csv", 300, seed=2)
    assert _run(src, "st") == ["b.csv"]
    catalog.store.put(index_key("st"), stale)  # an index that missed the second commit
    assert _run(src, "st") == []  # folded in: b.csv is not taken twice
    catalog.store.delete(index_key("st"))  # no index at all
    assert _run(src, "st") == []
    catalog.store.put(index_key("st"), b"{not json")  # a damaged one
    assert _run(src, "st") == []
    (second,) = [m for m in catalog.manifests("st")
                 if [f.path for f in m.lineage.sources] == ["b.csv"]]
    catalog.retract(second)  # a batch no longer committed: its file is new again
    assert _run(src, "st") == ["b.csv"]
    index = load_index(catalog, "st")
    assert index.model_dump() == rebuild_index(catalog, "st").model_dump()
