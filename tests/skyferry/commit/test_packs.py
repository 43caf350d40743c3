"""Manifest packs: a snapshot's manifests read from a few objects, never stale."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyferry.commit import packs
from skyferry.commit.manifest import Catalog, Manifest, open_catalog
from skyferry.commit.packs import read_packed, runs
from skyferry.commit.snapshots import BatchRef, batch_digest, committed
from skyferry.storage import Store
from skyferry.topology import load_topology
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

Reader = Callable[[Sequence[BatchRef]], "list[Manifest] | None"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """One real committed manifest, cloned into many batches below."""
    root = tmp_path_factory.mktemp("packs")
    with pytest.MonkeyPatch.context() as patch:
        from skyferry.config import get_settings

        patch.setenv("SKYFERRY_HOME", str(root / "home"))
        get_settings.cache_clear()
        write_ml_csv(root / "src" / "part.csv", 20, seed=1)
        manifest = commit_without_prefect(root / "src", "pk")
        get_settings.cache_clear()
    return manifest


def _clone(base: Manifest, i: int) -> Manifest:
    chunk = base.chunks[0].model_copy(update={"digest": f"{i:064x}", "key": f"pk/c{i}"})
    return base.model_copy(update={"batch_id": f"{i:016x}", "chunks": [chunk]})


def _reader(catalog: Catalog, asked: list[list[str]]) -> Reader:
    """Read each ref's manifest by key, checked against its digest; record what was asked."""
    def one_by_one(refs: Sequence[BatchRef]) -> list[Manifest] | None:
        asked.append([r.batch_id for r in refs])
        found = []
        for ref in refs:
            manifest = Manifest.model_validate_json(
                catalog.store.get(catalog.manifest_key("pk", ref.created_at[:10], ref.batch_id)))
            if batch_digest(manifest) != ref.digest:
                return None
            found.append(manifest)
        return found
    return one_by_one


def _packs(catalog: Catalog) -> list[str]:
    return sorted(n for n in catalog.store.names("packs/pk") if n.endswith(".json"))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(count=st.integers(1, 60), span=st.integers(1, 6),
       steps=st.lists(st.tuples(st.sampled_from(["read", "rewrite", "damage", "drop"]),
                                st.integers(0, 10_000)), min_size=1, max_size=12))
def test_packed_reads_equal_reads_one_by_one_through_rewrites_and_damage(
        base: Manifest, tmp_path_factory: pytest.TempPathFactory, count: int, span: int,
        steps: list[tuple[str, int]]) -> None:
    catalog = Catalog(Store(str(tmp_path_factory.mktemp("cat")), name="catalog"))
    current = [_clone(base, i) for i in range(count)]
    for manifest in current:
        catalog.commit(manifest)
    hidden: set[int] = set()  # batches a quarantine keeps out of the snapshot read
    for what, n in steps:
        if what == "rewrite":  # same chunks, a new revision: the digest does not change
            i = n % count
            newer = current[i].model_copy(update={"revision": current[i].revision + 1})
            catalog.commit(newer, previous=current[i])
            current[i] = newer
        elif what == "damage" and (names := _packs(catalog)):
            catalog.store.put(f"packs/pk/{names[n % len(names)]}", b"{not a pack")
        elif what == "drop":
            hidden ^= {n % count}
        wanted = [m for i, m in enumerate(current) if i not in hidden]
        refs = [BatchRef.of(m) for m in wanted]
        asked: list[list[str]] = []
        assert read_packed(catalog, "pk", refs, _reader(catalog, asked), span) == wanted
        again: list[list[str]] = []
        assert read_packed(catalog, "pk", refs, _reader(catalog, again), span) == wanted
        tail = runs(refs, span)[1]
        assert again == [[r.batch_id for r in tail]]  # the second read: packs, and the tail


def test_a_pack_is_not_made_when_the_generation_changes_while_it_is_read(
        base: Manifest, tmp_path: Path) -> None:
    catalog = Catalog(Store(str(tmp_path), name="catalog"))
    wanted = [_clone(base, i) for i in range(40)]
    for manifest in wanted:
        catalog.commit(manifest)
    refs = [BatchRef.of(m) for m in wanted]
    asked: list[list[str]] = []
    by_key = _reader(catalog, asked)

    def rewritten_meanwhile(some: Sequence[BatchRef]) -> list[Manifest] | None:
        found = by_key(some)
        catalog.new_pack_generation("pk")  # a repair began while these were read
        return found

    assert read_packed(catalog, "pk", refs, rewritten_meanwhile, 4) == wanted
    assert _packs(catalog) == []
    assert read_packed(catalog, "pk", refs, by_key, 4) == wanted
    done = runs(refs, 4)[0]
    assert len(_packs(catalog)) == len(done) > 0
    generation = catalog.pack_generation("pk")
    assert generation and all(n.startswith(generation) for n in _packs(catalog))
    catalog.retract(wanted[0])  # a change to a committed manifest: every pack is stale
    assert _packs(catalog) == [] and catalog.pack_generation("pk") != generation


def test_a_reader_sees_a_repair_rewrite_through_its_packs(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from skyferry.ops.repair import repair_dataset

    monkeypatch.setattr(packs, "PACK_SPAN", 2)
    for i in range(8):
        write_ml_csv(tmp_path / f"b{i}" / "part.csv", 30, seed=i, start_id=100 * i)
        commit_without_prefect(tmp_path / f"b{i}", "pk")
    topology = load_topology()
    catalog = open_catalog(topology)
    first = committed(catalog, "pk")
    assert sum(m.rows_stored for m in first.manifests) == 240
    made = _packs(catalog)
    assert made  # the first read made packs
    assert committed(catalog, "pk").manifests == first.manifests  # read back from them

    chunk = first.manifests[0].chunks[0]
    (home / "nodes" / chunk.verified[0].node / chunk.key).unlink()  # repair rewrites
    repair_dataset(topology, "pk")
    after = committed(catalog, "pk")
    rewritten = [m for m in after.manifests if m.revision > 0]
    assert rewritten and not set(made) & set(_packs(catalog))
    assert after.manifests == [catalog.manifest("pk", m.batch_id) for m in first.manifests]
