"""skyferry's benchmark: per-stage figures, each a ratio to a baseline measured in the same run.

Run with ``make bench``. Prints a line per figure, then one JSON line. These machines are
noisy, so each figure is a ratio to a baseline measured seconds before or after it.

Environment: BENCH_DIR (default: a temp dir), BENCH_GIB (default 1), BENCH_BIG_GIB (default 4).
Prefect's local database is a new one under BENCH_DIR (``PREFECT_HOME``), not the user's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

GIB = 1 << 30
MIB = 1 << 20
ROOT = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="skyferry-bench-"))
SIZE = int(float(os.environ.get("BENCH_GIB", "1")) * GIB)
BIG = int(float(os.environ.get("BENCH_BIG_GIB", "4")) * GIB)
CHUNK = 64 * MIB
FSYNC_PAIRS = 3  # binary runs with and without fsync, alternating
# The runs' ephemeral Prefect API keeps its database here, not in the user's ~/.prefect: the
# runs stay out of their history, and the figures do not depend on how large that history
# has grown (a 958 MB one made each run of 64 empty chunks 0.1-0.3 s longer, measured).
PREFECT_HOME = ROOT / "prefect-home"
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
figures: dict[str, object] = {}


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def sync() -> None:
    os.sync()


def write_random(path: Path, size: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 64 * MIB)
            fh.write(rng.bytes(n))
            left -= n


def write_csv(path: Path, size: int) -> None:
    from skyferry.ops.demo import generate_dataset

    generate_dataset(path, total_bytes=size, files=1)
    for bad in path.glob("train-*.csv"):
        # the benchmark compares against a bare conversion: keep the rows well-formed
        data_end = bad.stat().st_size
        with open(bad, "rb+") as fh:
            fh.seek(max(0, data_end - 4096))
            tail = fh.read()
            keep = tail.find(b"999999991,")
            if keep >= 0:
                fh.truncate(max(0, data_end - 4096) + keep)


def fresh_home(name: str) -> Path:
    home = ROOT / "homes" / name
    shutil.rmtree(home, ignore_errors=True)
    os.environ["SKYFERRY_HOME"] = str(home)
    from skyferry.config import get_settings

    get_settings.cache_clear()
    return home


def run_skyferry(source: str, dataset: str, *, durable: bool = True,
                 **extra: object) -> tuple[float, object]:
    from flows.ephemeral import settle_ephemeral_api
    from flows.pipeline import run_pipeline
    from skyferry.config import PipelineConfig

    config = PipelineConfig(source=source, dataset=dataset, chunk_size=CHUNK, **extra)
    started = time.perf_counter()
    result = run_pipeline(config)
    if durable:
        sync()
    elapsed = time.perf_counter() - started
    if result.status != "completed":
        raise SystemExit(f"benchmark run failed: {result.error}")
    # Untimed: the API records this run's last task runs before the next run starts, as it
    # does before a `skyferry run` process exits. Otherwise the next run's create could meet
    # those writes, be refused, and be retried by Prefect's client 2.4 s later (measured).
    settle_ephemeral_api(result)
    return elapsed, result


def floor_copy(src: Path, targets: list[Path]) -> None:
    """The machine's floor: hash the file once, write 3 copies, sync."""
    digest = hashlib.sha256()
    handles = []
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        handles.append(open(t, "wb"))
    with open(src, "rb") as fh:
        while block := fh.read(16 * MIB):
            digest.update(block)
            for h in handles:
                h.write(block)
    for h in handles:
        h.close()
    sync()


def bare_pyarrow(src: Path, dst: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(src)
    pq.write_table(table, dst, compression="zstd")


def plain_pipeline(source: str, dataset: str) -> float:
    """The same chunk sequence without Prefect: a plain thread pool, same parallelism."""
    from skyferry.config import PipelineConfig
    from skyferry.distribute.probe import probe_nodes
    from skyferry.run.batch import commit_batch, journal_chunk, new_source_files, plan_batch
    from skyferry.run.chunk import move_chunk
    from skyferry.run.context import open_run

    started = time.perf_counter()
    setup = open_run(PipelineConfig(source=source, dataset=dataset, chunk_size=CHUNK))
    probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
    run = plan_batch(setup, new_source_files(setup).files)
    try:
        with ThreadPoolExecutor(max_workers=setup.settings.max_in_flight) as pool:
            stored = [moved[0] for moved in pool.map(lambda c: move_chunk(c, run),
                                                      run.plan.chunks)]
        for chunk in stored:
            journal_chunk(run, chunk)
        commit_batch(run, stored)
    finally:
        run.close()
    sync()
    return time.perf_counter() - started


def warm_memory() -> float:
    """Touch the free memory once, in 1 GiB blocks, then free it; returns the seconds taken.

    On these VMs the first touch of a guest page faults to the hypervisor: about 2.5 s per
    GiB of system time, charged to whichever run allocates that page first. Warming it once
    keeps that out of the ratios (the figure is printed, as the machine's, not skyferry's).
    """
    import numpy as np
    import psutil

    blocks = max(0, int(psutil.virtual_memory().available / GIB) - 3)
    started = time.perf_counter()
    held = [np.ones(GIB // 8) for _ in range(blocks)]
    del held
    return time.perf_counter() - started


def child_peak_rss(source: str, dataset: str, chunk: int = CHUNK) -> tuple[float, float]:
    """Run the CLI in a child; return (its flow duration, the child's peak RSS in MB)."""
    cmd = [sys.executable, "-m", "skyferry.cli", "run", source, "--dataset", dataset,
           "--chunk-size", str(chunk), "--json"]
    out_path = ROOT / "child.json"
    # ru_maxrss is no use here: a child inherits this process's high-water mark through
    # fork/vfork, and it survives exec. VmHWM of the child's own (new) address space is
    # exact and monotonic, so sampling it, and its children's, finds the peak.
    peak_kb = 0
    with open(out_path, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=os.environ)
        while True:
            try:
                child.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                peak_kb = max(peak_kb, _tree_hwm_kb(child.pid))
    if child.returncode != 0:
        raise SystemExit(f"the benchmark child failed with status {child.returncode}")
    result = json.loads(out_path.read_text())
    sync()
    return float(result["duration_s"]), peak_kb / 1024


def _tree_hwm_kb(pid: int) -> int:
    import psutil

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    peak = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak


def main() -> None:
    say(f"bench dir {ROOT}; {SIZE / GIB:.1f} GiB runs, {BIG / GIB:.1f} GiB memory run")
    say(f"warm_memory_s           {warm_memory():.1f}  (first touch of the VM's free memory; "
        "not skyferry's)")
    data = ROOT / "data"
    blob = data / "blob" / "one.bin"
    write_random(blob, SIZE, seed=1)
    csv_dir = data / "csv"
    write_csv(csv_dir, SIZE)
    csv_file = next(csv_dir.glob("*.csv"))
    sync()

    # Prefect's one-time start-up, on its own
    fresh_home("startup")
    tiny = data / "tiny" / "t.bin"
    write_random(tiny, 1024, seed=2)
    figures["startup_s"] = round(run_skyferry(str(tiny), "tiny")[0], 2)
    say(f"startup_s               {figures['startup_s']}  (ephemeral API + first flow run)")

    # 1 GiB binary vs the I/O floor
    floor_dir = ROOT / "floor"
    floor_s = timed(lambda: floor_copy(blob, [floor_dir / f"n{i}" / "one.bin" for i in range(3)]))
    shutil.rmtree(floor_dir)
    sync()
    fresh_home("binary")
    sky_s, result = run_skyferry(str(blob), "blob")
    figures["binary_ratio_to_floor"] = round(sky_s / floor_s, 3)
    say(f"binary_ratio_to_floor   {figures['binary_ratio_to_floor']}  "
        f"(skyferry {sky_s:.1f}s vs floor {floor_s:.1f}s; target <= 1.2)")
    _stage_lines(result)
    maintenance(ROOT / "homes" / "binary", "blob")
    shutil.rmtree(ROOT / "homes" / "binary")

    # what durable writes cost: the binary run with and without fsync, alternating, each
    # ending in one sync (the bytes on disk either way); the median of the pairs' ratios
    ratios, timed_runs = [], {"durable": [], "no fsync": []}
    for _ in range(FSYNC_PAIRS):
        for durable in (False, True):
            fresh_home("binary-fsync")
            os.environ["SKYFERRY_DURABLE_WRITES"] = str(durable).lower()
            try:
                seconds, _ = run_skyferry(str(blob), "blob")
            finally:
                del os.environ["SKYFERRY_DURABLE_WRITES"]
            timed_runs["durable" if durable else "no fsync"].append(seconds)
        ratios.append(timed_runs["durable"][-1] / timed_runs["no fsync"][-1])
    shutil.rmtree(ROOT / "homes" / "binary-fsync")
    figures["fsync_cost"] = round(statistics.median(ratios), 3)
    say(f"fsync_cost              {figures['fsync_cost']}  (median of {FSYNC_PAIRS} pairs; "
        + ", ".join(f"{k} {' '.join(f'{t:.1f}' for t in v)}s" for k, v in timed_runs.items())
        + ")")

    rclone = shutil.which("rclone")
    if rclone:
        targets = [ROOT / "rclone" / f"n{i}" for i in range(3)]

        def rclone_copy() -> None:
            procs = [subprocess.Popen([rclone, "copy", "--checksum", str(blob.parent), str(t)])
                     for t in targets]
            for p in procs:
                p.wait()
            sync()

        rclone_s = timed(rclone_copy)
        shutil.rmtree(ROOT / "rclone")
        figures["rclone_ratio"] = round(sky_s / rclone_s, 3)
        say(f"rclone_ratio            {figures['rclone_ratio']}  (rclone {rclone_s:.1f}s; "
            "target < 1)")
    else:
        figures["rclone_ratio"] = None
        say("rclone_ratio            n/a (rclone is not installed)")

    # 1 GiB CSV -> zstd Parquet vs bare pyarrow: interleaved, best of two each
    bare_times, csv_times = [], []
    for _ in range(2):
        bare_times.append(timed(lambda: bare_pyarrow(csv_file, ROOT / "bare.parquet")))
        (ROOT / "bare.parquet").unlink()
        fresh_home("csv")
        sync()
        elapsed, result = run_skyferry(str(csv_file), "csv", durable=False)
        csv_times.append(elapsed)
    bare_s, csv_s = min(bare_times), min(csv_times)
    csv_bytes = csv_file.stat().st_size
    figures["csv_ratio_to_pyarrow"] = round(bare_s / csv_s, 3)
    figures["csv_mb_s"] = round(csv_bytes / 1e6 / csv_s, 1)
    say(f"csv_ratio_to_pyarrow    {figures['csv_ratio_to_pyarrow']}  (skyferry {csv_s:.1f}s, "
        f"bare pyarrow {bare_s:.1f}s, neither synced; target >= 0.9); "
        f"csv_mb_s {figures['csv_mb_s']}")
    _stage_lines(result)
    shutil.rmtree(ROOT / "homes" / "csv")

    # ingestion alone: list, plan (quote-aware scan), ranged reads + hashing
    from skyferry.ingest.listing import list_source
    from skyferry.ingest.read import plan_chunks, read_chunk

    def ingest() -> None:
        plans = plan_chunks(list_source(str(csv_file)), "auto", CHUNK)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for pieces, _digest in pool.map(read_chunk, plans):
                del pieces

    ingest_s = timed(ingest)
    figures["ingest_mb_s"] = round(csv_bytes / 1e6 / ingest_s, 1)
    say(f"ingest_mb_s             {figures['ingest_mb_s']}  (target >= 200)")

    # small files vs one file
    small_dir = data / "small"
    count = 10_000
    each = SIZE // count
    import numpy as np

    rng = np.random.default_rng(3)
    small_dir.mkdir(parents=True, exist_ok=True)
    payload = rng.bytes(each + 4096)
    for i in range(count):
        (small_dir / f"f{i:05d}.bin").write_bytes(payload[i % 4096:i % 4096 + each])
    sync()
    fresh_home("one")
    one_s, _ = run_skyferry(str(blob), "one")
    shutil.rmtree(ROOT / "homes" / "one")
    fresh_home("small")
    small_s, _ = run_skyferry(str(small_dir), "small")
    shutil.rmtree(ROOT / "homes" / "small")
    figures["small_files_ratio"] = round(small_s / one_s, 3)
    say(f"small_files_ratio       {figures['small_files_ratio']}  ({count} files {small_s:.1f}s "
        f"vs one file {one_s:.1f}s; target <= 2)")
    shutil.rmtree(small_dir)

    # 4 GiB: peak memory in a child, and Prefect's share of the wall time
    big = data / "big" / "big.bin"
    write_random(big, BIG, seed=4)
    sync()
    flow_times, plain_times, peaks = [], [], []
    for _ in range(2):  # interleaved, best of two: the disk is shared and noisy
        fresh_home("big")
        prefect_s, rss = child_peak_rss(str(big), "big")
        shutil.rmtree(ROOT / "homes" / "big")
        sync()
        flow_times.append(prefect_s)
        peaks.append(rss)
        fresh_home("big-plain")
        plain_times.append(plain_pipeline(str(big), "big"))
        shutil.rmtree(ROOT / "homes" / "big-plain")
        sync()
    figures["peak_rss_mb"] = round(max(peaks), 1)
    say(f"peak_rss_mb             {figures['peak_rss_mb']}  ({BIG / GIB:.0f} GiB, 64 MiB chunks; "
        "target < 1024)")
    prefect_s, plain_s = min(flow_times), min(plain_times)
    # Orchestration on its own: the same flow over the same number of chunks, each 1 byte,
    # so reading, hashing and writing cost nothing; run the same way (a child CLI, its own
    # API), timed the same way (the flow's own duration). Its time over the 4 GiB run's.
    chunks = BIG // CHUNK
    tiny_src = data / "orchestration" / "tiny.bin"
    write_random(tiny_src, chunks, seed=5)
    orchestration_times = []
    for _ in range(2):
        fresh_home("orchestration")
        orchestration_times.append(child_peak_rss(str(tiny_src), "o", chunk=1)[0])
    orchestration_s = min(orchestration_times)
    figures["overhead_share"] = round(orchestration_s / prefect_s, 4)
    figures["overhead_vs_plain"] = round(max(0.0, (prefect_s - plain_s) / prefect_s), 4)
    say(f"overhead_share          {figures['overhead_share']}  (orchestrating {chunks} chunks "
        f"with no data: {orchestration_s:.2f}s, over the {prefect_s:.1f}s flow; target < 0.05)")
    say(f"overhead_vs_plain       {figures['overhead_vs_plain']}  (the same stage functions in a "
        f"plain thread pool: {plain_s:.1f}s; disk-bound, so noisy)")
    shutil.rmtree(big.parent)

    # the clouds: local S3/GCS/Azure servers, against a direct fsspec copy
    sys.path.insert(0, str(Path(__file__).parent))
    import cloud_bench

    figures.update(cloud_bench.main())

    say(json.dumps(figures, sort_keys=True))


def maintenance(home: Path, dataset: str) -> None:
    """Verify at both levels, then repair a lost replica of every chunk: MB/s of each."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.ops.repair import repair_dataset
    from skyferry.ops.verify import verify_dataset
    from skyferry.topology import load_topology

    topology = load_topology()
    manifest = open_catalog(topology).manifest(dataset)
    replicas = sum(c.size * len(c.verified) for c in manifest.chunks)
    for deep in (False, True):
        report = verify_dataset(topology, dataset, deep=deep)
        assert report.healthy, report.counts()
        name = f"verify_{report.level}_mb_s"
        figures[name] = round(replicas / 1e6 / report.seconds, 1)
        say(f"{name:<23} {figures[name]}  ({replicas / 1e6:.0f} MB of replicas in "
            f"{report.seconds:.2f}s, {report.bytes_read / 1e6:.0f} MB read)")
    for i, chunk in enumerate(manifest.chunks):  # one replica of every chunk, alternating
        # between its first two nodes: every node keeps some, so none lists empty (which
        # verify would call unreachable, and repair would leave alone)
        (home / "nodes" / chunk.verified[i % 2].node / chunk.key).unlink()
    sync()
    repaired = repair_dataset(topology, dataset, max_node_share=1.0)
    assert repaired.complete and repaired.bytes_copied == manifest.bytes_stored
    figures["repair_mb_s"] = round(repaired.bytes_copied / 1e6 / repaired.seconds, 1)
    say(f"repair_mb_s             {figures['repair_mb_s']}  (one lost replica of each chunk, "
        f"{repaired.bytes_copied / 1e6:.0f} MB re-created in {repaired.seconds:.2f}s)")


def _stage_lines(result: object) -> None:
    for name, m in result.stages.items():  # type: ignore[attr-defined]
        say(f"    {name:<13} items {m.items:>4}  {m.bytes / 1e6:>8.1f} MB  "
            f"busy {m.duration_s:>6.2f}s  {m.mb_s:>7.1f} MB/s")


if __name__ == "__main__":
    try:
        main()
    finally:
        if not os.environ.get("BENCH_DIR"):
            shutil.rmtree(ROOT, ignore_errors=True)
