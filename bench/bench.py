"""``make bench``: skyferry against floors and peers, each figure from counterbalanced pairs.

Every timed comparison runs both sides in ABBA order (bench/measure.py) and reports each
side's min/median/max and CPU seconds. A ``*_time_ratio`` is lower-is-better, a
``*_throughput_ratio`` higher-is-better. A floor does strictly less work than skyferry, so
the run fails, naming the figure, when a ratio beats its floor. The table, then one JSON
line, are printed at the end; docs/benchmarks.md says what each figure is.

Environment: BENCH_DIR (default: a temp dir), BENCH_GIB (default 1), BENCH_BIG_GIB (default
4), BENCH_PAIRS (default 5), BENCH_HISTORY (committed batches behind the planning figures;
default 2000), BENCH_PARTS (comma-separated sections to run; default all: startup, binary,
encryption, rclone, csv, small, cold, orchestration, memory, history, reader, snapshot, cloud,
scale).
Prefect's database is a new one under BENCH_DIR (``PREFECT_HOME``), not the user's.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

from bench.measure import Side, TreeSampler, abba, evict, floor_copy  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
ROOT = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="skyferry-bench-"))
SIZE = int(float(os.environ.get("BENCH_GIB", "1")) * GIB)
BIG = int(float(os.environ.get("BENCH_BIG_GIB", "4")) * GIB)
PAIRS = int(os.environ.get("BENCH_PAIRS", "5"))
PARTS = [p for p in os.environ.get("BENCH_PARTS", "").split(",") if p]
SMALL_FILES = 10_000
HISTORY = int(os.environ.get("BENCH_HISTORY", "2000"))  # committed batches behind planning
HISTORY_FILES = 100  # source files in each
# the command lines of Prefect's API server: the local one that runs reuse, or an ephemeral one
SERVER = ("flows.local_api", "prefect.server")
PREFECT_HOME = ROOT / "prefect-home"
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)


@dataclass
class Figure:
    """One row of the table."""

    name: str
    value: float | None
    definition: str
    against: str = ""  # the floor or peer
    sides: list[Side] = field(default_factory=list)
    target: str = ""
    met: bool | None = None
    note: str = ""


FIGURES: list[Figure] = []
BEATEN: list[str] = []  # figures that beat their floor: a measuring bug


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def record(figure: Figure) -> Figure:
    FIGURES.append(figure)
    value = "n/a" if figure.value is None else f"{figure.value}"
    say(f"{figure.name:<34} {value}  {figure.note}")
    for side in figure.sides:
        say(f"    {side.line()}")
    return figure


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


def write_csv(folder: Path, size: int) -> Path:
    """One CSV file of about ``size`` bytes of well-formed rows (the demo's generator; its
    bad rows cut off the end, so the peer's plain conversion reads it too)."""
    from skyferry.ops.demo import generate_dataset

    generate_dataset(folder, total_bytes=size, files=1)
    path = next(folder.glob("*.csv"))
    end = path.stat().st_size
    with open(path, "rb+") as fh:
        fh.seek(max(0, end - 4096))
        tail = fh.read()
        keep = tail.find(b"999999991,")
        if keep >= 0:
            fh.truncate(max(0, end - 4096) + keep)
    return path


def fresh_home(name: str) -> Path:
    home = ROOT / "homes" / name
    shutil.rmtree(home, ignore_errors=True)
    os.environ["SKYFERRY_HOME"] = str(home)
    from skyferry.config import get_settings

    get_settings.cache_clear()
    return home


def run_skyferry(source: Path, dataset: str, **options: Any) -> Any:
    """One run in this process (Prefect's API already up: its start-up is startup_s's)."""
    from flows.ephemeral import settle_ephemeral_api
    from flows.pipeline import run_pipeline
    from skyferry.config import PipelineConfig

    result = run_pipeline(PipelineConfig(source=str(source), dataset=dataset, **options))
    if result.status != "completed":
        raise SystemExit(f"benchmark run failed: {result.error}")
    sync()  # the page cache's dirty pages of this run are not the next run's
    settle_ephemeral_api(result)  # untimed in effect: the API records the run's last tasks
    return result


@dataclass
class Child:
    wall_s: float
    peak_mb: float
    server_mb: float
    stdout: str


def local_api_pids() -> list[int]:
    """The local Prefect API server of PREFECT_HOME, if one runs: a command uses it, and it
    is no child of the command (but of the run that started it), so it is counted beside."""
    try:
        pid = json.loads((PREFECT_HOME / "skyferry-api.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return []
    return [pid] if isinstance(pid, int) else []


def stop_local_api() -> None:
    from flows.local_api import stop_local_api as stop

    stop(PREFECT_HOME)


def child(args: list[str], *, home: Path | None = None,
          label: tuple[str, ...] | None = SERVER, check: bool = True,
          env: dict[str, str] | None = None) -> Child:
    """A command in a new process, from exec to exit, its whole tree's PSS sampled, with the
    local API server's (``label`` names the server's processes)."""
    env = {**os.environ, **(env or {})}
    if home is not None:
        env["SKYFERRY_HOME"] = str(home)
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    also = local_api_pids if label is not None else None
    with TreeSampler(proc.pid, label=label, also=also) as sampler:
        out, err = proc.communicate()
    wall = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... exited {proc.returncode}: "
                         + " / ".join(err.strip().splitlines()[-3:]))
    return Child(wall, sampler.peak_mb, sampler.share_mb, out)


def cli(*args: str, home: Path | None = None) -> Child:
    """A ``skyferry`` command. Only ``run`` uses Prefect's API: the local API server's memory
    counts with it, and with no other command."""
    return child([sys.executable, "-m", "skyferry.cli", *args], home=home,
                 label=SERVER if args[0] == "run" else None)


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def part(name: str) -> bool:
    return not PARTS or name in PARTS


# --- sections ----------------------------------------------------------------------------
def startup(data: Path) -> None:
    """`skyferry run` of a new 2-row CSV file, from exec to exit: the first run, which starts
    the local Prefect API; a later run, which reuses it; and a run on Prefect's ephemeral API
    (one per process). Each round stops the local API first, so its first run starts it."""
    first = Side("first run (starts the local API)")
    later = Side("later run (reuses it)")
    ephemeral = Side("ephemeral API (SKYFERRY_PREFECT_API=ephemeral)")
    counter = iter(range(10 * PAIRS))

    def tiny(side: Side, env: dict[str, str] | None = None) -> None:
        i = next(counter)
        src = data / "tiny" / f"t{i}" / "t.csv"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(f"id,x\n{2 * i},a\n{2 * i + 1},b\n")
        home = fresh_home(f"startup-{i}")
        side.run(lambda: child([sys.executable, "-m", "skyferry.cli", "run", str(src.parent),
                                "--dataset", "tiny"], home=home, env=env))

    for _ in range(PAIRS):
        stop_local_api()
        tiny(first)
        tiny(later)
        tiny(ephemeral, {"SKYFERRY_PREFECT_API": "ephemeral"})
    record(Figure("startup_s", round(later.median, 2), "wall time of `skyferry run` on a new "
                  "2-row CSV file, exec to exit, the local Prefect API already up (a later run)",
                  sides=[later], target="<= 5", met=later.median <= 5, note="median"))
    record(Figure("startup_first_s", round(first.median, 2), "the same, the run that starts "
                  "the local Prefect API (its database already migrated)", sides=[first],
                  note="median; once per PREFECT_HOME until it idles out"))
    record(Figure("startup_ephemeral_s", round(ephemeral.median, 2), "the same on Prefect's "
                  "ephemeral API, which every run starts and stops", sides=[ephemeral],
                  note="median"))


def plain_chunk_path(source: Path, home: str) -> None:
    """The chunk path without Prefect in this process, as wide as a run's window, synced."""
    from skyferry.config import get_settings
    from tests.helpers.sf_data import commit_without_prefect

    fresh_home(home)
    commit_without_prefect(source, "blob", parallel=get_settings().max_in_flight)
    sync()


def binary(blob: Path) -> None:
    """1 GiB of random bytes to 3 local nodes, against the floor."""
    floor_dir = ROOT / "floor"
    targets = [floor_dir / f"n{i}" / "one.bin" for i in range(3)]

    def floor() -> None:
        floor_copy(blob, targets)

    def sky() -> None:
        fresh_home("binary")
        run_skyferry(blob, "blob")

    def clean() -> None:
        shutil.rmtree(floor_dir, ignore_errors=True)
        shutil.rmtree(ROOT / "homes" / "binary", ignore_errors=True)
        sync()

    fresh_home("binary")
    run_skyferry(blob, "warm")  # Prefect's start-up, untimed
    clean()
    floor_side, sky_side = abba(("floor", floor), ("skyferry", sky), PAIRS, between=clean)
    plain = Side("the chunk path without Prefect (where the time goes)")
    for _ in range(PAIRS):
        plain.run(lambda: plain_chunk_path(blob, "binary"))
        clean()
    value = ratio(sky_side.median, floor_side.min)
    figure = record(Figure(
        "binary_time_ratio_to_floor", value,
        f"{SIZE / GIB:.0f} GiB binary file to 3 local nodes: skyferry's median over the floor's "
        "minimum", "the source read once, BLAKE3 on every core, 3 copies written with early "
        "writeback and fdatasync", [sky_side, floor_side, plain], "<= 1.3", value <= 1.3,
        note=f"of skyferry's median, {sky_side.median - plain.median:.2f} s is Prefect's (its "
             f"median less the plain chunk path's), {plain.median - floor_side.min:.2f} s the "
             "chunk path's over the floor"))
    if value < 1:
        BEATEN.append(figure.name)


def encryption(blob: Path) -> None:
    """The same binary run with encryption at rest on and off: the time, and the whole
    tree's peak memory of `skyferry run` (the local API's counted beside)."""
    from skyferry.crypto import new_master_key

    keys = ROOT / "master.keys"
    keys.write_text(new_master_key("bench") + "\n")
    spec = f"file:{keys}"

    def plain() -> None:
        fresh_home("enc-plain")
        run_skyferry(blob, "blob")

    def sealed() -> None:
        fresh_home("enc-on")
        run_skyferry(blob, "blob", encrypt=True, master_keys=spec)

    def clean() -> None:
        for name in ("enc-plain", "enc-on"):
            shutil.rmtree(ROOT / "homes" / name, ignore_errors=True)
        sync()

    fresh_home("enc-on")
    run_skyferry(blob, "warm", encrypt=True, master_keys=spec)  # start-up, untimed
    clean()
    off, on = abba(("encryption off", plain), ("encryption on", sealed), PAIRS, between=clean)
    value = ratio(on.median, off.median)
    record(Figure("encrypt_time_ratio", value,
                  f"{SIZE / GIB:.0f} GiB binary file to 3 local nodes: the median run with "
                  "encryption at rest (AES-256-GCM, 64 KiB segments) over the median without",
                  "the same run, encryption off", [on, off], "<= 1.10", value <= 1.10))
    peaks: dict[str, float] = {}
    for label, extra in (("off", []), ("on", ["--encrypt", "--keys", spec])):
        home = fresh_home(f"enc-mem-{label}")
        peaks[label] = cli("run", str(blob.parent), "--dataset", "blob", *extra,
                           home=home).peak_mb
        shutil.rmtree(home, ignore_errors=True)
    record(Figure("peak_run_encrypted_mb", round(peaks["on"], 1),
                  f"whole-tree peak memory of `skyferry run --encrypt` of the {SIZE / GIB:.0f} "
                  "GiB binary file", target=f"<= {peaks['off'] * 1.1:.0f} (unencrypted "
                  f"{peaks['off']:.0f} MB + 10%)", met=peaks["on"] <= peaks["off"] * 1.1))


def rclone(blob: Path) -> None:
    """rclone copying the same file to 3 local folders in one process (a union remote that
    creates on all), its MD5 check after each copy on, then a sync; against skyferry."""
    exe = shutil.which("rclone")
    if exe is None:
        record(Figure("rclone_time_ratio", None, "skyferry's median over rclone's median",
                      note="rclone is not installed"))
        return
    targets = [ROOT / "rclone" / f"n{i}" for i in range(3)]
    env = dict(os.environ, RCLONE_CONFIG_ALL_TYPE="union",
               RCLONE_CONFIG_ALL_UPSTREAMS=" ".join(str(t) for t in targets),
               RCLONE_CONFIG_ALL_CREATE_POLICY="all", RCLONE_CONFIG_ALL_ACTION_POLICY="all")

    def peer() -> None:
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
        subprocess.run([exe, "copy", "--transfers", "4", str(blob.parent), "all:"], env=env,
                       check=True, capture_output=True)
        sync()

    def sky() -> None:
        fresh_home("rclone-sky")
        run_skyferry(blob, "blob")

    def clean() -> None:
        shutil.rmtree(ROOT / "rclone", ignore_errors=True)
        shutil.rmtree(ROOT / "homes" / "rclone-sky", ignore_errors=True)
        sync()

    peer_side, sky_side = abba(("rclone", peer), ("skyferry", sky), PAIRS, between=clean)
    value = ratio(sky_side.median, peer_side.median)
    record(Figure("rclone_time_ratio", value, f"{SIZE / GIB:.0f} GiB binary file to 3 local "
                  "folders: skyferry's median over rclone's median",
                  "rclone copy, one process, a union remote creating on all 3, --transfers 4, "
                  "its hash check on, then sync", [sky_side, peer_side], "< 1", value < 1))


def pyarrow_peer(src: Path, targets: list[Path], block: int) -> None:
    """CSV to zstd Parquet as a pyarrow user streams it: ``open_csv`` blocks into one
    ``ParquetWriter`` with skyferry's settings (a row group per block, dictionary except on
    floats), the bytes teed to every target, each made durable with ``fdatasync``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    class Tee:
        closed = False

        def __init__(self) -> None:
            self.files = [open(t, "wb") for t in targets]  # noqa: SIM115

        def flush(self) -> None:
            pass

        def write(self, data: Any) -> int:
            for fh in self.files:
                fh.write(data)
            return len(data)

        def close(self) -> None:
            if self.closed:
                return
            self.closed = True
            for fh in self.files:
                fh.flush()
                os.fdatasync(fh.fileno())
                fh.close()

    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    tee = Tee()
    reader = pacsv.open_csv(src, read_options=pacsv.ReadOptions(block_size=block))
    schema = reader.schema
    dictionary = [f.name for f in schema if not pa.types.is_floating(f.type)]
    sink = pa.PythonFile(tee, mode="w")  # type: ignore[arg-type]
    with pq.ParquetWriter(sink, schema, compression="zstd", use_dictionary=dictionary) as out:
        for batch in reader:
            out.write_table(pa.Table.from_batches([batch]),
                            row_group_size=max(1, batch.num_rows))
    tee.close()


def csv(csv_file: Path) -> None:
    from skyferry.config import get_settings

    block = get_settings().block_size
    targets = [ROOT / "pyarrow" / f"n{i}" / "out.parquet" for i in range(3)]

    def peer() -> None:
        pyarrow_peer(csv_file, targets, block)

    def sky() -> None:
        fresh_home("csv")
        run_skyferry(csv_file, "csv")

    def clean() -> None:
        shutil.rmtree(ROOT / "pyarrow", ignore_errors=True)
        shutil.rmtree(ROOT / "homes" / "csv", ignore_errors=True)
        sync()

    peer_side, sky_side = abba(("pyarrow", peer), ("skyferry", sky), PAIRS, between=clean)
    value = ratio(sky_side.median, peer_side.median)
    size = csv_file.stat().st_size
    record(Figure("csv_time_ratio_to_pyarrow", value,
                  f"{size / GIB:.1f} GiB CSV to zstd Parquet on 3 local nodes, durable: "
                  "skyferry's median over pyarrow's median",
                  "pyarrow streaming (open_csv to ParquetWriter), skyferry's writer settings, "
                  "3 copies, fdatasync", [sky_side, peer_side], "<= 1.2", value <= 1.2,
                  note=f"skyferry {size / 1e6 / sky_side.median:.0f} MB/s"))


def plain_path_script(source: Path, dataset: str) -> list[str]:
    """The chunk path without Prefect, in a fresh process: probe, plan, the chunks through a
    plain thread pool as wide as the run's window, journal, commit, sync."""
    code = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from skyferry.config import get_settings
from tests.helpers.sf_data import commit_without_prefect
commit_without_prefect(Path({str(source)!r}), {dataset!r}, parallel=get_settings().max_in_flight)
os.sync()
"""
    return [sys.executable, "-c", code]


def orchestration(big: Path) -> None:
    """The 4 GiB binary run as a user runs it (`skyferry run`, exec to exit) against the
    same chunk path without Prefect in a fresh process; the run's whole-tree peak memory."""
    peaks: list[Child] = []

    def sky() -> None:
        home = fresh_home("big")
        peaks.append(cli("run", str(big), "--dataset", "big", home=home))
        sync()

    def plain() -> None:
        home = fresh_home("big-plain")
        child(plain_path_script(big, "big"), home=home, label=None)

    def clean() -> None:
        for name in ("big", "big-plain"):
            shutil.rmtree(ROOT / "homes" / name, ignore_errors=True)
        sync()

    plain_side, sky_side = abba(("plain chunk path", plain), ("skyferry run", sky), PAIRS,
                                between=clean)
    shares = [(s - p) / s for s, p in zip(sky_side.wall, plain_side.wall, strict=True)]
    value = round(statistics.median(shares), 4)
    record(Figure("overhead_time_ratio", value,
                  f"(`skyferry run` of {BIG / GIB:.0f} GiB, exec to exit, minus the plain chunk "
                  "path's wall time in a fresh process) over the run's; median of the pairs",
                  "the same chunk path in a plain thread pool, no Prefect",
                  [sky_side, plain_side], "<= 0.10", value <= 0.10,
                  note=f"pairs' min {min(shares):.3f}, max {max(shares):.3f}"))
    peak = max(peaks, key=lambda c: c.peak_mb)
    record(Figure("peak_run_binary_mb", round(peak.peak_mb),
                  f"`skyferry run` of {BIG / GIB:.0f} GiB binary ({BIG // (512 * MIB)} chunks "
                  "of 512 MiB): the largest summed PSS of its process tree",
                  target="<= 768", met=peak.peak_mb <= 768,
                  note=f"Prefect's API server {peak.server_mb:.0f} MB of it; max of {PAIRS}"))


def memory(data: Path, big: Path) -> None:
    """Whole-tree peak memory of every command: `run` of a CSV of 8 chunks or more at the
    default chunk size, then `export` (to Parquet, and a binary dataset to a folder),
    `read`, `verify --deep`, `repair` and `gc`, at the default chunk size and at 2 GiB
    chunks."""
    size = max(BIG, 8 * 512 * MIB)
    csv_file = write_csv(data / "csv-big", size)
    sync()
    out = ROOT / "out"
    for chunk_size, suffix in ((None, ""), ("2GiB", "_2g")):
        home = fresh_home(f"memory{suffix}")
        sized = ["--chunk-size", chunk_size] if chunk_size else []
        label = f"{chunk_size} chunks" if chunk_size else "512 MiB chunks (the default)"
        runs = [cli("run", str(csv_file), "--dataset", "csv", *sized, home=home)]
        cli("run", str(big), "--dataset", "big", *sized, home=home)
        out.mkdir(exist_ok=True)
        cmds: dict[str, tuple[Child, str]] = {}
        if not chunk_size:
            cmds["peak_run_csv_mb"] = (runs[0], f"`skyferry run` of a {size / GIB:.0f} GiB "
                                                "CSV file")
        def measured(*args: str, output: Path | None = None, home: Path = home) -> Child:
            """A command's tree measured; its output deleted at once (disk space)."""
            done = cli(*args, home=home)
            if output is not None:
                shutil.rmtree(output) if output.is_dir() else output.unlink(missing_ok=True)
            return done

        cmds.update({
            f"peak_export_mb{suffix}": (
                measured("export", "csv", "--to", str(out / "e.parquet"),
                         output=out / "e.parquet"),
                f"`skyferry export` of that CSV dataset to Parquet, {label}"),
            f"peak_export_binary_mb{suffix}": (
                measured("export", "big", "--to", str(out / "bin"), output=out / "bin"),
                f"`skyferry export` of the {BIG / GIB:.0f} GiB binary dataset to a folder, "
                f"{label}"),
            f"peak_read_mb{suffix}": (
                measured("read", "csv", "--to", str(out / "r.parquet"),
                         output=out / "r.parquet"),
                f"`skyferry read` of the CSV dataset to Parquet, {label}"),
            f"peak_verify_deep_mb{suffix}": (
                measured("verify", "big", "--deep"),
                f"`skyferry verify --deep` of the binary dataset, {label}"),
        })
        _lose_one_replica_each(home, "big")
        cmds[f"peak_repair_mb{suffix}"] = (
            cli("repair", "big", home=home),
            f"`skyferry repair` of one lost replica of every binary chunk, {label}")
        cmds[f"peak_gc_mb{suffix}"] = (
            cli("gc", "--grace", "0", home=home),
            f"`skyferry gc` of both datasets on every node (nothing to delete), {label}")
        for name, (run, what) in cmds.items():
            limit = 768 if name == "peak_run_csv_mb" else 512
            record(Figure(name, round(run.peak_mb), f"{what}: the largest summed PSS of its "
                          "process tree", target=f"<= {limit}", met=run.peak_mb <= limit,
                          note=f"Prefect's API server {run.server_mb:.0f} MB" if run.server_mb
                          else ""))
        shutil.rmtree(out)
        shutil.rmtree(home)
    shutil.rmtree(csv_file.parent)


def _lose_one_replica_each(home: Path, dataset: str) -> int:
    """Delete one replica of every chunk, each from the node that holds the most of the
    dataset's replicas then, so that every node keeps one; the bytes deleted."""
    from collections import Counter

    from skyferry.commit.manifest import open_catalog
    from skyferry.topology import load_topology

    manifest = open_catalog(load_topology()).manifest(dataset)
    held = Counter(r.node for c in manifest.chunks for r in c.verified)
    lost = 0
    for chunk in manifest.chunks:
        node = max((r.node for r in chunk.verified), key=lambda n: held[n])
        if held[node] < 2:
            continue
        (home / "nodes" / node / chunk.key).unlink()
        held[node] -= 1
        lost += chunk.size
    sync()
    return lost


def small_files(data: Path, blob: Path) -> None:
    """10,000 files of unique random bytes, against one file of the same total size."""
    folder = data / "small"
    each = SIZE // SMALL_FILES
    for i in range(SMALL_FILES):
        write_random(folder / f"f{i:05d}.bin", each, seed=1000 + i)
    one = data / "one" / "one.bin"
    write_random(one, each * SMALL_FILES, seed=999)
    sync()

    def run(src: Path, name: str) -> Callable[[], None]:
        def go() -> None:
            fresh_home(name)
            run_skyferry(src, name)
        return go

    def clean() -> None:
        for name in ("small", "one"):
            shutil.rmtree(ROOT / "homes" / name, ignore_errors=True)
        sync()

    one_side, small_side = abba(("one file", run(one, "one")),
                                ("10,000 files", run(folder, "small")), PAIRS, between=clean)
    per_file = [(s - o) / SMALL_FILES * 1000
                for s, o in zip(small_side.wall, one_side.wall, strict=True)]
    value = round(statistics.median(per_file), 3)
    record(Figure("small_file_ms", value, "(10,000 files' run − one file's run of the same "
                  "bytes) ÷ 10,000: ms per file; median of the pairs",
                  "one file of the same total size", [small_side, one_side],
                  note=f"pairs' min {min(per_file):.3f}, max {max(per_file):.3f} ms"))
    shutil.rmtree(folder)
    shutil.rmtree(one.parent)


def cold(blob: Path) -> None:
    """verify --deep and repair with every replica evicted from the page cache, as ratios to
    the disk's own cold read speed (a file evicted, then read through); the dataset in 8
    chunks, so that every node holds some and repair has a replica of most to re-create."""
    from skyferry.commit.manifest import open_catalog
    from skyferry.config import get_settings
    from skyferry.ops.repair import repair_dataset
    from skyferry.ops.verify import verify_dataset
    from skyferry.topology import load_topology

    home = fresh_home("cold")
    run_skyferry(blob, "blob", chunk_size=max(1, SIZE // 8))  # 8 chunks over the 5 nodes
    topology = load_topology()
    manifest = open_catalog(topology).manifest("blob")
    replicas = [home / "nodes" / r.node / c.key for c in manifest.chunks for r in c.verified]

    def disk() -> None:  # the same files, cold, read through on as many threads
        evict(replicas)
        with ThreadPoolExecutor(max_workers=get_settings().max_in_flight) as pool:
            list(pool.map(_read_through, replicas))

    def deep() -> None:
        evict(replicas)
        report = verify_dataset(topology, "blob", deep=True)
        assert report.healthy, report.counts()

    disk_side, verify_side = abba(("cold read of the replicas", disk),
                                  ("verify --deep", deep), PAIRS)
    read_bytes = sum(p.stat().st_size for p in replicas)
    disk_mb_s = read_bytes / 1e6 / disk_side.min
    verify_mb_s = read_bytes / 1e6 / verify_side.median
    verify_ratio = ratio(verify_mb_s, disk_mb_s)
    if verify_ratio > 1:
        BEATEN.append("verify_deep_cold_throughput_ratio")
    record(Figure("verify_deep_cold_throughput_ratio", verify_ratio,
                  "MB/s of `verify --deep` (every replica read and hashed, none cached) over "
                  "the disk's: the fastest cold read of the same files, as many at once",
                  "the replicas read through, cold, on as many threads, not hashed",
                  [verify_side, disk_side],
                  note=f"verify {verify_mb_s:.0f} MB/s, disk {disk_mb_s:.0f} MB/s"))
    repair_side = Side("repair")

    copied = 0

    def repair() -> None:
        report = repair_dataset(topology, "blob", max_node_share=1.0)
        assert report.complete and report.bytes_copied == lost, (report.bytes_copied, lost)

    for _ in range(PAIRS):
        lost = _lose_one_replica_each(home, "blob")
        copied += lost
        evict([p for p in home.glob("nodes/*/blob/**/*") if p.is_file()])
        repair_side.run(repair)
    copied //= PAIRS
    repair_mb_s = copied / 1e6 / repair_side.median
    record(Figure("repair_cold_throughput_ratio", ratio(repair_mb_s, disk_mb_s),
                  "MB/s of `repair` re-creating one lost replica of every chunk from cold "
                  "replicas (read, verified, written durably) over the disk's cold read MB/s",
                  "the replicas read through, cold (above)", [repair_side, disk_side],
                  note=f"repair {repair_mb_s:.0f} MB/s of replicas re-created"))
    shutil.rmtree(home)


def history(data: Path) -> None:
    """Planning on a dataset with HISTORY batches of 100 files each, committed through the
    code a run uses (no Prefect: tests/helpers/sf_data.py), against planning on an empty
    dataset: 10 new files and 10,000 new files; and the index rebuilt from the manifests."""
    from skyferry.config import PipelineConfig
    from skyferry.run.batch import new_source_files, plan_batch
    from skyferry.run.context import open_run
    from tests.helpers.sf_data import commit_without_prefect

    home = fresh_home("history")
    commits: list[float] = []
    for i in range(HISTORY):
        folder = data / "history" / f"b{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(HISTORY_FILES):
            (folder / f"f{j:03d}.csv").write_text(f"id,x\n{i * HISTORY_FILES + j},{i}\n")
        began = time.perf_counter()
        commit_without_prefect(folder, "hist")
        commits.append(time.perf_counter() - began)
    committed_s = sum(commits)
    window = max(1, min(50, HISTORY // 4))
    early, late = Side(f"first {window} batches"), Side(f"last {window} batches")
    early.wall, late.wall = commits[:window], commits[-window:]
    growth = ratio(late.median, early.median)
    record(Figure("commit_time_ratio_with_history", growth,
                  f"committing a batch of {HISTORY_FILES} one-row CSV files (plan, move, journal, "
                  f"index, manifest; no Prefect): the median of the last {window} of {HISTORY:,} "
                  f"batches over the median of the first {window}", "the same commits on a "
                  "short history", [late, early], target="<= 1.5", met=growth <= 1.5,
                  note=f"{HISTORY:,} batches committed in {committed_s:.0f} s; max "
                       f"{max(commits):.2f} s"))
    new: dict[int, Path] = {}
    for count in (10, 10_000):
        new[count] = data / "history-new" / str(count)
        new[count].mkdir(parents=True, exist_ok=True)
        for j in range(count):
            (new[count] / f"n{j:05d}.csv").write_text(f"id,x\n{j},0\n")

    def plan(count: int, dataset: str) -> Callable[[], None]:
        def go() -> None:
            setup = open_run(PipelineConfig(source=str(new[count]), dataset=dataset))
            listing = new_source_files(setup)
            run = plan_batch(setup, listing.files)
            assert len(listing.files) == count
            run.close()
            setup.catalog.drop_pending(dataset, run.plan.batch_id)
        return go

    for count in (10, 10_000):
        empty_side, hist_side = abba((f"{count:,} new files, empty dataset", plan(count, "e")),
                                     (f"{count:,} new files, {HISTORY:,} batches",
                                      plan(count, "hist")), PAIRS)
        record(Figure(f"plan_{count}_time_ratio_with_history",
                      ratio(hist_side.median, empty_side.median),
                      f"planning {count:,} new files on a dataset of {HISTORY:,} committed "
                      f"batches of {HISTORY_FILES} files, over planning them on an empty one",
                      "the same planning on an empty dataset", [hist_side, empty_side],
                      target="<= 1.5", met=hist_side.median <= 1.5 * empty_side.median,
                      note=f"the history committed in {committed_s:.0f} s"))
    rebuild = Side("index rebuilt, then 10 new files planned")

    def rebuilt() -> None:
        shutil.rmtree(home / "catalog" / "index" / "hist")
        rebuild.run(plan(10, "hist"))

    for _ in range(PAIRS):
        rebuilt()
    record(Figure("index_rebuild_s", round(rebuild.median, 2),
                  f"planning 10 new files after the source index was deleted: the index "
                  f"rebuilt from {HISTORY:,} manifests", sides=[rebuild]))
    shutil.rmtree(home)
    shutil.rmtree(data / "history")
    shutil.rmtree(data / "history-new")


def _read_through(path: Path) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 * MIB):
            pass


def render() -> str:
    head = ("figure", "value", "target", "met", "skyferry min/median/max s",
            "floor or peer min/median/max s")
    rows = []
    for f in FIGURES:
        sides = [f"{s.min:.2f}/{s.median:.2f}/{s.max:.2f}" for s in f.sides]
        rows.append((f.name, "n/a" if f.value is None else str(f.value), f.target or "-",
                     "-" if f.met is None else ("yes" if f.met else "no"),
                     sides[0] if sides else "-", sides[1] if len(sides) > 1 else "-"))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [head, *rows])


def warm_memory() -> float:
    """Touch the free memory once, in 1 GiB blocks, then free it; the seconds taken. On these
    VMs the first touch of a guest page faults to the hypervisor (about 2.5 s per GiB), which
    would land on whichever measured run allocates that page first."""
    import numpy as np
    import psutil

    blocks = max(0, int(psutil.virtual_memory().available / GIB) - 3)
    started = time.perf_counter()
    held = [np.ones(GIB // 8) for _ in range(blocks)]
    del held
    return time.perf_counter() - started


def main() -> None:
    say(f"bench dir {ROOT}; {SIZE / GIB:.1f} GiB runs, {BIG / GIB:.1f} GiB big runs, "
        f"{PAIRS} pairs")
    say(f"the machine's free memory touched once in {warm_memory():.1f} s (not skyferry's)")
    data = ROOT / "data"
    blob = data / "blob" / "one.bin"
    write_random(blob, SIZE, seed=1)
    csv_file = write_csv(data / "csv", SIZE)
    big = data / "big" / "big.bin"
    if part("orchestration") or part("memory"):
        write_random(big, BIG, seed=4)
    sync()
    sections: list[tuple[str, Callable[[], None]]] = [
        ("startup", lambda: startup(data)),
        ("binary", lambda: binary(blob)),
        ("encryption", lambda: encryption(blob)),
        ("rclone", lambda: rclone(blob)),
        ("csv", lambda: csv(csv_file)),
        ("small", lambda: small_files(data, blob)),
        ("cold", lambda: cold(blob)),
        ("orchestration", lambda: orchestration(big)),
        ("memory", lambda: memory(data, big)),
        ("history", lambda: history(data)),
    ]
    for name, section in sections:
        if part(name):
            say(f"-- {name}")
            section()
    body: dict[str, Any] = {}
    sides: dict[str, Any] = {}
    for name in ("reader", "snapshot", "cloud", "scale"):  # their own modules, each a dict
        if part(name):
            module = __import__(f"{name}_bench")
            found = module.main()
            sides.update(found.pop("sides", {}))
            body.update(found)
    say("")
    say(render())
    for key in sorted(body):
        if key in sides:
            say(f"{key}: {body[key]}; " + "; ".join(
                f"{side} {s['min_s']:.2f}/{s['median_s']:.2f}/{s['max_s']:.2f} s"
                for side, s in sides[key].items()))
    body.update({f.name: f.value for f in FIGURES})
    sides.update({f.name: {s.name: s.summary() for s in f.sides} for f in FIGURES
                  if f.sides})
    body["sides"] = sides
    say(json.dumps(body, sort_keys=True))
    if BEATEN:
        raise SystemExit(f"a ratio beat its floor, which cannot be: {', '.join(BEATEN)} "
                         "(the floor does less work than skyferry; the floor is wrong)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        main()
    finally:
        stop_local_api()  # the bench's own, in its PREFECT_HOME
        if not os.environ.get("BENCH_DIR"):
            shutil.rmtree(ROOT, ignore_errors=True)
