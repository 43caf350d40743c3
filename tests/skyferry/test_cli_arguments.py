"""Every user error of the command line exits 2 with one line naming the thing, before any
work starts (and before Prefect starts, for `skyferry run`); `--json` always prints JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skyferry.cli import app
from tests.helpers.sf_data import commit_without_prefect, write_ml_csv

runner = CliRunner()


@pytest.fixture
def committed(home: Path, tmp_path: Path) -> str:
    write_ml_csv(tmp_path / "src" / "a.csv", 200, seed=3)
    commit_without_prefect(tmp_path / "src", "d", chunk_size="8KB")
    return "d"


def _one_line_error(out: object, *words: str) -> None:
    assert out.exit_code == 2, out.output  # type: ignore[attr-defined]
    text = out.output  # type: ignore[attr-defined]
    assert "Traceback" not in text
    for word in words:
        assert word in text, text


@pytest.mark.parametrize("option", [["--epoch", "-1"], ["--seed", "-3"], ["--rank", "-1"],
                                    ["--world-size", "0"], ["--batch-size", "0"]])
def test_read_refuses_a_negative_number(committed: str, tmp_path: Path,
                                        option: list[str]) -> None:
    out = runner.invoke(app, ["read", committed, "--to", str(tmp_path / "o.parquet"), *option])
    _one_line_error(out, option[0])
    assert not (tmp_path / "o.parquet").exists()


def test_read_refuses_a_directory_or_a_path_under_a_file(committed: str,
                                                          tmp_path: Path) -> None:
    out = runner.invoke(app, ["read", committed, "--to", str(tmp_path)])
    _one_line_error(out, "is a directory")
    (tmp_path / "file").write_text("x")
    out = runner.invoke(app, ["read", committed, "--to", str(tmp_path / "file" / "o.parquet")])
    _one_line_error(out, "which is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_export_refuses_an_unknown_file_type(committed: str, tmp_path: Path) -> None:
    out = runner.invoke(app, ["export", committed, "--to", str(tmp_path / "x.txt")])
    _one_line_error(out, "ConfigError", "x.txt")
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("command", ["verify", "repair"])
def test_an_unknown_lost_node_is_refused_and_json_is_still_json(committed: str,
                                                                 command: str) -> None:
    out = runner.invoke(app, [command, committed, "--lost", "no-such-node"])
    _one_line_error(out, "no-such-node", "aws-node-1")
    out = runner.invoke(app, [command, committed, "--lost", "no-such-node", "--json"])
    assert out.exit_code == 2
    document = json.loads(out.stdout)
    assert document["error_type"] == "TopologyError" and "no-such-node" in document["error"]


@pytest.mark.parametrize("share", ["nan", "-1", "1.5"])
def test_repair_refuses_a_share_that_is_not_one(committed: str, home: Path,
                                                share: str) -> None:
    before = sorted(p for p in (home / "nodes").rglob("*") if p.is_file())
    out = runner.invoke(app, ["repair", committed, "--max-node-share", share])
    _one_line_error(out, "max_node_share")
    assert sorted(p for p in (home / "nodes").rglob("*") if p.is_file()) == before


def test_run_checks_its_files_and_names_before_prefect_starts(home: Path,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    write_ml_csv(src, 10, seed=1)
    cases = [
        (["--schema", str(tmp_path / "missing.yaml")], ["SchemaError", "missing.yaml"]),
        (["--topology", str(tmp_path / "missing-topo.yaml")], ["missing-topo.yaml"]),
        (["--transform", "no_such_module:f"], ["TransformError", "no_such_module"]),
    ]
    for options, words in cases:
        out = runner.invoke(app, ["run", str(src), "--dataset", "d", *options])
        _one_line_error(out, *words)
        assert "stage" not in out.output  # not a flow's failure: the flow never started
    out = runner.invoke(app, ["run", str(src), "--dataset", "manifests"])
    _one_line_error(out, "reserved")
    assert not (home / "catalog" / "manifests").exists()
