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
rewrites a manifest raises it).
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

    def survey(self, prefix: str, revision: Callable[[bytes], int | None]) -> Survey:
        """List ``prefix`` on every place and pick each manifest's copy (see the module).

        ``revision(body)`` parses a copy: its revision, or None when it cannot be read.
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
        for key, where in sorted(holders.items()):
            order = sorted(where, key=lambda p: p != CATALOG)  # the catalog's copy first
            best: tuple[int, bytes, str] | None = None
            problems = []
            for place in order:
                try:
                    body = self.store(place).get(key)
                except (StorageError, TopologyError) as exc:
                    problems.append(f"{place}: {exc}")
                    continue
                rev = revision(body)
                if rev is None:
                    problems.append(f"{place}: not a valid manifest")
                    continue
                if best is None or rev > best[0]:
                    best = (rev, body, place)
                if place == CATALOG:
                    break  # the catalog's copy, when it reads, is the one
            if best is None:
                survey.unreadable[key] = "; ".join(problems)
                continue
            survey.entries[key] = SurveyEntry(
                body=best[1], source=best[2],
                places={p: info.size for p, info in where.items()})
        return survey

    def write(self, key: str, body: bytes, places: Iterable[str]
              ) -> tuple[list[str], dict[str, str]]:
        done, failed = self.each(places, lambda store: store.put(key, body))
        return sorted(done), failed

    def remove(self, key: str, places: Iterable[str]) -> dict[str, str]:
        """Delete the copies at ``places``; why each one that stayed, stayed."""
        return self.each(places, lambda store: store.delete(key))[1]
