"""``make chaos``: every chaos scenario against the local servers, one table and one JSON
line (tests/chaos/harness.py says what each figure means). Scenario names as arguments run
only those, after the clean run that sets the baseline."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("SKYFERRY_RETRY_DELAYS", "[0.5, 1.0]")


def main() -> None:
    from tests.chaos.harness import SCENARIOS, ChaosEnv, render, run_scenario
    from tests.helpers import sf_servers

    work = Path(tempfile.mkdtemp(prefix="skyferry-chaos-"))
    os.environ["SKYFERRY_HOME"] = str(work / "home")
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    servers = {"s3": sf_servers.moto(work / "logs"), "gs": sf_servers.gcs(work / "logs"),
               "az": sf_servers.azurite(work / "logs", work / "azurite")}
    outcomes = []
    try:
        for server in servers.values():
            server.start()
        env = ChaosEnv(servers, work / "scenarios")
        try:
            chosen = list(SCENARIOS) if len(sys.argv) < 2 else ["clean", *sys.argv[1:]]
            for name in chosen:
                sys.stderr.write(f"running: {name}\n")
                outcomes.append(run_scenario(env, name))
        finally:
            env.close()
    finally:
        for server in servers.values():
            server.stop()
    sys.stdout.write(render(outcomes) + "\n")
    bad = [o for o in outcomes if o.lost or o.unexpected or o.under_replicated]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
