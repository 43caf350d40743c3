"""Cloud figures for ``make bench``: skyferry against a direct fsspec copy to the same nodes.
These are emulator figures (moto, gcp-storage-emulator, Azurite on this machine), not clouds'.

Both sides do the same work: the same bytes in 16 MiB objects, each sent as the same upload
type in parts of skyferry's part size (S3 multipart, GCS resumable, Azure staged blocks,
through fsspec's own writers on the direct side), and each verified the same way (S3's
multipart ETag and GCS's MD5 against the bytes sent; Azure's read back and hashed), to one
node in each cloud, the three clouds at once. In counterbalanced pairs; skyferry runs with
``max_writes: 1`` on every node, one upload at a time per node as the direct copy makes
(``cloud_throughput_ratio_to_direct``), and with no cap (``cloud_throughput_ratio_uncapped``).
A skyferry run that lost a node wrote fewer replicas than the direct copy: it is dropped,
and the dropped runs are counted and printed.

Environment: BENCH_CLOUD_MIB (default 384), BENCH_DIR, BENCH_PAIRS (default 5).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.helpers

from bench.measure import Side, abba  # noqa: E402
from tests.helpers import sf_servers  # noqa: E402

MIB = 1 << 20
SIZE = int(os.environ.get("BENCH_CLOUD_MIB", "384")) * MIB
CHUNK = 16 * MIB
NODES = {"aws": "s3", "gcp": "gs", "azure": "az"}
PAIRS = int(os.environ.get("BENCH_PAIRS", "5"))


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _without_final_cr(data: bytearray) -> bytearray:
    """No 16 MiB piece ends in CR: the GCS emulator drops that byte from an upload (it parses
    the multipart body with Python's email parser). skyferry's checksum catches it and takes
    the node out of the run; the direct copy would store the short object unnoticed. Either
    way the two would not be doing the same work (tests/flows/test_clouds.py shows the bug)."""
    for end in range(CHUNK, len(data) + CHUNK, CHUNK):
        if data[min(end, len(data)) - 1] == 0x0D:
            data[min(end, len(data)) - 1] = 0x0A
    return data


def main() -> dict[str, Any]:
    root = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="skyferry-cloud-"))
    root.mkdir(parents=True, exist_ok=True)
    # Prefect's local database: bench.py's, or a new one here (never the user's ~/.prefect)
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect-home"))
    logs = root / "server-logs"
    servers = {"s3": sf_servers.moto(logs), "gs": sf_servers.gcs(logs),
               "az": sf_servers.azurite(logs, root / "azurite")}
    figures: dict[str, Any] = {}
    try:
        for server in servers.values():
            server.start()
        env = sf_servers.CloudEnv(servers)
        env.reset()
        src = root / "cloud-src" / "blob.bin"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(_without_final_cr(bytearray(os.urandom(SIZE))))

        # direct fsspec copies to the three clouds at once
        import base64
        import hashlib

        import blake3
        import fsspec

        from skyferry.storage import PART_SIZE

        def verify(fs: Any, protocol: str, path: str, data: bytes) -> None:
            """What skyferry checks of each replica it writes, the same way."""
            fs.invalidate_cache(path)
            if protocol == "az":  # Azure keeps no checksum of a block upload: read it back
                back = fs.cat_file(path)
                assert blake3.blake3(back).digest() == blake3.blake3(data).digest(), path
                return
            info = fs.info(path)
            assert int(info["size"]) == len(data), path
            if protocol == "s3":
                parts = [hashlib.md5(data[i:i + PART_SIZE], usedforsecurity=False).digest()
                         for i in range(0, len(data), PART_SIZE)]
                whole = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
                expected = f"{whole}-{len(parts)}" if len(parts) > 1 else parts[0].hex()
                assert str(info["ETag"]).strip('"') == expected, path
            else:
                md5 = hashlib.md5(data, usedforsecurity=False).digest()
                assert base64.b64decode(info["md5Hash"]) == md5, path

        def direct(protocol: str, bucket: str) -> float:
            fs = fsspec.filesystem(protocol, **env.options(protocol), skip_instance_cache=True)
            started = time.perf_counter()
            with open(src, "rb") as fh:
                for n in range((SIZE + CHUNK - 1) // CHUNK):
                    data = fh.read(CHUNK)
                    blake3.blake3(data).digest()  # skyferry hashes what it sends
                    path = f"{bucket}/direct/part-{n:05d}"
                    with fs.open(path, "wb", block_size=PART_SIZE) as out:
                        for at in range(0, len(data), PART_SIZE):
                            out.write(data[at:at + PART_SIZE])
                    verify(fs, protocol, path, data)
            return time.perf_counter() - started

        def clear(paths: dict[str, str]) -> None:
            """Delete what a run wrote (protocol -> path): the servers slowed by about 0.5 s a
            run as they filled up, which would favour whichever side ran first."""
            for protocol, path in paths.items():
                fs = fsspec.filesystem(protocol, **env.options(protocol),
                                       skip_instance_cache=True)
                fs.rm(path, recursive=True)

        def direct_all(round_: int) -> float:
            for cloud, protocol in NODES.items():
                env.make_bucket(protocol, f"{cloud}-direct-{round_}")
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=3) as pool:
                list(pool.map(lambda item: direct(item[1], f"{item[0]}-direct-{round_}"),
                              NODES.items()))
            elapsed = time.perf_counter() - started
            clear({p: f"{c}-direct-{round_}/direct" for c, p in NODES.items()})
            return elapsed

        # skyferry: one node per cloud, three replicas, every one verified
        home = root / "cloud-home"
        shutil.rmtree(home, ignore_errors=True)
        os.environ["SKYFERRY_HOME"] = str(home)
        from skyferry.config import get_settings

        get_settings.cache_clear()
        for cloud, protocol in NODES.items():
            env.make_bucket(protocol, f"{cloud}-sky")
        topologies = {}
        for side, cap in (("skyferry", ", max_writes: 1"), ("uncapped", "")):
            lines = [f'catalog: "{home}/catalog"', "nodes:"]
            for cloud, protocol in NODES.items():
                opts = ", ".join(f'{k}: "{v}"' for k, v in env.options(protocol).items())
                lines.append(f'  - {{name: {cloud}-node, cloud: {cloud}, region: r, '
                             f'url: "{protocol}://{cloud}-sky/x", storage_options: {{{opts}}}'
                             f'{cap}}}')
            topologies[side] = root / f"cloud-topology-{side}.yaml"
            topologies[side].write_text("\n".join(lines) + "\n")
        topo = topologies["skyferry"]
        from flows.ephemeral import settle_ephemeral_api
        from flows.pipeline import run_pipeline
        from skyferry.config import PipelineConfig

        warm = run_pipeline(PipelineConfig(source=str(src), dataset="warm", topology=str(topo),
                                           chunk_size=SIZE))  # Prefect's start-up, not timed
        # and its tail: the API records the warm run's last task runs before the timed run
        # starts, as it does before a `skyferry run` process exits
        settle_ephemeral_api(warm)

        dropped: dict[str, list[str]] = {"skyferry": [], "uncapped": []}
        lost_node: dict[str, list[bool]] = {"skyferry": [], "uncapped": []}  # per run
        rounds = iter(range(10_000))

        def skyferry_run(side: str) -> Callable[[], None]:
            """A run; one that lost a node wrote fewer replicas than the direct copy and is
            dropped (its time is taken out below), counted and printed."""
            def go() -> None:
                dataset = f"cloud-{side}-{next(rounds)}"
                result = run_pipeline(PipelineConfig(source=str(src), dataset=dataset,
                                                     topology=str(topologies[side]),
                                                     chunk_size=CHUNK))
                assert result.status == "completed", result.error
                settle_ephemeral_api(result)
                clear({p: f"{c}-sky/x/{dataset}" for c, p in NODES.items()})
                lost_node[side].append(bool(result.node_failures_handled))
                if result.node_failures_handled:
                    dropped[side].append(f"{result.node_failures_handled} node failure(s): "
                                         f"{result.down_reasons or result.down_nodes}")
                    say(f"dropped a {side} run: {dropped[side][-1]}")
            return go

        def plain_run() -> None:
            """The same chunks through the chunk path in a plain thread pool, no Prefect."""
            from tests.helpers.sf_data import commit_without_prefect

            dataset = f"cloud-plain-{next(rounds)}"
            commit_without_prefect(src, dataset, parallel=get_settings().max_in_flight,
                                   topology=str(topologies["skyferry"]), chunk_size=CHUNK)
            clear({p: f"{c}-sky/x/{dataset}" for c, p in NODES.items()})

        def direct_side() -> None:
            tag = next(rounds)
            for cloud, protocol in NODES.items():
                env.make_bucket(protocol, f"{cloud}-direct-{tag}")
            with ThreadPoolExecutor(max_workers=3) as pool:
                list(pool.map(lambda item: direct(item[1], f"{item[0]}-direct-{tag}"),
                              NODES.items()))
            clear({p: f"{c}-direct-{tag}/direct" for c, p in NODES.items()})

        for side, name in (("skyferry", "cloud_throughput_ratio_to_direct"),
                           ("uncapped", "cloud_throughput_ratio_uncapped")):
            direct_times, sky = abba(("direct fsspec", direct_side),
                                     (f"skyferry ({side})", skyferry_run(side)), PAIRS)
            lost = dropped[side]
            kept = [i for i, lost_one in enumerate(lost_node[side]) if not lost_one]
            sky = Side(sky.name, [sky.wall[i] for i in kept], [sky.cpu[i] for i in kept])
            if not sky.wall:
                raise SystemExit(f"every one of {PAIRS} skyferry cloud runs ({side}) lost a "
                                 "node; no figure")
            figures[name] = round(direct_times.median / sky.median, 3)
            figures.setdefault("sides", {})[name] = {"skyferry": sky.summary(),
                                                     "direct": direct_times.summary()}
            figures[f"{name}_dropped_runs"] = len(lost)
            say(f"{name:<34} {figures[name]}  (emulators; {SIZE / MIB:.0f} MiB to 3 nodes, "
                f"one per cloud; {len(lost)} of {PAIRS} skyferry runs dropped for a lost "
                "node; target >= 0.9)")
            say(f"    {sky.line()}")
            say(f"    {direct_times.line()}")
            if side == "skyferry":  # where the time goes: the same chunks without Prefect
                plain = Side("the chunk path without Prefect")
                for _ in range(PAIRS):
                    plain.run(plain_run)
                figures[f"{name}_prefect_s"] = round(sky.median - plain.median, 2)
                figures["sides"][name]["plain chunk path"] = plain.summary()
                say(f"    {plain.line()}")
                say(f"    of skyferry's median, {sky.median - plain.median:.2f} s is Prefect's "
                    f"(its median less the plain chunk path's), "
                    f"{plain.median - direct_times.median:.2f} s the chunk path's over the "
                    "direct copy")
        figures["cloud_skyferry_mb_s"] = round(
            SIZE / 1e6 / figures["sides"]["cloud_throughput_ratio_to_direct"]["skyferry"][
                "median_s"], 1)

    finally:
        for server in servers.values():
            server.stop()
        if not os.environ.get("BENCH_DIR"):
            shutil.rmtree(root, ignore_errors=True)
    return figures


if __name__ == "__main__":
    say(json.dumps(main(), sort_keys=True))
