"""The bench's own instruments measure known work: a process tree that allocates a known
amount, a file of known size, and the order of counterbalanced pairs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from bench.measure import TreeSampler, abba, evict, floor_copy

MIB = 1 << 20

# A parent that starts a child; each, when told (a line on stdin), allocates and touches
# its share, then says so; the child reads its orders from the parent's stdin through a pipe.
TREE = r"""
import subprocess, sys
mib = int(sys.argv[1])
child = None
if len(sys.argv) > 2:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[2]],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
print("ready", flush=True)
sys.stdin.readline()
held = bytearray(b"\x01") * (mib << 20)
if child is not None:
    child.stdin.write("go\n"); child.stdin.flush()
    assert child.stdout.readline().strip() == "held"
print("held", flush=True)
sys.stdin.readline()
if child is not None:
    child.stdin.write("end\n"); child.stdin.flush(); child.wait()
"""


def test_the_tree_sampler_counts_every_process_of_the_tree_within_ten_percent() -> None:
    child_code = TREE
    proc = subprocess.Popen([sys.executable, "-c", TREE, "120", "200", child_code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = TreeSampler(proc.pid)
        before.sample()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "held"
        after = TreeSampler(proc.pid, label="-c")
        after.sample()
        grown = after.peak_mb - before.peak_mb
        assert 320 * 0.9 <= grown <= 320 * 1.1, (before.peak_mb, after.peak_mb)
        assert after.share_mb == pytest.approx(after.peak_mb)  # both run `python -c`
        proc.stdin.write("end\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_sampler_thread_keeps_the_peak_of_a_tree_that_has_shrunk_since() -> None:
    code = ("import sys; b = bytearray(b'\\x01') * (150 << 20); print('held', flush=True); "
            "sys.stdin.readline(); del b; print('freed', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    with TreeSampler(proc.pid, every=0.01) as sampler:
        assert proc.stdout.readline().strip() == "held"
        seen = sampler.samples
        while sampler.samples < seen + 3:  # the thread has sampled the tree since
            os.sched_yield()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(30)
    assert 150 * 0.95 <= sampler.peak_mb <= 150 * 1.1 + 30  # the interpreter's own is small


def test_a_server_outside_the_tree_is_counted_when_named_and_labelled() -> None:
    hold = ("import sys; b = bytearray(b'\\x01') * ({mib} << 20); print('held', flush=True); "
            "sys.stdin.readline()")
    command = subprocess.Popen([sys.executable, "-c", hold.format(mib=40)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    server = subprocess.Popen([sys.executable, "-c", hold.format(mib=160), "local-api"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for proc in (command, server):
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        alone = TreeSampler(command.pid)
        alone.sample()
        both = TreeSampler(command.pid, label=("local-api",), also=lambda: [server.pid])
        both.sample()
        assert 160 * 0.9 <= both.peak_mb - alone.peak_mb <= 160 * 1.1 + 15
        assert 160 * 0.9 <= both.share_mb <= 160 * 1.1 + 15
    finally:
        for proc in (command, server):
            proc.kill()
            proc.wait(30)


def test_the_floor_reads_once_writes_every_copy_durably_and_hashes(tmp_path: Path) -> None:
    size = 40 * MIB + 12_345  # not a whole number of blocks
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    targets = [tmp_path / f"n{i}" / "copy.bin" for i in range(3)]
    result = floor_copy(src, targets, block=4 * MIB, writeback_every=8 * MIB)
    assert (result.bytes_read, result.bytes_written) == (size, 3 * size)
    assert result.digest == blake3.blake3(src.read_bytes()).hexdigest()
    for target in targets:
        assert target.read_bytes() == src.read_bytes()
    assert evict([src, *targets]) == 4 * size


def test_pairs_alternate_their_order() -> None:
    calls: list[str] = []
    a, b = abba(("a", lambda: calls.append("a")), ("b", lambda: calls.append("b")), pairs=4,
                between=lambda: calls.append("|"))
    assert "".join(calls) == "a|b|b|a|a|b|b|a|"
    assert len(a.wall) == len(b.wall) == 4 and all(t >= 0 for t in a.wall + a.cpu)
