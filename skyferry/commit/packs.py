"""Manifest packs: a snapshot's manifests read in a few objects instead of one per batch.

A snapshot of 10,000 batches names 10,000 manifests; read one by one, opening it costs
10,000 reads (seconds on a local disk, minutes on a cloud). A pack holds a run of a
snapshot's manifests, each with the digest the snapshot holds for it, in one object::

    packs/<dataset>/generation                   # a random token
    packs/<dataset>/<generation>-<group>.json    # {"entries": [{"digest", "manifest"}, ...]}

Runs are cut where content decides, not by position: a run ends at a batch whose id hashes
to 0 modulo :data:`PACK_SPAN` (64 on average), so a commit, a rollback or a quarantine
changes only the run it touches, and every other pack stays valid. A run is named by the
ids and digests of its batches. The last run of a snapshot, which the next commit extends,
is never packed.

Packs are a cache at the catalog, made by the readers that miss them, and never the source
of truth. Every change to a committed manifest (a repair's or gc's rewrite, a restore, a
retraction) starts a new generation before and after it (:meth:`Catalog.rewriting`): a pack
is read only under the generation it was made in, and a reader makes one only when the
generation did not change while it read the manifests. A lost, stale or damaged pack is
read as its manifests one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import blake3
from pydantic import BaseModel, ConfigDict, ValidationError

from skyferry.commit.manifest import Catalog, Manifest
from skyferry.errors import StorageError
from skyferry.storage import safe_key

__all__ = ["PACK_SPAN", "read_packed", "runs"]

logger = logging.getLogger("skyferry.store")

PACK_SPAN = 64  # batches in a pack, on average
_READERS = 8  # objects read at once from a remote catalog


class Ref(Protocol):
    """A batch as a snapshot holds it (:class:`skyferry.commit.snapshots.BatchRef`)."""

    @property
    def batch_id(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def created_at(self) -> str: ...


R = TypeVar("R", bound=Ref)


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True)

    digest: str
    manifest: Manifest


class _Pack(BaseModel):
    model_config = ConfigDict(frozen=True)

    entries: list[_Entry]


def _ends_run(batch_id: str, span: int) -> bool:
    return int(blake3.blake3(batch_id.encode()).hexdigest()[:8], 16) % span == 0


def runs(refs: Sequence[R], span: int) -> tuple[list[list[R]], list[R]]:
    """``refs`` cut into runs that each end at a batch whose id ends a run, and the tail
    after the last such batch (never packed)."""
    done: list[list[R]] = []
    run: list[R] = []
    for ref in refs:
        run.append(ref)
        if _ends_run(ref.batch_id, span):
            done.append(run)
            run = []
    return done, run


def _name(run: Sequence[Ref]) -> str:
    content = "\n".join(f"{r.batch_id}:{r.digest}" for r in run)
    return blake3.blake3(content.encode()).hexdigest()[:32]


def read_packed(catalog: Catalog, dataset: str, wanted: Sequence[R],
                one_by_one: Callable[[Sequence[R]], list[Manifest] | None],
                span: int | None = None) -> list[Manifest] | None:
    """The manifests of ``wanted``, in order: each run from its pack, or, when the pack is
    missing, stale or damaged, through ``one_by_one`` (which checks each manifest against
    its ref and gives None on any miss), after which the run's pack is made. None when
    ``one_by_one`` missed."""
    generation = catalog.pack_generation(dataset)
    if generation is None:
        try:
            generation = catalog.new_pack_generation(dataset)
        except StorageError as exc:  # a catalog this reader cannot write: no packs
            logger.debug("no manifest packs for %s: %s", dataset, exc)
    done, tail = runs(wanted, span or PACK_SPAN)
    prefix = safe_key("packs", dataset)

    def key(run: Sequence[Ref]) -> str:
        return f"{prefix}/{generation}-{_name(run)}.json"

    def from_pack(run: list[R]) -> list[Manifest] | None:
        if generation is None:
            return None
        try:
            pack = _Pack.model_validate_json(catalog.store.get(key(run)))
        except (StorageError, ValidationError):
            return None
        entries = pack.entries
        if len(entries) != len(run) or any(
                e.digest != r.digest or e.manifest.batch_id != r.batch_id
                for e, r in zip(entries, run, strict=True)):
            return None
        return [e.manifest for e in entries]

    if catalog.store.is_local:  # parsing holds the interpreter: threads only slow it down
        packed = [from_pack(run) for run in done]
    else:
        with ThreadPoolExecutor(max_workers=_READERS) as pool:
            packed = list(pool.map(from_pack, done))
    missed = [run for run, found in zip(done, packed, strict=True) if found is None]
    read = one_by_one([r for run in [*missed, tail] for r in run])
    if read is None:
        return None
    by_id = {m.batch_id: m for m in read}
    if missed and generation is not None:
        _make(catalog, dataset, generation, missed, by_id, key)
    return [m for run, found in zip([*done, tail], [*packed, None], strict=True)
            for m in (found if found is not None else [by_id[r.batch_id] for r in run])]


def _make(catalog: Catalog, dataset: str, generation: str, runs_: list[list[R]],
          by_id: dict[str, Manifest], key: Callable[[Sequence[R]], str]) -> None:
    """Write the packs of ``runs_``, unless the generation changed while their manifests
    were read (a rewrite may have been read half-way). A failed write leaves no pack."""
    if catalog.pack_generation(dataset) != generation:
        return
    for run in runs_:
        pack = _Pack(entries=[_Entry(digest=r.digest, manifest=by_id[r.batch_id])
                              for r in run])
        try:
            catalog.store.put(key(run), pack.model_dump_json(by_alias=True).encode(),
                              flush=False)
        except StorageError as exc:
            logger.debug("manifest pack %s not written: %s", key(run), exc)
            return
    logger.info("%s: %d manifest packs made (%d batches)", dataset, len(runs_),
                sum(len(r) for r in runs_))
