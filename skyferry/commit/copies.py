"""The places a committed manifest is kept: the catalog, and every node that holds a verified
replica of its batch.

Each place keeps the manifest at the same key, ``manifests/<dataset>/date=<d>/batch=<id>.json``,
with the same bytes. A commit writes the node copies first and the catalog's copy last, and
counts once the catalog's copy and W node copies (the batch's write quorum, as for its
replicas) are written (flushed, on a local disk), spanning as many clouds as the batch's
``min_clouds`` asks of its replicas. So the loss of the catalog's location, or of any one
cloud, loses no manifest.

A reader takes the union: every manifest the catalog lists, read from the catalog, and every
one that only nodes list, read from the copy with the highest ``revision`` (a repair that
rewrites a manifest raises it). Every readable copy is read: copies of one batch must agree on
its chunks and their digests (a revision may change where replicas are, never which chunks
the batch holds), and copies that disagree are a conflict, never a choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from skyferry.errors import StorageError, TopologyError
from skyferry.storage import ObjectInfo, Store

__all__ = ["CATALOG", "Places", "Survey", "SurveyEntry"]

logger = logging.getLogger("skyferry.store")

CATALOG = "catalog"  # the catalog's place name in reports; a node cannot take it
T = TypeVar("T")


@dataclass
class SurveyEntry:
    """One committed manifest: the copy a reader uses, and the places listing it."""

    body: bytes
    source: str  # the place whose copy ``body`` is
    places: dict[str, int] = field(default_factory=dict)  # place -> size of its copy
    # place -> how its copy disagrees with ``body`` on the batch's chunks
    conflicts: dict[str, str] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)  # places whose copy does not parse


@dataclass
class Survey:
    """Every manifest of a dataset, from every place that could be listed."""

    entries: dict[str, SurveyEntry] = field(default_factory=dict)  # manifest key -> entry
    unreadable: dict[str, str] = field(default_factory=dict)  # key -> why no copy reads
    unreachable: dict[str, str] = field(default_factory=dict)  # place -> why not listed


class Places:
    """The catalog's store and the nodes' stores, opened on first use, reached in parallel."""

    def __init__(self, catalog: Store, nodes: Mapping[str, Callable[[], Store]]) -> None:
        self.catalog = catalog
        self.openers = dict(nodes)
        self.stores: dict[str, Store] = {CATALOG: catalog}

    @property
    def names(self) -> list[str]:
        return [CATALOG, *sorted(self.openers)]

    def store(self, place: str) -> Store:
        if place not in self.stores:
            self.stores[place] = self.openers[place]()
        return self.stores[place]

    def each(self, places: Iterable[str], call: Callable[[Store], T]
             ) -> tuple[dict[str, T], dict[str, str]]:
        """``call(store)`` on every place at once: the results, and why the others failed."""
        places = list(places)
        done: dict[str, T] = {}
        failed: dict[str, str] = {}
        if not places:
            return done, failed

        def one(place: str) -> tuple[str, T | None, str]:
            try:
                return place, call(self.store(place)), ""
            except (StorageError, TopologyError) as exc:
                return place, None, str(exc)

        with ThreadPoolExecutor(max_workers=min(8, len(places))) as pool:
            for place, result, why in pool.map(one, places):
                if why:
                    failed[place] = why
                else:
                    done[place] = result  # type: ignore[assignment]
        return done, failed

    def survey(self, prefix: str, parse: Callable[[bytes], tuple[int, object] | None]
               ) -> Survey:
        """List ``prefix`` on every place, read every copy, and pick each manifest's copy
        (see the module).

        ``parse(body)`` reads a copy: its revision and what every copy must agree on (the
        batch's chunks), or None when it is not a valid manifest.
        """
        listed, unreachable = self.each(
            self.names, lambda store: {o.key: o for o in store.list(prefix)
                                       if o.key.endswith(".json") and "/batch=" in o.key})
        survey = Survey(unreachable=unreachable)
        if CATALOG in unreachable:
            logger.warning("the catalog cannot be listed; reading manifests from the nodes: %s",
                           unreachable[CATALOG])
        if len(unreachable) == len(self.names):
            raise StorageError(f"no place that keeps manifests could be listed: "
                               f"{unreachable[CATALOG]}", node=CATALOG, key=prefix)
        holders: dict[str, dict[str, ObjectInfo]] = {}
        for place, objects in listed.items():
            for key, info in objects.items():
                holders.setdefault(key, {})[place] = info

        def read(job: tuple[str, str]) -> tuple[str, str, bytes | None, str]:
            key, place = job
            try:
                return key, place, self.store(place).get(key), ""
            except (StorageError, TopologyError) as exc:
                return key, place, None, str(exc)

        jobs = [(key, place) for key, where in sorted(holders.items()) for place in where]
        bodies: dict[str, dict[str, bytes]] = {}
        problems: dict[str, list[str]] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as pool:
            for key, place, body, why in pool.map(read, jobs):
                if body is None:
                    problems.setdefault(key, []).append(f"{place}: {why}")
                else:
                    bodies.setdefault(key, {})[place] = body
        for key, where in sorted(holders.items()):
            entry = _choose(bodies.get(key, {}), parse)
            if entry is None:
                survey.unreadable[key] = "; ".join(
                    problems.get(key, []) + [f"{p}: not a valid manifest"
                                             for p in bodies.get(key, {})])
                continue
            entry.places = {p: info.size for p, info in where.items()}
            survey.entries[key] = entry
        return survey

    def write(self, key: str, body: bytes, places: Iterable[str]
              ) -> tuple[list[str], dict[str, str]]:
        done, failed = self.each(places, lambda store: store.put(key, body))
        return sorted(done), failed

    def remove(self, key: str, places: Iterable[str]) -> dict[str, str]:
        """Delete the copies at ``places``; why each one that stayed, stayed."""
        return self.each(places, lambda store: store.delete(key))[1]


def _choose(copies: Mapping[str, bytes], parse: Callable[[bytes], tuple[int, object] | None]
            ) -> SurveyEntry | None:
    """The copy a reader uses (the catalog's when it reads, else the highest revision), with
    every other copy that disagrees with it on the batch's chunks; None when none parses."""
    parsed = {place: parse(body) for place, body in copies.items()}
    valid = {place: found for place, found in parsed.items() if found is not None}
    if not valid:
        return None
    order = sorted(valid, key=lambda p: (p != CATALOG, -valid[p][0], p))
    source = order[0]
    entry = SurveyEntry(body=copies[source], source=source,
                        invalid=sorted(p for p, found in parsed.items() if found is None))
    revision, chunks = valid[source]
    for place in order[1:]:
        other_revision, other_chunks = valid[place]
        if other_chunks != chunks:
            entry.conflicts[place] = (f"its copy (revision {other_revision}) lists other chunks "
                                      f"than {source}'s (revision {revision})")
    return entry
