"""Unusual but ordinary inputs: each keeps skyferry's promises, or gets a typed error.

One test per item of the "trust at the edges" list, with the inputs that broke it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.pipeline import multicloud_pipeline, run_pipeline
from skyferry.config import PipelineConfig
from skyferry.distribute.probe import probe_nodes
from skyferry.errors import (
    FormatError,
    InsufficientNodesError,
    IntegrityError,
    ManifestError,
    StageError,
    TopologyError,
)
from skyferry.ops.export import DatasetReader, export_dataset
from skyferry.ops.gc import collect_garbage
from skyferry.run.batch import new_source_files, plan_batch
from skyferry.run.context import open_run
from skyferry.topology import load_topology
from tests.helpers.sf_data import write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def _cause(config: PipelineConfig) -> BaseException:
    with pytest.raises(StageError) as info:
        multicloud_pipeline(config)
    assert info.value.__cause__ is not None
    return info.value.__cause__


def _topology(path: Path, home: Path, urls: list[str], extra: str = "") -> Path:
    clouds = ["aws", "gcp", "azure", "aws", "gcp"]
    nodes = "\n".join(f'  - {{name: n{i}, cloud: {clouds[i]}, region: r, url: "{url}"}}'
                      for i, url in enumerate(urls))
    path.write_text(f'catalog: "{home}/catalog"\n{extra}nodes:\n{nodes}\n')
    return path


def test_nodes_that_share_one_place_are_a_topology_error(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    for urls in ([f"{home}/n", f"{home}/n", f"{home}/n"],
                 [f"{home}/n", f"file://{home}/./n/", f"{home}/m"]):
        topo = _topology(tmp_path / "topo.yaml", home, urls)
        cause = _cause(PipelineConfig(source=str(src), dataset="d", topology=str(topo)))
        assert isinstance(cause, TopologyError)
        assert "n0 and n1 store in the same place" in str(cause) and str(topo) in str(cause)
    assert not (home / "n").exists()


def test_more_replicas_than_nodes_is_refused(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    cause = _cause(PipelineConfig(source=str(src), dataset="d", replicas=10, quorum=2))
    assert isinstance(cause, InsufficientNodesError)
    assert "10 replicas" in str(cause) and "only 5 nodes" in str(cause)
    assert (cause.healthy, cause.required) == (5, 10)


def test_an_unknown_cloud_is_a_topology_error(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 100)
    topo = _topology(tmp_path / "topo.yaml", home, [f"{home}/a", f"{home}/b", f"{home}/c"],
                     extra="source_cloud: mars\n")
    cause = _cause(PipelineConfig(source=str(src), dataset="d", topology=str(topo)))
    assert isinstance(cause, TopologyError) and "unknown cloud 'mars'" in str(cause)
    cause = _cause(PipelineConfig(source=str(src), dataset="d", source_cloud="venus"))
    assert isinstance(cause, TopologyError) and "'venus'" in str(cause)


def test_rows_that_transforms_add_are_accounted(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    write_ml_csv(src, 1000, seed=5)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="d",
                                         transforms=["tests.helpers.sf_transforms:duplicate_rows"]))
    assert result.status == "completed", result.error
    assert (result.rows_in, result.rows_added, result.rows_dropped) == (1000, 1000, 0)
    assert (result.rows_stored, result.rows_rejected) == (2000, 0)
    assert DatasetReader("d").read_table().num_rows == 2000


def test_hidden_files_are_named_and_a_glob_takes_them(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "dir"
    write_ml_csv(src / "_part-0.csv", 10, seed=1)
    write_ml_csv(src / ".hidden.csv", 20, seed=2)
    write_ml_csv(src / "part-1.csv", 30, seed=3)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="folder"))
    assert result.status == "completed", result.error
    assert result.rows_stored == 30
    assert sorted(Path(u.split("://", 1)[-1]).name for u in result.skipped_files) == [
        ".hidden.csv", "_part-0.csv"]
    result = run_pipeline(PipelineConfig(source=f"{src}/*.csv", dataset="glob"))
    assert result.status == "completed", result.error
    assert result.rows_stored == 60 and result.skipped_files == []


def test_an_exact_path_with_glob_characters(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "data[1].csv"
    write_ml_csv(src, 25, seed=4)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="d"))
    assert result.status == "completed", result.error
    assert result.rows_stored == 25


def test_a_field_larger_than_pyarrow_blocks(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "big.csv"
    src.write_bytes(b'id,text,v\n1,"' + b"x" * 5_000_000 + b'",2\n2,"a\nb",3\n3,plain,4\n')
    for chunk_size in ("64MB", "100"):
        result = run_pipeline(PipelineConfig(source=str(src), dataset=f"big{chunk_size}",
                                             chunk_size=chunk_size))
        assert result.status == "completed", result.error
        assert (result.rows_stored, result.rows_rejected) == (3, 0)
        table = DatasetReader(f"big{chunk_size}").read_table().sort_by("id")
        assert [len(t) for t in table.column("text").to_pylist()] == [5_000_000, 3, 5]


def test_a_json_array_file_is_a_format_error(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "rows.json"
    src.write_text('[{"a": 1},\n {"a": 2}]\n')
    cause = _cause(PipelineConfig(source=str(src), dataset="d"))
    assert isinstance(cause, FormatError) and "rows.json" in str(cause)
    assert "JSON array" in str(cause)


def test_binary_export_keeps_files_that_share_a_name_apart(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "x.bin").write_bytes(bytes(range(250)) * 4)
    (src / "b" / "x.bin").write_bytes(b"\x07" * 500)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="d"))
    assert result.status == "completed", result.error
    out = tmp_path / "out"
    export_dataset("d", out)
    assert (out / "a" / "x.bin").read_bytes() == bytes(range(250)) * 4
    assert (out / "b" / "x.bin").read_bytes() == b"\x07" * 500
    assert sorted(p.name for p in out.rglob("*")) == ["a", "b", "x.bin", "x.bin"]


def test_a_binary_file_that_shrinks_exports_as_its_new_version(home: Path,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f.bin").write_bytes(b"\x01" * 2000)
    assert run_pipeline(PipelineConfig(source=str(src), dataset="d")).status == "completed"
    (src / "f.bin").write_bytes(b"\x02" * 500)
    assert run_pipeline(PipelineConfig(source=str(src), dataset="d")).status == "completed"
    export_dataset("d", tmp_path / "out")
    assert (tmp_path / "out" / "f.bin").read_bytes() == b"\x02" * 500


_NAMES = st.sampled_from(["a", "b", "x.bin", "_y", "z z", "é"])


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(st.lists(_NAMES, min_size=1, max_size=3).map(tuple),
                            st.binary(min_size=1, max_size=3000), min_size=1, max_size=6),
       chunk_size=st.integers(50, 5000))
def test_binary_export_reproduces_any_source_tree(home: Path, tmp_path: Path,
                                                  tree: dict[tuple[str, ...], bytes],
                                                  chunk_size: int) -> None:
    files = {}
    for parts, data in tree.items():
        rel = "/".join((*parts[:-1], "f-" + parts[-1]))  # no name both a folder and a file
        if not any(r.startswith(rel + "/") or rel.startswith(r + "/") for r in files):
            files[rel] = data
    run = uuid.uuid4().hex[:8]
    src, out = tmp_path / run / "src", tmp_path / run / "out"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    result = run_pipeline(PipelineConfig(source=f"{src}/**", dataset=f"t{run}",
                                         format="binary", chunk_size=chunk_size))
    assert result.status == "completed", result.error
    export_dataset(f"t{run}", out)
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files


def test_gc_never_touches_a_pending_batchs_temp_files(home: Path, tmp_path: Path) -> None:
    """A replica write in flight (its temp file) and the plan that claims it; grace 0."""
    src = tmp_path / "f.bin"
    src.write_bytes(b"z" * 1000)
    config = PipelineConfig(source=str(src), dataset="g", chunk_size=400)
    setup = open_run(config)
    probe_nodes(setup.topology, setup.health, setup.settings.probe_timeout_s)
    run = plan_batch(setup, new_source_files(setup).files)
    run.close()
    plan = run.plan
    key = plan.key(plan.chunks[0])
    node_dir = home / "nodes" / plan.chunks[0].nodes[0]
    temp = node_dir / Path(key).parent / f".tmp-{uuid.uuid4().hex}-{Path(key).name}"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"in flight")
    stray = node_dir / "g" / "stray.bin"
    stray.write_bytes(b"no one claims this")
    report = collect_garbage(load_topology(), grace_s=0)
    assert temp.exists() and not stray.exists()
    assert report.deleted == [f"{plan.chunks[0].nodes[0]}:g/stray.bin"]


def test_one_truncated_manifest_leaves_the_others_readable(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "s"
    write_ml_csv(src / "a.csv", 100, seed=1)
    assert run_pipeline(PipelineConfig(source=str(src), dataset="m")).status == "completed"
    write_ml_csv(src / "b.csv", 50, seed=2, start_id=1000)
    second = run_pipeline(PipelineConfig(source=str(src), dataset="m"))
    assert second.status == "completed"
    path = home / "catalog" / second.manifest_key  # type: ignore[operator]
    path.write_bytes(path.read_bytes()[:200])
    # a node's copy stands in for the catalog's
    assert export_dataset("m", tmp_path / "all.parquet").rows == 150
    copies = list(home.glob(f"nodes/*/{second.manifest_key}"))
    assert len(copies) >= 2
    for copy in copies:
        copy.write_bytes(copy.read_bytes()[:200])
    report = export_dataset("m", tmp_path / "m.parquet")
    assert report.rows == 100 and len(report.unreadable) == 1
    assert second.manifest_key in report.unreadable[0]
    with pytest.raises(ManifestError, match=str(second.manifest_key)):
        DatasetReader("m", batch_id=second.batch_id).manifests()
    gc = collect_garbage(load_topology(), grace_s=0)
    assert not gc.deleted and any(str(second.manifest_key) in e for e in gc.errors)


def test_a_failed_export_leaves_no_partial_file(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "s"
    write_ml_csv(src / "a.csv", 100, seed=1)
    assert run_pipeline(PipelineConfig(source=str(src), dataset="x")).status == "completed"
    for node in (home / "nodes").iterdir():  # every replica of every chunk goes bad
        for replica in node.rglob("*.parquet"):
            replica.write_bytes(replica.read_bytes()[:-1] + b"!")
    with pytest.raises(IntegrityError):
        export_dataset("x", tmp_path / "out" / "x.csv")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_node_that_cannot_be_set_up_is_down_not_fatal(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"q" * 500)
    topo = tmp_path / "topo.yaml"
    topo.write_text(f"""catalog: "{home}/catalog"
nodes:
  - {{name: a1, cloud: aws, region: r, url: "{home}/nodes/a1"}}
  - {{name: g1, cloud: gcp, region: r, url: "{home}/nodes/g1"}}
  - {{name: z1, cloud: azure, region: r, url: "az://c/x",
      storage_options: {{connection_string: "DefaultEndpointsProtocol=https;nonsense"}}}}
""")
    result = run_pipeline(PipelineConfig(source=str(src), dataset="d", topology=str(topo)))
    assert result.status == "completed", result.error
    assert result.down_nodes == ["z1"]
    assert "cannot set up node z1 (az://c/x)" in result.down_reasons["z1"]
    assert "nonsense" not in result.down_reasons["z1"]


def _ids(dataset: str) -> list[int]:
    return sorted(DatasetReader(dataset).read_table().column("id").to_pylist())


def test_a_file_that_only_grew_ingests_only_its_new_records(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "s"
    write_ml_csv(src / "a.csv", 10_000, seed=1)
    config = PipelineConfig(source=str(src), dataset="grow", chunk_size="100KB")
    assert run_pipeline(config).rows_stored == 10_000
    extra = tmp_path / "extra.csv"
    write_ml_csv(extra, 10, seed=2, start_id=10_000)
    with open(src / "a.csv", "ab") as fh:
        fh.write(extra.read_bytes().split(b"\n", 1)[1])  # the rows, not the header
    second = run_pipeline(config)
    assert second.status == "completed", second.error
    assert (second.rows_in, second.rows_stored) == (10, 10)
    assert _ids("grow") == list(range(10_010))


def test_a_changed_file_supersedes_its_earlier_version(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "s"
    write_ml_csv(src / "a.csv", 300, seed=1)
    write_ml_csv(src / "b.csv", 200, seed=2, start_id=1000)
    config = PipelineConfig(source=str(src), dataset="chg")  # both files share one chunk
    assert run_pipeline(config).rows_stored == 500
    write_ml_csv(src / "b.csv", 50, seed=3, start_id=5000)  # rewritten: fewer, other rows
    second = run_pipeline(config)
    assert (second.status, second.rows_in) == ("completed", 50)
    assert _ids("chg") == list(range(300)) + list(range(5000, 5050))
    (src / "b.csv").unlink()  # a deleted source keeps its last committed version
    assert run_pipeline(config).status == "up_to_date"
    assert _ids("chg") == list(range(300)) + list(range(5000, 5050))


def test_a_binary_file_that_grew_exports_whole(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    first = bytes(range(256)) * 8
    (src / "f.bin").write_bytes(first)
    config = PipelineConfig(source=str(src), dataset="bg", chunk_size=700)
    assert run_pipeline(config).status == "completed"
    (src / "f.bin").write_bytes(first + b"\xee" * 900)
    second = run_pipeline(config)
    assert second.status == "completed" and second.bytes_in == 900
    export_dataset("bg", tmp_path / "out")
    assert (tmp_path / "out" / "f.bin").read_bytes() == first + b"\xee" * 900


def test_a_csv_with_invalid_utf8_rejects_the_row_and_exports(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "u.csv"
    src.write_bytes(b"id,name\n1,ok\n2,caf\xe9\n3,fine\n")
    result = run_pipeline(PipelineConfig(source=str(src), dataset="u"))
    assert (result.status, result.rows_stored, result.rows_rejected) == ("completed", 2, 1)
    export_dataset("u", tmp_path / "u-out.csv")
    assert (tmp_path / "u-out.csv").read_text().splitlines() == ['"id","name"', '1,"ok"',
                                                                 '3,"fine"']


def _odd_folder(src: Path, tmp_path: Path) -> dict[str, str]:
    """A folder of two good CSVs beside each kind of file that cannot be taken; the odd
    files' names, each with the words its reason must hold."""
    import os

    write_ml_csv(src / "a.csv", 30, seed=1)
    write_ml_csv(tmp_path / "elsewhere" / "x.csv", 5, seed=2)
    write_ml_csv(src / "real" / "b.csv", 20, seed=3, start_id=30)
    (src / "empty.csv").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", src / "linked")  # a directory symlink
    os.symlink(tmp_path / "nowhere.csv", src / "dangling.csv")
    os.symlink(".", src / "real" / "loop")  # a loop, were it followed
    bad = os.fsencode(str(src)) + b"/bad\xffname.csv"
    with open(bad, "wb") as fh:
        fh.write(b"id,f0,f1,category,label\n1,0.1,0.2,cat,0\n")
    return {"empty.csv": "empty (0 bytes)", "linked": "symlink to a directory",
            "dangling.csv": "dangling symlink", "loop": "symlink to a directory",
            "bad\\xffname.csv": "not UTF-8"}


def test_odd_files_are_passed_over_and_named_or_fail_a_strict_run(
        home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = _odd_folder(src, tmp_path)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="odd"))
    assert result.status == "completed", result.error
    assert result.rows_stored == 50  # a.csv and real/b.csv, nothing of the odd files
    named = {url.rsplit("/", 1)[-1]: why for url, why in result.odd_files.items()}
    assert set(named) == set(expected)
    for name, words in expected.items():
        assert words in named[name], (name, named[name])
    assert DatasetReader("odd").read_table().num_rows == 50

    cause = _cause(PipelineConfig(source=str(src), dataset="odd-strict", strict=True))
    assert "cannot be taken, and the run is strict" in str(cause)
    assert "empty.csv" in str(cause) and "dangling.csv" in str(cause)
    assert open_catalog_manifests("odd-strict") == []


def test_a_binary_run_passes_over_a_zero_byte_file(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "bin"
    src.mkdir()
    (src / "a.bin").write_bytes(b"\x01" * 100)
    (src / "zero.bin").write_bytes(b"")
    result = run_pipeline(PipelineConfig(source=str(src), dataset="zb", format="binary"))
    assert result.status == "completed", result.error
    assert [u.rsplit("/", 1)[-1] for u in result.odd_files] == ["zero.bin"]
    assert result.bytes_in == 100


def test_a_batch_id_reused_for_another_listing_is_a_typed_error(home: Path,
                                                                tmp_path: Path) -> None:
    from skyferry.errors import BatchIdReusedError

    write_ml_csv(tmp_path / "one" / "a.csv", 10, seed=1)
    write_ml_csv(tmp_path / "two" / "b.csv", 10, seed=2)
    config = PipelineConfig(source=str(tmp_path / "one"), dataset="r", batch_id="b1")
    assert run_pipeline(config).status == "completed"
    assert run_pipeline(config).status == "already_committed"  # the same listing: a re-run
    cause = _cause(config.model_copy(update={"source": str(tmp_path / "two")}))
    assert isinstance(cause, BatchIdReusedError) and cause.batch_id == "b1"
    assert "b1" in str(cause) and "a.csv" in str(cause)
    write_ml_csv(tmp_path / "one" / "c.csv", 10, seed=3, start_id=10)
    cause = _cause(config)
    assert isinstance(cause, BatchIdReusedError) and "c.csv" in str(cause)
    assert [m.batch_id for m in open_catalog_manifests("r")] == ["b1"]


def open_catalog_manifests(dataset: str) -> list[object]:
    from skyferry.commit.manifest import open_catalog

    return list(open_catalog(load_topology()).manifests(dataset))
