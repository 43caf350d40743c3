"""Retention: which of a dataset's snapshots gc keeps, and the pins of the readers reading
them.

A dataset's policy keeps the last ``keep_last`` snapshots and those made in the last
``keep_for_s`` seconds; with neither set (the default) every snapshot is kept. The newest
snapshot, every tagged snapshot, the batches the newest snapshot quarantines and every
snapshot a live pin names are always kept.

A pin is a reader's claim on the snapshot it reads, with an expiry that the reader renews
(every third of its time to live) while it reads and deletes when it closes. A reader that
dies stops renewing, and its pin expires. The policy is kept, as the log is, at the catalog
and on every enabled node; a pin, which lives for an hour, at the catalog only (a reader
writes nothing to the nodes)::

    snapshots/<dataset>/retention.json
    snapshots/<dataset>/pins/<pin id>.json     # the catalog's
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
import weakref
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyferry.commit.copies import CATALOG
from skyferry.commit.snapshots import Snapshot, SnapshotLog
from skyferry.errors import ObjectNotFoundError, SnapshotError, StorageError, TopologyError
from skyferry.heartbeat import Heartbeat
from skyferry.storage import safe_key

__all__ = ["PIN_TTL_S", "Pin", "Retention", "RetentionPolicy", "SnapshotPin"]

logger = logging.getLogger("skyferry.store")

PIN_TTL_S = 3600.0  # a reader's pin lives this long unless renewed


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


class RetentionPolicy(BaseModel):
    """Which snapshots gc keeps: the last ``keep_last`` and those newer than ``keep_for_s``
    (either is enough); with neither, every one."""

    model_config = ConfigDict(frozen=True)

    keep_last: int | None = Field(default=None, ge=1)
    keep_for_s: float | None = Field(default=None, gt=0)

    @property
    def keeps_all(self) -> bool:
        return self.keep_last is None and self.keep_for_s is None

    def kept(self, entries: Sequence[Snapshot], now: float) -> set[int]:
        """The sequence numbers of ``entries`` (the whole log, oldest first) this policy
        keeps at ``now``; the newest always."""
        if self.keeps_all or not entries:
            return {e.seq for e in entries}
        kept = {entries[-1].seq}
        if self.keep_last is not None:
            kept.update(e.seq for e in entries[-self.keep_last:])
        if self.keep_for_s is not None:
            kept.update(e.seq for e in entries if now - _at(e.created_at) <= self.keep_for_s)
        return kept

    def describe(self) -> str:
        if self.keeps_all:
            return "keep every snapshot"
        parts = []
        if self.keep_last is not None:
            parts.append(f"the last {self.keep_last}")
        if self.keep_for_s is not None:
            parts.append(f"those of the last {timedelta(seconds=self.keep_for_s)}")
        return "keep " + " and ".join(parts) + ", the tagged and the pinned"


class Pin(BaseModel):
    """A reader's claim on one snapshot, until ``expires_at``."""

    model_config = ConfigDict(frozen=True)

    id: str
    dataset: str
    snapshot: str
    seq: int
    holder: str
    created_at: str
    expires_at: str

    def live(self, now: float) -> bool:
        return _at(self.expires_at) > now


class Retention:
    """A dataset's retention policy (at the places that keep its snapshot log) and its
    readers' pins (at the catalog)."""

    def __init__(self, log: SnapshotLog) -> None:
        self.log, self.dataset = log, log.dataset
        self.places = log.places

    @property
    def policy_key(self) -> str:
        return safe_key("snapshots", self.dataset, "retention.json")

    def pin_key(self, pin_id: str) -> str:
        return safe_key("snapshots", self.dataset, "pins", f"{pin_id}.json")

    def _reachable(self) -> list[str]:
        return [p for p in self.places.names if p not in self.log.down]

    def _write(self, key: str, body: bytes, what: str) -> None:
        """``body`` at every reachable place; the catalog's copy must be written."""
        _, failed = self.places.write(key, body, self._reachable())
        if CATALOG in failed:
            raise SnapshotError(f"{what} of {self.dataset} could not be written at the "
                                f"catalog: {failed[CATALOG]}", dataset=self.dataset)
        for place, why in sorted(failed.items()):
            logger.warning("%s of %s: no copy at %s: %s", what, self.dataset, place, why)

    # the policy --------------------------------------------------------------------------
    def policy(self) -> RetentionPolicy:
        """The dataset's policy: the catalog's copy, else a node's; keep everything when no
        place has one."""
        for place in self.places.names:
            try:
                return RetentionPolicy.model_validate_json(
                    self.places.store(place).get(self.policy_key))
            except ObjectNotFoundError:
                continue
            except (StorageError, TopologyError, ValidationError) as exc:
                logger.warning("the retention policy of %s cannot be read at %s: %s",
                               self.dataset, place, exc)
        return RetentionPolicy()

    def set_policy(self, policy: RetentionPolicy) -> RetentionPolicy:
        self._write(self.policy_key, policy.model_dump_json().encode(), "the retention policy")
        logger.info("retention of %s: %s", self.dataset, policy.describe())
        return policy

    # pins --------------------------------------------------------------------------------
    def pins(self) -> list[Pin]:
        """Every pin the catalog keeps, live or expired."""
        store = self.places.store(CATALOG)
        found = []
        for obj in store.list(safe_key("snapshots", self.dataset, "pins")):
            try:
                found.append(Pin.model_validate_json(store.get(obj.key)))
            except (ObjectNotFoundError, ValidationError):
                continue  # released since it was listed, or torn
        return sorted(found, key=lambda p: p.created_at)

    def pin(self, snapshot: Snapshot, *, ttl_s: float = PIN_TTL_S, holder: str = "",
            now: float | None = None) -> Pin:
        """Pin ``snapshot`` for ``ttl_s`` seconds."""
        now = datetime.now(timezone.utc).timestamp() if now is None else now
        pin = Pin(id=uuid.uuid4().hex[:16], dataset=self.dataset, snapshot=snapshot.id,
                  seq=snapshot.seq, holder=holder or f"{socket.gethostname()}:{os.getpid()}",
                  created_at=_iso(now), expires_at=_iso(now + ttl_s))
        self.places.store(CATALOG).put(self.pin_key(pin.id), pin.model_dump_json().encode())
        return pin

    def renew(self, pin: Pin, *, ttl_s: float = PIN_TTL_S, now: float | None = None) -> Pin:
        now = datetime.now(timezone.utc).timestamp() if now is None else now
        renewed = pin.model_copy(update={"expires_at": _iso(now + ttl_s)})
        self.places.store(CATALOG).put(self.pin_key(pin.id), renewed.model_dump_json().encode())
        return renewed

    def unpin(self, pin: Pin) -> None:
        """Delete the pin (also while the interpreter exits, when no thread can start)."""
        try:
            self.places.store(CATALOG).delete(self.pin_key(pin.id))
        except (StorageError, RuntimeError) as exc:
            logger.warning("pin %s of %s stays until it expires: %s", pin.id, self.dataset,
                           exc)

    def forget(self, pins: Sequence[Pin]) -> None:
        """Delete expired ``pins``."""
        for pin in pins:
            self.unpin(pin)


class SnapshotPin:
    """A pin held while a reader reads: written by :meth:`start`, renewed by a thread every
    third of ``ttl_s``, deleted by :meth:`release`. A renewal that fails is logged and tried
    again at the next turn; the pin lapses only if none succeeds before it expires."""

    def __init__(self, retention: Retention, snapshot: Snapshot, *,
                 ttl_s: float = PIN_TTL_S) -> None:
        self.retention, self.snapshot, self.ttl_s = retention, snapshot, ttl_s
        self.pin: Pin | None = None
        self._beat: Heartbeat | None = None

    @classmethod
    def held_by(cls, owner: object, log: SnapshotLog, snapshot: Snapshot, *,
                ttl_s: float = PIN_TTL_S) -> SnapshotPin:
        """A started pin of ``snapshot`` that is released when ``owner`` (a reader) is
        garbage-collected or the interpreter exits, if the owner did not release it."""
        pin = cls(Retention(log), snapshot, ttl_s=ttl_s)
        weakref.finalize(owner, pin.release)
        return pin.start()

    def start(self) -> SnapshotPin:
        self.pin = self.retention.pin(self.snapshot, ttl_s=self.ttl_s)
        self._beat = Heartbeat(self._renew, self.ttl_s / 3,
                               f"pin {self.pin.id} of {self.retention.dataset}",
                               errors=(SnapshotError, StorageError)).start()
        return self

    def _renew(self) -> None:
        assert self.pin is not None
        self.pin = self.retention.renew(self.pin, ttl_s=self.ttl_s)

    def release(self) -> None:
        if self._beat is not None:
            self._beat.stop()
        if self.pin is not None:
            pin, self.pin = self.pin, None
            self.retention.unpin(pin)
