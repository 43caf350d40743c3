"""A thread that renews something every so often until it is stopped: a dataset's lease, a
reader's pin, a child's claim on a unit of work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Heartbeat"]

logger = logging.getLogger("skyferry.store")


class Heartbeat:
    """Call ``beat`` every ``every_s`` seconds on a daemon thread, from :meth:`start` until
    :meth:`stop`. A beat that raises one of ``errors`` (by default ``OSError``: a storage
    error) is logged as a warning naming ``what`` and tried again at the next turn; a holder
    loses what it renews only if no beat succeeds before it expires."""

    def __init__(self, beat: Callable[[], None], every_s: float, what: str,
                 errors: tuple[type[Exception], ...] = (OSError,)) -> None:
        self.beat, self.every_s, self.what, self.errors = beat, every_s, what, errors
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"skyferry-{self.what}")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except self.errors as exc:
                logger.warning("%s was not renewed: %s", self.what, exc)

    def stop(self) -> None:
        """Stop beating; returns once no beat is running (at once from the beat's thread)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()
