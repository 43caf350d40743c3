"""The skyferry command as a person uses it (typer's runner, real flows, ephemeral Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from skyferry.cli import app
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]
runner = CliRunner()


def test_run_json_then_export_then_nodes(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 800, seed=2, bad_rows=True)
    out = runner.invoke(app, ["run", f"{src}/*.csv", "--dataset", "cli", "--chunk-size", "10KB",
                              "--replicas", "3", "--quorum", "2", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["status"] == "completed"
    # no schema: only the short row is malformed; "abc" in a float column is kept
    assert result["rows_stored"] == 801 and result["rows_rejected"] == 1
    assert set(result["stages"]) == {"ingestion", "processing", "distribution", "storage"}

    target = tmp_path / "out.parquet"
    out = runner.invoke(app, ["export", "cli", "--to", str(target)])
    assert out.exit_code == 0, out.output
    exported = pq.read_table(target)
    assert exported.num_rows == 801
    assert "abc" in exported.column("f0").to_pylist()  # the disagreeing chunk made it string

    csv_target = tmp_path / "out.csv"
    assert runner.invoke(app, ["export", "cli", "--to", str(csv_target)]).exit_code == 0
    assert len(csv_target.read_text().splitlines()) == 802

    out = runner.invoke(app, ["nodes"])
    assert out.exit_code == 0, out.output
    for name in ("aws-node-1", "aws-node-2", "gcp-node-1", "gcp-node-2", "azure-node-1"):
        assert name in out.output
    assert out.output.count("healthy") == 5


def test_run_reports_a_failure_with_its_stage(home: Path, tmp_path: Path) -> None:
    out = runner.invoke(app, ["run", str(tmp_path / "missing"), "--dataset", "x"])
    assert out.exit_code == 1
    assert "ingestion" in out.output and "source not found" in out.output
    out = runner.invoke(app, ["run", str(tmp_path / "missing"), "--dataset", "x", "--json"])
    failed = json.loads(out.stdout)
    assert failed["status"] == "failed" and failed["duration_s"] > 0  # the time it took


def test_bad_chunk_size_is_refused(home: Path) -> None:
    out = runner.invoke(app, ["run", ".", "--dataset", "x", "--chunk-size", "lots"])
    assert out.exit_code == 2


@pytest.mark.parametrize("grace", ["abc", "", "1w", "-1d"])
def test_gc_refuses_a_bad_grace_in_one_line(home: Path, grace: str) -> None:
    out = runner.invoke(app, ["gc", "--grace", grace])
    assert out.exit_code == 2
    assert f"invalid duration {grace!r}" in out.output and "Traceback" not in out.output


def test_gc_names_the_nodes_it_could_not_clean(home: Path, tmp_path: Path) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text(f"""catalog: "{home}/catalog"
nodes:
  - {{name: a1, cloud: aws, region: r, url: "{home}/nodes/a1"}}
  - {{name: z1, cloud: azure, region: r, url: "az://c/x",
      storage_options: {{connection_string: "not a connection string"}}}}
""")
    (home / "catalog" / "pending" / "d" / "batch=b").mkdir(parents=True)
    out = runner.invoke(app, ["gc", "--grace", "0", "--topology", str(topo)])
    assert out.exit_code == 1, out.output
    assert "not cleaned" in out.output and "z1" in out.output


def test_nodes_watch_shows_the_failure_detectors_states(home: Path, tmp_path: Path) -> None:
    from tests.helpers.sf_chaos import set_faults

    broken = tmp_path / "broken"
    set_faults(broken, down=True)  # every call refused, from the start
    topology = tmp_path / "t.yaml"
    topology.write_text(
        "nodes:\n"
        f'  - {{name: fine, cloud: aws, region: r, url: "{tmp_path / "fine"}"}}\n'
        f'  - {{name: broken, cloud: gcp, region: r, url: "faulty://{broken}"}}\n')
    out = runner.invoke(app, ["nodes", "--watch", "--duration", "3.5", "--topology",
                              str(topology)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[1].strip(): line for line in out.output.splitlines()
            if line.count("│") > 3}
    assert "healthy" in rows["fine"] and "down" in rows["broken"]
    assert "broken down: 2 probes in a row failed" in out.output or \
        "broken down: probe failed" in out.output


def test_encrypted_run_export_and_rekey_from_the_command_line(home: Path,
                                                               tmp_path: Path) -> None:
    new_key = runner.invoke(app, ["keys", "new", "ops-1"])
    assert new_key.exit_code == 0 and new_key.output.startswith("ops-1:")
    second = runner.invoke(app, ["keys", "new", "ops-2"]).output.strip()
    keys = tmp_path / "master.keys"
    keys.write_text(new_key.output)
    src = tmp_path / "src"
    write_ml_csv(src / "a.csv", 500, seed=4)
    out = runner.invoke(app, ["run", str(src), "--dataset", "sec", "--chunk-size", "10KB",
                              "--encrypt", "--keys", f"file:{keys}", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["status"] == "completed"

    refused = runner.invoke(app, ["export", "sec", "--to", str(tmp_path / "x.parquet")])
    assert refused.exit_code == 2
    assert "KeyUnavailableError" in refused.output and "ops-1" in refused.output
    assert "Traceback" not in refused.output and len(refused.output.splitlines()) <= 3
    assert not (tmp_path / "x.parquet").exists()

    keys.write_text(new_key.output + second + "\n")
    rekeyed = runner.invoke(app, ["rekey", "sec", "--to", "ops-2", "--keys", f"file:{keys}"])
    assert rekeyed.exit_code == 0, rekeyed.output
    assert "wrapped by ops-2" in rekeyed.output
    keys.write_text(second + "\n")  # the old key retired
    target = tmp_path / "back.parquet"
    done = runner.invoke(app, ["export", "sec", "--to", str(target), "--keys", f"file:{keys}"])
    assert done.exit_code == 0, done.output
    assert pq.read_table(target).num_rows == 500
    ranked = tmp_path / "rank0.parquet"
    read = runner.invoke(app, ["read", "sec", "--to", str(ranked), "--keys", f"file:{keys}",
                               "--cache-dir", str(tmp_path / "cache")])
    assert read.exit_code == 0, read.output
    assert sorted(pq.read_table(ranked).column("id").to_pylist()) == list(range(500))
    bad = runner.invoke(app, ["keys", "new", "no spaces allowed"])
    assert bad.exit_code == 2 and "KeyUnavailableError" in bad.output
