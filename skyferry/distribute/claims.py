"""Work that flows: a batch's chunks claimed in small units by whichever worker is free.

A batch's chunks are cut into units of a few chunks, each with a home cloud (the
byte-balanced, replica-near split of :func:`assign_shares`), and posted in the batch's
journal. A claimant claims one unit at a time as it has room: first a unit whose claim
expired (its holder stopped), then the next unit of its own cloud from the head of that
cloud's queue, and when its cloud has none left, the last unit of the cloud with the most
bytes unclaimed (a steal)::

    pending/<dataset>/batch=<id>/units.json                       # the units, posted once
    pending/<dataset>/batch=<id>/claims/unit-<n>.<attempt>.json   # a claim: holder, expiry
    pending/<dataset>/batch=<id>/claims/unit-<n>.done              # the unit is finished
    pending/<dataset>/batch=<id>/claims/unit-<n>.stolen            # ... by another cloud

A claim is an exclusive create (:meth:`Store.create`): of two children that reach for a
unit at once, one gets it. The holder renews it every third of its life; a claim that was
not renewed in time has expired, and the next child takes the unit with the next attempt.
A holder that finds a newer attempt than its own has lost the unit and takes no more of
its chunks. A chunk moved twice (a slow holder and the child that took its unit over) is
journaled at the same keys with the same bytes: the batch commits it once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from skyferry.errors import ObjectNotFoundError, StorageError
from skyferry.heartbeat import Heartbeat
from skyferry.models import ChunkPlan
from skyferry.storage import Store, safe_key
from skyferry.topology import Topology

__all__ = ["Claim", "ClaimBoard", "Unit", "assign_shares", "cut_units"]

logger = logging.getLogger("skyferry.distribute")

UNIT_BYTES = 64 << 20  # a unit holds chunks up to this many bytes (one at least)


def assign_shares(chunks: Sequence[ChunkPlan], topology: Topology,
                  clouds: Collection[str]) -> dict[str, list[int]]:
    """Split ``chunks`` over ``clouds`` (the ones that can take work), balanced by bytes;
    within one chunk's worth of balance a chunk goes to a cloud that holds one of its
    planned replicas (one of its writes then stays inside that cloud). Deterministic."""
    allowed = sorted(set(clouds))
    if not allowed:
        raise ValueError("no cloud can take work")
    cloud_of = {n.name: n.cloud for n in topology.nodes}
    load = dict.fromkeys(allowed, 0)
    shares: dict[str, list[int]] = {c: [] for c in allowed}
    for chunk in chunks:
        near = {cloud_of.get(n) for n in chunk.nodes}
        # a cloud that holds a replica is ahead by one chunk: locality, within balance
        cloud = min(allowed, key=lambda c: (load[c] - (chunk.size if c in near else 0), c))
        shares[cloud].append(chunk.index)
        load[cloud] += chunk.size
    return {c: idx for c, idx in shares.items() if idx}


class Unit(BaseModel):
    """Chunks claimed together, and the cloud whose children take them first."""

    model_config = ConfigDict(frozen=True)

    index: int
    cloud: str
    chunks: tuple[int, ...]
    bytes: int


def cut_units(chunks: Sequence[ChunkPlan], topology: Topology, clouds: Collection[str],
              unit_bytes: int | Mapping[str, int] = UNIT_BYTES) -> list[Unit]:
    """Each cloud's share of ``chunks`` cut, in order, into units of at most ``unit_bytes``
    (one size, or one per cloud; a bigger chunk is a unit alone)."""
    by_index = {c.index: c for c in chunks}
    units: list[Unit] = []
    for cloud, indices in sorted(assign_shares(chunks, topology, clouds).items()):
        cap = unit_bytes if isinstance(unit_bytes, int) else unit_bytes[cloud]
        run: list[int] = []
        size = 0
        for i in indices:
            if run and size + by_index[i].size > cap:
                units.append(Unit(index=len(units), cloud=cloud, chunks=tuple(run), bytes=size))
                run, size = [], 0
            run.append(i)
            size += by_index[i].size
        if run:
            units.append(Unit(index=len(units), cloud=cloud, chunks=tuple(run), bytes=size))
    return units


class _Units(BaseModel):
    units: list[Unit]


@dataclass
class Claim:
    """A unit this child holds, renewed by a heartbeat until :meth:`finish` or
    :meth:`release`. ``stolen``: the unit's home is another cloud; ``retaken``: an earlier
    holder's claim expired."""

    board: ClaimBoard
    unit: Unit
    attempt: int
    owner: str
    ttl_s: float
    stolen: bool
    retaken: bool
    _beat: Heartbeat | None = field(default=None, repr=False)
    lost: bool = False

    def start(self) -> Claim:
        self._beat = Heartbeat(self.renew, self.ttl_s / 3,
                               f"the claim on unit {self.unit.index} of {self.board.where}"
                               ).start()
        return self

    def renew(self) -> None:
        """Extend the claim; a newer attempt by another child means this one has lost it."""
        if self.board.store.exists(self.board.claim_key(self.unit.index, self.attempt + 1)):
            self.lost = True
            logger.warning("unit %d of %s was taken over by another child (its claim "
                           "expired); this one stops taking its chunks", self.unit.index,
                           self.board.where)
            if self._beat is not None:
                self._beat.stop()
            return
        self.board.store.put(self.board.claim_key(self.unit.index, self.attempt),
                             self.board.body(self.owner, self.ttl_s, self.stolen))

    def stop_renewing(self) -> None:
        """Stop the heartbeat and keep the claim: it expires unless finished or released."""
        if self._beat is not None:
            self._beat.stop()

    def finish(self) -> None:
        """The unit's chunks are all journaled: mark it done."""
        if self._beat is not None:
            self._beat.stop()
        if self.stolen:  # before the unit shows done: a finished unit's count is whole
            self.board.store.put(self.board.stolen_key(self.unit.index), self.owner.encode())
        self.board.store.create(self.board.done_key(self.unit.index), self.owner.encode())

    def release(self) -> None:
        """Give the unit back at once (this child failed): its claim expires now."""
        if self._beat is not None:
            self._beat.stop()
        if not self.lost:
            self.board.store.put(self.board.claim_key(self.unit.index, self.attempt),
                                 self.board.body(self.owner, -1.0, self.stolen))


@dataclass(frozen=True)
class BoardState:
    """What the board shows at one moment: units finished, held, and free to claim."""

    done: list[int]
    held: dict[int, float]  # unit -> when its claim expires
    free: list[int]  # never claimed, or the claim expired
    stolen: list[int] = field(default_factory=list)  # done by another cloud's child
    retaken: list[int] = field(default_factory=list)  # claimed again after a claim expired

    @property
    def next_expiry(self) -> float | None:
        return min(self.held.values(), default=None)


class ClaimBoard:
    """The units of one batch and their claims, in the catalog's journal."""

    def __init__(self, store: Store, dataset: str, batch_id: str) -> None:
        self.store = store
        self.where = f"batch {batch_id} of {dataset}"
        self.prefix = safe_key("pending", dataset, f"batch={batch_id}")
        self._units: list[Unit] | None = None

    def claim_key(self, unit: int, attempt: int) -> str:
        return f"{self.prefix}/claims/unit-{unit:05d}.{attempt:03d}.json"

    def done_key(self, unit: int) -> str:
        return f"{self.prefix}/claims/unit-{unit:05d}.done"

    def stolen_key(self, unit: int) -> str:
        return f"{self.prefix}/claims/unit-{unit:05d}.stolen"

    @staticmethod
    def body(owner: str, ttl_s: float, stolen: bool) -> bytes:
        return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + ttl_s, "stolen": stolen}).encode()

    def post(self, units: Sequence[Unit]) -> list[Unit]:
        """Post the batch's units; those posted already when a retried parent posts again."""
        key = f"{self.prefix}/units.json"
        if not self.store.create(key, _Units(units=list(units)).model_dump_json().encode()):
            return self.units()
        self._units = list(units)
        return self._units

    def units(self) -> list[Unit]:
        if self._units is None:
            raw = self.store.get(f"{self.prefix}/units.json")
            self._units = _Units.model_validate_json(raw).units
        return self._units

    def _expiry(self, unit: int, attempt: int) -> float:
        """When the claim expires (0: unreadable or gone, so expired)."""
        try:
            holder = json.loads(self.store.get(self.claim_key(unit, attempt)))
        except (ObjectNotFoundError, ValueError):
            return 0.0
        expires = holder.get("expires_at") if isinstance(holder, dict) else None
        return float(expires) if isinstance(expires, (int, float)) else 0.0

    def state(self, journaled: Collection[int] = ()) -> tuple[BoardState, dict[int, int]]:
        """The board now, and each claimed unit's latest attempt. A unit whose chunks are
        all ``journaled`` counts as done."""
        latest: dict[int, int] = {}
        done: set[int] = set()
        stolen: set[int] = set()
        for name in self.store.names(f"{self.prefix}/claims"):
            stem, _, ext = name.partition(".")
            if not stem.startswith("unit-") or not stem[5:].isdigit():
                continue
            number = int(stem[5:])
            if ext == "done":
                done.add(number)
            elif ext == "stolen":
                stolen.add(number)
            elif ext.endswith(".json") and ext[:-5].isdigit():
                latest[number] = max(latest.get(number, -1), int(ext[:-5]))
        now = time.time()
        held: dict[int, float] = {}
        free: list[int] = []
        for unit in self.units():
            if unit.index in done or set(unit.chunks) <= set(journaled):
                done.add(unit.index)
            elif unit.index in latest and (at := self._expiry(unit.index,
                                                              latest[unit.index])) > now:
                held[unit.index] = at
            else:
                free.append(unit.index)
        retaken = sorted(i for i, attempt in latest.items() if attempt > 0)
        return BoardState(sorted(done), held, free, sorted(stolen & done), retaken), latest

    def claim(self, owner: str, cloud: str, ttl_s: float, journaled: Collection[int] = (),
              steal: bool = True) -> tuple[Claim | None, BoardState]:
        """Claim the unit ``cloud``'s child should take next; None when none is free (the
        state says whether others still hold some, and when the first of them expires).
        Without ``steal``, units of other clouds are taken only after a claim expired."""
        state, latest = self.state(journaled)
        units = {u.index: u for u in self.units()}
        free = [units[i] for i in state.free]
        retake = [u for u in free if u.index in latest]
        own = [u for u in free if u.index not in latest and u.cloud == cloud]
        others = [u for u in free if u.index not in latest and u.cloud != cloud and steal]
        left: dict[str, int] = {}
        for u in others:
            left[u.cloud] = left.get(u.cloud, 0) + u.bytes
        # a thief takes from the tail of the queue with the most bytes left
        thefts = sorted(others, key=lambda u: (-left[u.cloud], u.cloud, -u.index))
        for unit in [*retake, *own, *thefts]:
            attempt = latest.get(unit.index, -1) + 1
            stolen = unit.cloud != cloud
            try:
                won = self.store.create(self.claim_key(unit.index, attempt),
                                        self.body(owner, ttl_s, stolen))
            except StorageError as exc:
                logger.warning("claiming unit %d of %s failed: %s", unit.index, self.where,
                               exc)
                continue
            if won:
                claim = Claim(self, unit, attempt, owner, ttl_s, stolen=stolen,
                              retaken=attempt > 0)
                return claim.start(), state
        return None, state
