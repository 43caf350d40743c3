"""A failure detector: each node probed on its own thread, and judged by phi accrual.

Every ``interval_s`` a node's prober writes, reads back and deletes a small sentinel object
(:meth:`~skyferry.storage.Store.probe`) through a store of its own, so data writes never
queue in front of it. A probe that completes is a heartbeat. From the intervals between a
node's recent heartbeats the detector computes, at every tick, the suspicion level phi
(Hayashibara et al., "The φ accrual failure detector"; Akka's variant, with a normal
distribution, a floor on its deviation, and an acceptable pause):

    phi(t) = -log10(P(the next heartbeat comes later than t after the last one))

Each step of a probe that completes (the write, the read-back) also resets the silence ``t``
without counting as a heartbeat: a node that answers slowly is slow, not dead. So does every
call of the run's own to the node that completes (:meth:`NodeHealth.answer`: a block
written, an upload committed): a probe queued behind the run's own upload to the same
server is not silence, and a probe that times out while the node answers the run's calls
is not a failure.

Busy is not down: only time the node owes an answer counts. When skyferry itself is
paused (its threads not scheduled: a saturated CPU, a long GIL hold), the evaluator's
tick is late by that pause, and the silence of every node is shortened by it, as
Cassandra's failure detector ignores a local pause; a probe that spans such a pause is
timed without it. A node is slow only when each of its last two probes was slow, so one
probe slowed by the run's own load does not make it so.

States, and what moves a node between them (:class:`DetectorConfig` has the numbers):

- ``down``: phi reaches ``down_phi`` (no heartbeat for about ``interval_s`` +
  ``acceptable_pause_s`` + 5 deviations: 3 s at the defaults, so a node is down 2 to 3 s
  after it stops answering), or ``failures_down`` probes
  in a row fail outright (a refused connection, a full disk), or the run's writer found the
  node down. A down node is probed on; it is ``healthy`` again only after every probe for
  ``recover_s`` succeeded, so a flapping node stays down instead of flipping each probe.
- ``suspect``: phi reaches ``suspect_phi``, or a probe's round trip is more than
  ``slow_factor`` times the node's fastest and at least ``slow_floor_s``. New replicas avoid
  a suspect node, but its writes in flight go on.
- ``healthy``: none of the above.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from skyferry.distribute.placement import HealthState, NodeHealth
from skyferry.storage import Store
from skyferry.topology import Node

__all__ = ["DetectorConfig", "FailureDetector", "NodeView", "phi"]

logger = logging.getLogger("skyferry.distribute")


@dataclass(frozen=True)
class DetectorConfig:
    interval_s: float = 1.0  # between the end of one probe of a node and the next
    probe_timeout_s: float = 3.0  # a probe still running then counts as failed
    suspect_phi: float = 3.0
    down_phi: float = 8.0
    acceptable_pause_s: float = 1.5  # added to the mean interval before phi grows
    min_std_s: float = 0.1  # the floor on the intervals' deviation
    window: int = 100  # heartbeat intervals kept per node
    failures_down: int = 2  # probes in a row that fail outright
    slow_factor: float = 4.0
    slow_floor_s: float = 0.25
    recover_s: float = 5.0  # a down node's probes must all succeed this long
    tick_s: float = 0.1  # how often phi is evaluated
    local_pause_s: float = 0.25  # a tick later than this is a pause of skyferry's own
    slow_window: int = 2  # probes in a row that must each be slow


def phi(elapsed: float, mean: float, std: float) -> float:
    """The suspicion level after ``elapsed`` seconds without a heartbeat, for heartbeat
    intervals of ``mean`` and ``std`` (Akka's logistic approximation of the normal tail)."""
    y = (elapsed - mean) / std
    if y < -10:  # far earlier than a heartbeat is due: no suspicion (and no overflow)
        return 0.0
    e = math.exp(-y * (1.5976 + 0.070566 * y * y))
    if elapsed > mean:
        return -math.log10(e / (1.0 + e)) if e > 0 else math.inf
    return -math.log10(1.0 - 1.0 / (1.0 + e))


@dataclass
class NodeView:
    """What the detector knows of one node."""

    state: HealthState = "healthy"
    phi: float = 0.0
    rtt_s: float | None = None  # the last probe's round trip
    # the last few probes' round trips, each with when it ended
    rtts: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=2))
    fastest_s: float | None = None
    last_ok: float | None = None  # monotonic time of the last heartbeat (a whole probe)
    last_seen: float | None = None  # ... or of the last step of a probe that completed
    failures: int = 0  # probes in a row that failed outright
    ok_since: float | None = None  # start of the current run of successful probes
    unbroken: bool = False  # no failed probe since the last heartbeat
    reason: str = ""
    intervals: deque[float] = field(default_factory=lambda: deque(maxlen=100))


class FailureDetector:
    """Probes ``nodes`` until :meth:`stop`, and keeps ``health`` to their states.

    ``clock`` and :meth:`heartbeat`/:meth:`failure`/:meth:`evaluate` let a test drive it
    without threads; :meth:`start` runs one prober thread per node and one evaluator.
    """

    def __init__(self, nodes: Sequence[Node], health: NodeHealth,
                 config: DetectorConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = [n for n in nodes if n.enabled]
        self.health = health
        self.config = config or DetectorConfig()
        self.clock = clock
        self.views: dict[str, NodeView] = {}
        now = clock()
        for node in self.nodes:
            # the run's first probe of the node (before any write) is its first round trip:
            # a node slowed before the prober's first answer is compared with it
            view = NodeView(intervals=deque(maxlen=self.config.window), last_ok=now,
                            last_seen=now, rtts=deque(maxlen=self.config.slow_window),
                            fastest_s=health.latency_s.get(node.name))
            if not health.healthy(node.name):
                view.state = "down" if health.states.get(node.name) == "down" else "suspect"
                view.reason = health.reasons.get(node.name, "")
            self.views[node.name] = view
        self._lock = threading.Lock()
        self._pauses: deque[tuple[float, float]] = deque(maxlen=100)  # (start, end) of each
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stores: dict[str, Store] = {}
        health.listeners.append(self._marked)

    # what the probers and the run report ------------------------------------------------
    def heartbeat(self, node: str, rtt: float) -> None:
        now = self.clock()
        with self._lock:
            view = self.views[node]
            if view.last_ok is not None and view.unbroken:  # a slow node's intervals count;
                view.intervals.append(now - view.last_ok)  # the gap of an outage does not
            view.last_ok = view.last_seen = now
            view.unbroken = True
            view.rtt_s = rtt
            view.rtts.append((rtt, now))
            view.fastest_s = rtt if view.fastest_s is None else min(view.fastest_s, rtt)
            view.failures = 0
            if view.ok_since is None:
                view.ok_since = now

    def alive(self, node: str) -> None:
        """A step of a probe completed (its write, its read): the node is slow, not dead.
        It resets the silence that phi measures, but is no heartbeat of its own."""
        now = self.clock()
        with self._lock:
            self.views[node].last_seen = now

    def failure(self, node: str, why: str) -> None:
        with self._lock:
            view = self.views[node]
            view.failures += 1
            view.ok_since = None
            view.unbroken = False
            view.reason = why

    def paused(self, seconds: float) -> None:
        """skyferry itself was not running for ``seconds``: no node owed an answer in that
        time, so every node's silence is shortened by it."""
        now = self.clock()
        with self._lock:
            self._pauses.append((now - seconds, now))
            for view in self.views.values():  # nor is it an interval between heartbeats
                if view.last_seen is not None:
                    view.last_seen += seconds
                if view.last_ok is not None:
                    view.last_ok += seconds

    def _silent_since(self, name: str, view: NodeView) -> float | None:
        """The last evidence that the node answers: a probe's step, or a call of the run's."""
        answered = self.health.answered.get(name)
        if view.last_seen is None or (answered is not None and answered > view.last_seen):
            return answered
        return view.last_seen

    def _marked(self, node: str, state: HealthState, reason: str) -> None:
        """The run marked a node: a write to it failed (down: its recovery starts over), or
        a retry's probe found it back."""
        with self._lock:
            view = self.views.get(node)
            if view is None or view.state == state:
                return
            view.state = state
            if state == "down":
                view.ok_since = None
                view.reason = reason

    # judging -------------------------------------------------------------------------
    def _judge(self, name: str, view: NodeView, now: float) -> tuple[HealthState, str]:
        cfg = self.config
        intervals = list(view.intervals) or [cfg.interval_s]
        mean = statistics.fmean(intervals) + cfg.acceptable_pause_s
        std = max(cfg.min_std_s, statistics.pstdev(intervals) if len(intervals) > 1 else 0.0)
        seen = self._silent_since(name, view)
        elapsed = max(0.0, now - (seen if seen is not None else now))
        view.phi = phi(elapsed, mean, std)
        if view.failures >= cfg.failures_down:
            return "down", view.reason or f"{view.failures} probes in a row failed"
        if view.phi >= cfg.down_phi:
            view.ok_since = None  # the silence ends a run of successful probes
            return "down", f"no answer to probes for {elapsed:.1f}s (phi {view.phi:.1f})"
        if view.state == "down":
            if view.ok_since is None or now - view.ok_since < cfg.recover_s:
                return "down", view.reason
        if view.phi >= cfg.suspect_phi:
            return "suspect", f"probes are late: {elapsed:.1f}s (phi {view.phi:.1f})"
        typical = min(self._node_time(rtt, ended) for rtt, ended in view.rtts) \
            if len(view.rtts) == view.rtts.maxlen else None
        if (typical is not None and view.fastest_s is not None
                and typical >= max(cfg.slow_floor_s, cfg.slow_factor * view.fastest_s)):
            return "suspect", (f"slow: each of its last {len(view.rtts)} probes took "
                               f"{typical * 1000:.0f} ms or more, "
                               f"{typical / max(view.fastest_s, 1e-6):.0f}x its fastest")
        return "healthy", ""

    def _node_time(self, rtt: float, ended: float) -> float:
        """A probe's round trip less the time skyferry itself was paused during it: a probe
        that spans a pause of the process's own (a long GIL hold) is not slow for it."""
        started = ended - rtt
        paused = sum(max(0.0, min(end, ended) - max(start, started))
                     for start, end in self._pauses)
        return max(0.0, rtt - paused)

    def evaluate(self) -> list[tuple[str, HealthState, str]]:
        """Judge every node now; mark ``health`` and return the changes."""
        now = self.clock()
        changes = []
        with self._lock:
            for name, view in self.views.items():
                state, reason = self._judge(name, view, now)
                if state != view.state:
                    changes.append((name, state, reason))
                    view.state = state
                    view.reason = reason
        for name, state, reason in changes:
            self.health.mark(name, state, reason)
        return changes

    def snapshot(self) -> dict[str, NodeView]:
        with self._lock:
            return {n: NodeView(state=v.state, phi=v.phi, rtt_s=v.rtt_s,
                                fastest_s=v.fastest_s, last_ok=v.last_ok,
                                last_seen=v.last_seen,
                                failures=v.failures, ok_since=v.ok_since, reason=v.reason)
                    for n, v in self.views.items()}

    # threads -------------------------------------------------------------------------
    def start(self) -> FailureDetector:
        for node in self.nodes:
            thread = threading.Thread(target=self._probe_loop, args=(node,), daemon=True,
                                      name=f"skyferry-detector-{node.name}")
            thread.start()
            self._threads.append(thread)
        evaluator = threading.Thread(target=self._evaluate_loop, daemon=True,
                                     name="skyferry-detector")
        evaluator.start()
        self._threads.append(evaluator)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            stores = list(self._stores.values())
        for store in stores:
            store.cancel()
        if self._marked in self.health.listeners:
            self.health.listeners.remove(self._marked)

    def _evaluate_loop(self) -> None:
        cfg = self.config
        last = self.clock()
        while not self._stop.wait(cfg.tick_s):
            now = self.clock()
            late = now - last - cfg.tick_s
            last = now
            if late > cfg.local_pause_s:
                logger.info("failure detector: skyferry was paused for %.1fs; no node is "
                            "judged on that silence", late)
                self.paused(late)
            try:
                self.evaluate()
            except Exception:  # never let a listener's error end the watch
                logger.exception("failure detector: evaluating the nodes failed")

    def _probe_loop(self, node: Node) -> None:
        cfg = self.config
        while not self._stop.is_set():
            outcome: list[float | BaseException] = []
            worker = threading.Thread(target=self._probe_once, args=(node, outcome),
                                      daemon=True, name=f"skyferry-probe-{node.name}")
            started = self.clock()
            worker.start()
            worker.join(cfg.probe_timeout_s)
            # a probe queued behind the run's own calls to the node, while the node answers
            # them, is waited for: the node is busy, not silent
            while worker.is_alive() and not self._stop.is_set():
                if self.health.answered.get(node.name, started) > started:
                    started = self.clock()
                    worker.join(cfg.probe_timeout_s)
                    continue
                # a wait that spans a pause of skyferry's own (a long GIL hold) is not the
                # node's silence: the evaluator's next ticks record such a pause
                self._stop.wait(2 * cfg.tick_s)
                now = self.clock()
                spent = self._node_time(now - started, now)
                if spent >= cfg.probe_timeout_s:
                    break
                worker.join(cfg.probe_timeout_s - spent)
            if self._stop.is_set():
                return
            if worker.is_alive():  # hung: abandon it; phi has been rising meanwhile
                with self._lock:
                    store = self._stores.pop(node.name, None)
                if store is not None:
                    store.cancel()
                self.failure(node.name, f"a probe took longer than {cfg.probe_timeout_s}s")
            elif outcome and isinstance(outcome[0], BaseException):
                exc = outcome[0]
                self.failure(node.name, f"probe failed: {type(exc).__name__}: {exc}")
            elif outcome:
                self.heartbeat(node.name, float(outcome[0]))  # type: ignore[arg-type]
            self._stop.wait(cfg.interval_s)

    def _probe_once(self, node: Node, outcome: list[float | BaseException]) -> None:
        try:
            with self._lock:
                store = self._stores.get(node.name)
            if store is None:
                store = node.open_store(own_session=True)
                with self._lock:
                    self._stores[node.name] = store
            outcome.append(store.probe(on_step=lambda: self.alive(node.name)))
        except BaseException as exc:  # noqa: BLE001 - reported as the probe's failure
            outcome.append(exc)
