"""Time the chunk planner on CSV with and without quoted fields, and the UTF-8 check.

    .venv/bin/python bench/plan_bench.py [SIZE_MB] [DIR]

Prints one line per case (MB/s of planning, best of three) and ends with one JSON line.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from skyferry.ingest.listing import list_source
from skyferry.ingest.read import plan_chunks
from skyferry.process.decode import is_utf8

CHUNK = 64 << 20


def _write(path: Path, size: int, quoted: bool) -> None:
    rng = random.Random(7)
    with open(path, "w") as fh:
        fh.write("id,f0,f1,text,label\n")
        written, i = 0, 0
        while written < size:
            text = f'"note {i}, ""quoted"" and\nmulti-line"' if quoted else f"note {i}"
            line = f"{i},{rng.random():.6f},{rng.random():.6f},{text},{i % 2}\n"
            fh.write(line)
            written += len(line)
            i += 1


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _best(fn: object, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    size = int(sys.argv[1] if len(sys.argv) > 1 else 512) * 1_000_000
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp())
    figures: dict[str, float] = {}
    for quoted in (False, True):
        path = folder / f"plan-{'quoted' if quoted else 'plain'}.csv"
        if not path.exists():
            _write(path, size, quoted)
        files = list_source(str(path))
        seconds = _best(lambda files=files: plan_chunks(files, "auto", CHUNK))
        name = f"plan_{'quoted' if quoted else 'plain'}_mb_s"
        figures[name] = round(path.stat().st_size / 1e6 / seconds, 1)
        _say(f"{name}: {figures[name]} ({path.stat().st_size / 1e6:.0f} MB in {seconds:.2f} s)")
        data = path.read_bytes()[:CHUNK]
        check = _best(lambda data=data: is_utf8(data))
        figures[f"utf8_check_{'quoted' if quoted else 'plain'}_gb_s"] = round(
            len(data) / 1e9 / check, 1)
    _say(json.dumps(figures))


if __name__ == "__main__":
    main()
