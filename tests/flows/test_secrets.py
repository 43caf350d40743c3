"""No secret of a failing node reaches stdout, stderr, logs, Prefect's database, artifacts or
manifests: one failing node of each backend, against the test suite's servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.clouds]

ROOT = Path(__file__).resolve().parents[2]


def _secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {"s3": f"S3SECRETx{tag}", "gs": f"GCSTOKENx{tag}", "az": f"AZKEYx{tag}QUJD=="}


def _topology(path: Path, home: Path, clouds: Any, secrets: dict[str, str], good: int) -> Path:
    az = clouds.az.endpoint
    bad = [
        {"name": "s3-bad", "cloud": "aws", "region": "r", "url": "s3://no-such-bucket/x",
         "timeout_s": 3, "storage_options": {"key": "k", "secret": secrets["s3"],
                                             "endpoint_url": clouds.s3.endpoint}},
        {"name": "gs-bad", "cloud": "gcp", "region": "r", "url": "gs://no-such-bucket/x",
         "timeout_s": 3, "storage_options": {"token": secrets["gs"],
                                             "endpoint_url": clouds.gs.endpoint}},
        {"name": "az-bad", "cloud": "azure", "region": "r", "url": "az://no-such-container/x",
         "timeout_s": 3, "storage_options": {"connection_string": (
             f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
             f"AccountKey={secrets['az']};BlobEndpoint={az}/devstoreaccount1;")}},
    ]
    local = [{"name": f"local-{i}", "cloud": ["aws", "gcp"][i % 2], "region": "r",
              "url": str(home / "nodes" / f"local-{i}")} for i in range(good)]
    path.write_text(json.dumps({"catalog": str(home / "catalog"), "nodes": local + bad}))
    return path


def _skyferry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skyferry.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _files_holding(root: Path, secret: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(str(path))
    return found


def test_no_secret_of_a_failing_node_is_written_anywhere(tmp_path: Path, clouds: Any) -> None:
    secrets = _secrets()
    home, prefect_home = tmp_path / "home", tmp_path / "prefect"
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4000))
    env = {**os.environ, "SKYFERRY_HOME": str(home), "PREFECT_HOME": str(prefect_home),
           "PREFECT_LOGGING_LEVEL": "DEBUG", "PREFECT_API_URL": "",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    env.pop("PREFECT_API_URL")
    outputs = []
    ok_topo = _topology(tmp_path / "ok.yaml", home, clouds, secrets, good=2)
    run = _skyferry("run", str(src), "--dataset", "s", "--topology", str(ok_topo),
                    "--chunk-size", "1000", "--json", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert sorted(result["down_nodes"]) == ["az-bad", "gs-bad", "s3-bad"]
    outputs += [run.stdout, run.stderr]
    bad_topo = _topology(tmp_path / "bad.yaml", home, clouds, secrets, good=1)
    failed = _skyferry("run", str(src), "--dataset", "f", "--topology", str(bad_topo),
                       env=env)
    assert failed.returncode == 1 and "InsufficientNodesError" in failed.stdout + failed.stderr
    assert "gs-bad" in failed.stdout + failed.stderr
    outputs += [failed.stdout, failed.stderr]
    nodes = _skyferry("nodes", "--topology", str(ok_topo), env=env)
    assert nodes.returncode == 0 and "az-bad" in nodes.stdout, nodes.stderr[-2000:]
    outputs += [nodes.stdout, nodes.stderr]
    assert (prefect_home / "prefect.db").exists()
    for name, secret in secrets.items():
        assert not [o for o in outputs if secret in o], f"{name} secret in the output"
        assert not _files_holding(prefect_home, secret), f"{name} secret in Prefect's home"
        assert not _files_holding(home, secret), f"{name} secret in the data directory"
