"""The failure detector, driven by a test clock: phi accrual's states and their thresholds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from skyferry.distribute.detector import DetectorConfig, FailureDetector, phi
from skyferry.distribute.placement import NodeHealth
from skyferry.topology import Node


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _detector(config: DetectorConfig | None = None) -> tuple[FailureDetector, Clock,
                                                              NodeHealth]:
    clock, health = Clock(), NodeHealth()
    nodes = [Node(name="n1", cloud="aws", region="r", url="/tmp/never-written/n1")]
    return FailureDetector(nodes, health, config, clock=clock), clock, health


def _beat(detector: FailureDetector, clock: Clock, seconds: float, *, rtt: float = 0.005,
          every: float = 1.0) -> list[tuple[float, str]]:
    """Heartbeats every ``every`` s for ``seconds``, judged every tick: (time, state) changes."""
    changes = []
    end = clock.now + seconds
    next_beat = clock.now + every
    while clock.now < end:
        clock.now = round(clock.now + detector.config.tick_s, 6)
        if clock.now >= next_beat:
            detector.heartbeat("n1", rtt)
            next_beat += every
        changes += [(clock.now, state) for _, state, _ in detector.evaluate()]
    return changes


def _silence(detector: FailureDetector, clock: Clock, seconds: float) -> list[tuple[float,
                                                                                     str]]:
    changes = []
    end = clock.now + seconds
    while clock.now < end:
        clock.now = round(clock.now + detector.config.tick_s, 6)
        changes += [(clock.now, state) for _, state, _ in detector.evaluate()]
    return changes


def _refused(detector: FailureDetector, clock: Clock, seconds: float) -> list[tuple[float,
                                                                                     str]]:
    """Probes every second that fail at once (a refused connection)."""
    changes = []
    end = clock.now + seconds
    next_probe = clock.now + 1.0
    while clock.now < end:
        clock.now = round(clock.now + detector.config.tick_s, 6)
        if clock.now >= next_probe:
            detector.failure("n1", "probe failed: ConnectionRefusedError")
            next_probe += 1.0
        changes += [(clock.now, state) for _, state, _ in detector.evaluate()]
    return changes


def test_phi_grows_with_the_silence() -> None:
    values = [phi(t, 1.0, 0.1) for t in (0.5, 1.0, 1.2, 1.4, 1.6)]
    assert values == sorted(values) and values[0] < 0.1 and values[-1] > 8


def test_a_node_that_stops_answering_is_down_within_three_seconds() -> None:
    detector, clock, health = _detector()
    assert _beat(detector, clock, 30) == []
    stopped = clock.now
    changes = _silence(detector, clock, 10)
    down = next(t for t, state in changes if state == "down")
    assert 2.0 <= down - stopped <= 3.1
    assert health.states["n1"] == "down" and "no answer" in health.reasons["n1"]


def test_probes_that_fail_outright_mark_it_down_at_the_second() -> None:
    detector, clock, health = _detector()
    _beat(detector, clock, 10)
    detector.failure("n1", "probe failed: ConnectionRefusedError")
    assert detector.evaluate() == []
    detector.failure("n1", "probe failed: ConnectionRefusedError")
    assert [s for _, s, _ in detector.evaluate()] == ["down"]
    assert "ConnectionRefusedError" in health.reasons["n1"]


def test_a_slowed_node_is_suspect_and_not_down() -> None:
    detector, clock, health = _detector()
    _beat(detector, clock, 30)
    # 300 ms more per request: a probe takes 0.9 s, so a heartbeat comes every 1.9 s
    changes = _beat(detector, clock, 60, rtt=0.9, every=1.9)
    assert max(v.phi for v in detector.snapshot().values()) < detector.config.suspect_phi
    assert [s for _, s in changes] == ["suspect"]
    assert health.states["n1"] == "suspect" and "slow" in health.reasons["n1"]
    assert not health.healthy("n1")  # new replicas avoid it
    assert [s for _, s in _beat(detector, clock, 10)] == ["healthy"]  # fast again


def test_a_flapping_node_stays_down_until_it_has_answered_for_recover_s() -> None:
    detector, clock, health = _detector()
    _beat(detector, clock, 20)
    changes = []
    for _ in range(5):  # refused for 3 s, up for 3 s, five times
        changes += _refused(detector, clock, 3)
        changes += _beat(detector, clock, 3)
    assert [s for _, s in changes] == ["down"]  # once, not on every probe
    changes = _beat(detector, clock, 10)  # then it stays up
    (recovered, state), = changes
    assert state == "healthy" and health.healthy("n1")


def test_a_write_that_found_the_node_down_starts_its_recovery_over() -> None:
    detector, clock, health = _detector()
    _beat(detector, clock, 10)
    health.mark("n1", "down", "write timed out")
    changes = _beat(detector, clock, 4.5)
    assert changes == [] and health.states["n1"] == "down"
    assert [s for _, s in _beat(detector, clock, 2)] == ["healthy"]


@pytest.mark.parametrize("config", [DetectorConfig(acceptable_pause_s=0.5),
                                    DetectorConfig(acceptable_pause_s=1.0),
                                    DetectorConfig(interval_s=0.5)])
def test_detection_time_follows_the_settings(config: DetectorConfig) -> None:
    detector, clock, _ = _detector(config)
    _beat(detector, clock, 30, every=config.interval_s)
    stopped = clock.now
    down = next(t for t, s in _silence(detector, clock, 10) if s == "down")
    expected = config.interval_s + config.acceptable_pause_s + 5.2 * config.min_std_s
    assert abs((down - stopped) - expected) <= config.interval_s + config.tick_s


def test_the_probers_find_a_node_that_fails_within_three_seconds(tmp_path: Path) -> None:
    """Real threads and a real (fault-injected) store: the time from the fault to down."""
    from tests.helpers.sf_chaos import set_faults

    root = tmp_path / "n1"
    nodes = [Node(name="n1", cloud="aws", region="r", url=f"faulty://{root}"),
             Node(name="n2", cloud="gcp", region="r", url=str(tmp_path / "n2"))]
    health = NodeHealth()
    seen: list[tuple[float, str, str]] = []
    health.listeners.append(lambda node, state, why: seen.append((time.monotonic(), node,
                                                                 state)))
    set_faults(root)
    detector = FailureDetector(nodes, health, DetectorConfig(interval_s=0.5)).start()
    try:
        deadline = time.monotonic() + 10
        while detector.snapshot()["n1"].rtt_s is None and time.monotonic() < deadline:
            time.sleep(0.05)
        set_faults(root, down=True)
        faulted = time.monotonic()
        while not any(s == "down" for _, _, s in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        detector.stop()
    (when, node, state), = seen
    assert (node, state) == ("n1", "down") and when - faulted < 3.0
    assert health.healthy("n2")


def test_a_node_answering_the_runs_own_calls_is_not_silent() -> None:
    """Probes queued behind the run's uploads go unanswered, but the uploads complete: the
    node is busy, not down; once its calls stop completing too, it is down as before."""
    detector, clock, health = _detector()
    _beat(detector, clock, 30)
    changes = []
    for _ in range(200):  # 20 s without a probe's answer, a block written every 0.5 s
        clock.now = round(clock.now + detector.config.tick_s, 6)
        if round(clock.now * 10) % 5 == 0:
            health.answered["n1"] = clock.now
        changes += [s for _, s, _ in detector.evaluate()]
    assert changes == [] and health.healthy("n1")
    stopped = clock.now
    down = next(t for t, s in _silence(detector, clock, 10) if s == "down")
    assert 2.0 <= down - stopped <= 3.1


def test_a_pause_of_skyferrys_own_is_no_nodes_silence() -> None:
    """Ten seconds in which skyferry itself did not run (its evaluator's tick came that
    late) are not held against a node; the same silence without the pause is."""
    detector, clock, health = _detector()
    _beat(detector, clock, 30)
    clock.now += 10
    detector.paused(10 - detector.config.tick_s)
    assert detector.evaluate() == [] and health.healthy("n1")
    assert _beat(detector, clock, 5) == []
    clock.now += 10
    assert [s for _, s, _ in detector.evaluate()] == ["down"]


def test_one_slow_probe_is_not_a_slow_node() -> None:
    detector, clock, health = _detector()
    _beat(detector, clock, 30)
    for _ in range(5):  # every third probe slowed by the run's own load
        assert _beat(detector, clock, 2) == []
        assert _beat(detector, clock, 1, rtt=0.9) == []
    assert health.healthy("n1")
    assert [s for _, s in _beat(detector, clock, 3, rtt=0.9)] == ["suspect"]


def test_probes_that_span_a_pause_of_skyferrys_own_are_not_slow() -> None:
    """Two probes in a row each took 3 s, but skyferry itself was paused for all but a few
    milliseconds of each: the node is not slow. The same round trips without the pauses are."""
    detector, clock, health = _detector()
    _beat(detector, clock, 30)
    for _ in range(2):
        clock.now += 3.0
        detector.paused(2.995)  # the evaluator's tick came that late
        detector.heartbeat("n1", 3.0)
        assert detector.evaluate() == []
    assert health.healthy("n1")
    for _ in range(2):
        clock.now += 3.0
        detector.alive("n1")
        detector.heartbeat("n1", 3.0)
    assert [s for _, s, _ in detector.evaluate()] == ["suspect"]


def test_a_long_hold_of_the_interpreter_does_not_call_the_nodes_down(tmp_path: Path) -> None:
    """Real threads: one thread holds Python's interpreter lock for seconds (a regular
    expression that backtracks), so no prober or evaluator runs. No node is called down."""
    import re

    nodes = [Node(name=f"n{i}", cloud="aws", region="r", url=str(tmp_path / f"n{i}"))
             for i in (1, 2)]
    health = NodeHealth()
    seen: list[tuple[str, str]] = []
    health.listeners.append(lambda node, state, why: seen.append((node, state)))
    detector = FailureDetector(nodes, health, DetectorConfig(interval_s=0.5)).start()
    try:
        deadline = time.monotonic() + 10
        while (any(v.rtt_s is None for v in detector.snapshot().values())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        held, n = 0.0, 30
        while held < 4.0:  # each try backtracks about 1.6 times as long as the last
            began = time.monotonic()
            assert re.match(r"(a|aa)+$", "a" * n + "b") is None  # holds the lock throughout
            held, n = time.monotonic() - began, n + 1
        time.sleep(1.0)  # the threads run again and judge what they saw
    finally:
        detector.stop()
    assert seen == [] and all(health.healthy(n.name) for n in nodes)
