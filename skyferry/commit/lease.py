"""One run at a time per dataset: a lease in the catalog, kept alive by a heartbeat.

Two runs of one dataset that overlap would plan the same files twice, or run the same batch
side by side. The run that finds another's live lease waits for it to end, then plans from
what that run committed. A lease whose holder stopped heartbeating for ``ttl_s``, or whose
process is gone from this host, is taken over: that run crashed, and its journal is resumed.

The lease is an exclusive create (:meth:`Store.create`): a hard link on a local catalog, the
store's precondition on S3, GCS and Azure.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from skyferry.errors import ObjectNotFoundError
from skyferry.heartbeat import Heartbeat
from skyferry.storage import Store, safe_key

__all__ = ["DatasetLease"]

logger = logging.getLogger("skyferry.store")


def _process_gone(holder: dict[str, Any]) -> bool:
    """Whether the holder ran on this host, in a process that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class DatasetLease:
    """``with DatasetLease(catalog_store, "train"):`` holds the dataset for one run."""

    def __init__(self, store: Store, dataset: str, *, ttl_s: float = 30.0,
                 poll_s: float = 0.5, on_wait: Callable[[dict[str, Any]], None] | None = None
                 ) -> None:
        self.store = store
        self.dataset = dataset
        self.key = safe_key("pending", dataset, "lease.json")
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.owner = uuid.uuid4().hex
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._beat = Heartbeat(self._heartbeat, ttl_s / 3, f"the lease of dataset {dataset}")

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            raw = self.store.get(self.key)
        except ObjectNotFoundError:
            return None
        try:
            holder = json.loads(raw)
        except ValueError:
            return {}  # a lease being written: its writer holds it
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        beat = holder.get("heartbeat")
        old = not isinstance(beat, (int, float)) or time.time() - beat > self.ttl_s
        return (old and bool(holder)) or _process_gone(holder)

    def acquire(self) -> None:
        """Take the lease, waiting while another live run holds it."""
        started = time.monotonic()
        told = False
        while True:
            if self.store.create(self.key, self._body()):
                holder = self._holder()
                if holder is not None and holder.get("owner") == self.owner:
                    break
            else:
                holder = self._holder()
                if holder is not None and self._stale(holder):
                    logger.warning("dataset %s: the run holding it (pid %s on %s) stopped; "
                                   "taking over", self.dataset, holder.get("pid"),
                                   holder.get("host"))
                    if self._holder() == holder:
                        self.store.delete(self.key)
                    continue
                if holder is not None and not told:
                    told = True
                    if self.on_wait is not None:
                        self.on_wait(holder)
            self._stop.wait(self.poll_s)
        self.waited_s = time.monotonic() - started
        self._beat.start()

    def _heartbeat(self) -> None:
        self.store.put(self.key, self._body())

    def release(self) -> None:
        self._stop.set()
        self._beat.stop()
        holder = self._holder()
        if holder is not None and holder.get("owner") == self.owner:
            self.store.delete(self.key)

    def __enter__(self) -> DatasetLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
