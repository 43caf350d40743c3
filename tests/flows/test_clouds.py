"""Real clouds' APIs: S3 (moto), GCS (gcp-storage-emulator) and Azure Blob (Azurite) servers.

Replicas are checked with each cloud's own SDK, not with fsspec.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from flows.pipeline import run_pipeline
from skyferry.commit.manifest import Catalog, Manifest
from skyferry.config import PipelineConfig
from skyferry.ops.export import DatasetReader, export_dataset
from skyferry.topology import load_topology
from tests.helpers import sf_servers
from tests.helpers.sf_data import verified_chunks, write_ml_csv

pytestmark = [pytest.mark.integration, pytest.mark.clouds,
              pytest.mark.usefixtures("prefect_harness")]

NODES = {"aws-node-1": ("s3", "aws", "us-east-1"), "aws-node-2": ("s3", "aws", "us-west-2"),
         "gcp-node-1": ("gs", "gcp", "us-east1"), "gcp-node-2": ("gs", "gcp", "europe-west1"),
         "azure-node-1": ("az", "azure", "eastus")}
BLOCK = "aws-credentials/skyferry-moto"


@pytest.fixture
def topology(clouds: sf_servers.CloudEnv, home: Path, tmp_path: Path) -> Iterator[Path]:
    """Five nodes over the three servers. Azure is the cheapest cloud from aws here, so the
    third replica of each chunk goes there. aws-node-1 takes its keys from a saved
    prefect-aws AwsCredentials block."""
    _save_aws_block(clouds)
    lines = [f'catalog: "{home}/catalog"', "nodes:"]
    for name, (protocol, cloud, region) in NODES.items():
        clouds.make_bucket(protocol, name)
        if name == "aws-node-1":
            extra = f"credentials: {BLOCK}"
        else:
            extra = f"storage_options: {_flow_map(clouds.options(protocol))}"
        lines.append(f"  - {{name: {name}, cloud: {cloud}, region: {region}, "
                     f"url: \"{protocol}://{name}/data\", timeout_s: 4, {extra}}}")
    lines += ["links:",
              "  - {from: aws, to: azure, latency_ms: 30, egress_usd_per_gb: 0.05}",
              "  - {from: aws, to: gcp, latency_ms: 35, egress_usd_per_gb: 0.09}"]
    path = tmp_path / "clouds.yaml"
    path.write_text("\n".join(lines) + "\n")
    yield path


def _save_aws_block(clouds: sf_servers.CloudEnv) -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    AwsCredentials(aws_access_key_id=sf_servers.S3_KEY,
                   aws_secret_access_key=sf_servers.S3_SECRET,
                   aws_client_parameters=AwsClientParameters(endpoint_url=clouds.s3.endpoint),
                   ).save(BLOCK.split("/")[1], overwrite=True)


def _flow_map(options: dict[str, object]) -> str:
    return "{" + ", ".join(f'{k}: "{v}"' for k, v in options.items()) + "}"


def _source(clouds: sf_servers.CloudEnv, tmp_path: Path, rows: int) -> str:
    import boto3

    local = tmp_path / "train.csv"
    write_ml_csv(local, rows, seed=21)
    s3 = boto3.client("s3", endpoint_url=clouds.s3.endpoint, aws_access_key_id=sf_servers.S3_KEY,
                      aws_secret_access_key=sf_servers.S3_SECRET, region_name="us-east-1")
    s3.create_bucket(Bucket="raw")
    s3.upload_file(str(local), "raw", "train/train.csv")
    return "s3://raw/train/*.csv"


def _sdk_get(clouds: sf_servers.CloudEnv, node: str, key: str) -> bytes | None:
    """Read a replica with the cloud's own SDK (boto3, google-cloud-storage, azure-storage-blob)."""
    protocol = NODES[node][0]
    path = f"data/{key}"
    try:
        if protocol == "s3":
            import boto3

            s3 = boto3.client("s3", endpoint_url=clouds.s3.endpoint, region_name="us-east-1",
                              aws_access_key_id=sf_servers.S3_KEY,
                              aws_secret_access_key=sf_servers.S3_SECRET)
            return bytes(s3.get_object(Bucket=node, Key=path)["Body"].read())
        if protocol == "gs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            client = storage.Client(credentials=AnonymousCredentials(), project="test",
                                    client_options={"api_endpoint": clouds.gs.endpoint})
            return bytes(client.bucket(node).blob(path).download_as_bytes())
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(clouds.az_connection_string)
        return bytes(service.get_blob_client(node, path).download_blob().readall())
    except Exception as exc:  # missing on this node
        logging.getLogger(__name__).info("replica %s on %s unreadable: %s", key, node, exc)
        return None


def _manifest(dataset: str) -> Manifest:
    return Catalog(load_topology().catalog_store()).manifest(dataset)


def _config(source: str, topology: Path, dataset: str, **extra: Any) -> PipelineConfig:
    return PipelineConfig(source=source, dataset=dataset, topology=str(topology),
                          chunk_size="30KB", source_options=_s3_source_options(), **extra)


def _s3_source_options() -> dict[str, object]:
    return {"key": sf_servers.S3_KEY, "secret": sf_servers.S3_SECRET,
            "endpoint_url": os.environ["SF_S3_ENDPOINT"], "skip_instance_cache": True}


@pytest.fixture(autouse=True)
def _s3_endpoint(clouds: sf_servers.CloudEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SF_S3_ENDPOINT", clouds.s3.endpoint)


def test_cross_cloud_run_checked_with_each_clouds_sdk(
        clouds: sf_servers.CloudEnv, topology: Path, home: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    source = _source(clouds, tmp_path, 4000)
    result = run_pipeline(_config(source, topology, "xc"))
    assert result.status == "completed", result.error
    manifest = _manifest("xc")
    assert len(manifest.chunks) >= 5
    clouds_used = set()
    for chunk in manifest.chunks:
        good = []
        for replica in chunk.verified:
            data = _sdk_get(clouds, replica.node, chunk.key)
            assert data is not None, f"{chunk.key} missing on {replica.node}"
            assert str(blake3.blake3(data).hexdigest()) == chunk.digest
            good.append(replica)
        assert len(good) >= manifest.write_quorum
        assert len({r.cloud for r in good}) >= 2
        clouds_used |= {r.cloud for r in good}
    assert clouds_used == {"aws", "azure"}
    assert result.stages["distribution"].cross_cloud_transfers == len(manifest.chunks)

    import pandas as pd

    out = tmp_path / "back.csv"
    export_dataset("xc", out, topology=load_topology(str(topology)))
    exported = pd.read_csv(out).sort_values("id").reset_index(drop=True)
    original = pd.read_csv(tmp_path / "train.csv").sort_values("id").reset_index(drop=True)
    assert len(original) == 4000
    pd.testing.assert_frame_equal(exported, original)

    # the S3 secret is nowhere: not in logs, output, the manifest, the catalog or artifacts
    secret = sf_servers.S3_SECRET
    out_err = capfd.readouterr()
    assert secret not in caplog.text and secret not in out_err.out + out_err.err
    for path in (home / "catalog").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in _artifacts_text()
    assert secret not in repr(result) and secret not in result.model_dump_json()


def _artifacts_text() -> str:
    """Every artifact in the Prefect API, as text, read through the REST API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter",
                          json={"limit": 200, "sort": "CREATED_DESC"}, timeout=30)
    response.raise_for_status()
    artifacts = response.json()
    assert artifacts, "the run made no artifacts to check"
    return "\n".join(str(a.get("data")) + str(a.get("description")) for a in artifacts)


def test_encrypted_run_leaves_no_plaintext_on_any_cloud(
        clouds: sf_servers.CloudEnv, topology: Path, home: Path, tmp_path: Path) -> None:
    from skyferry.crypto import MAGIC, new_master_key

    keys = tmp_path / "master.keys"
    keys.write_text(new_master_key("platform-1") + "\n")
    source = _source(clouds, tmp_path, 3000)
    result = run_pipeline(_config(source, topology, "xenc", encrypt=True, replicas=5,
                                  quorum=5, master_keys=f"file:{keys}"))  # on every node
    assert result.status == "completed", result.error
    manifest = _manifest("xenc")
    topo = load_topology(str(topology))
    known = [b"category", b"bird", b"label"]  # in every plain Parquet chunk of this source
    seen = 0
    for chunk in manifest.chunks:
        assert chunk.sealed is not None
        for record in chunk.verified:  # each cloud's own SDK reads what the node holds
            blob = _sdk_get(clouds, record.node, chunk.key)
            assert blob is not None and blob[:8] == MAGIC, (record.node, chunk.key)
            assert blake3.blake3(blob).hexdigest() == chunk.digest
            assert not [v for v in known if v in blob]
            seen += 1
    assert seen == 5 * len(manifest.chunks)
    listed = 0
    for node in topo.nodes:  # every object of every node: no data, no source name in the clear
        store = node.open_store()
        for info in store.list(""):
            body = store.get(info.key)
            listed += 1
            assert b"train.csv" not in body and b"raw/train" not in body, info.key
            if info.key.endswith(".parquet"):
                assert body[:8] == MAGIC and not [v for v in known if v in body], info.key
    assert listed > seen  # the data, and the manifest's and the snapshot log's copies
    held = [q for folder in ("manifests", "snapshots")
            for q in (home / "catalog" / folder).rglob("*") if q.is_file()]
    assert held and not [q for q in held if b"train.csv" in q.read_bytes()]

    out = tmp_path / "back.parquet"
    export_dataset("xenc", out, topology=topo, keys=f"file:{keys}")
    import pandas as pd
    import pyarrow.parquet as pq

    local = pd.read_csv(tmp_path / "train.csv")
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(local["id"])


def test_azure_killed_mid_run(clouds: sf_servers.CloudEnv, topology: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import sf_faults

    sf_faults.reset()
    assert clouds.az.proc is not None
    monkeypatch.setenv("SF_SIGNAL_PID", str(clouds.az.proc.pid))
    monkeypatch.setenv("SF_SIGNAL", "SIGKILL")
    source = _source(clouds, tmp_path, 6000)
    result = run_pipeline(_config(source, topology, "killed",
                                  transforms=["tests.helpers.sf_faults:signal_server_on_second_chunk"]))
    assert result.status == "completed", result.error
    assert "azure-node-1" in result.down_nodes
    assert result.node_failures_handled >= 1
    manifest = _manifest("killed")
    hinted = [c for c in manifest.chunks if any(r.state == "hinted" for r in c.replicas)]
    assert any(r.node == "azure-node-1" for c in hinted for r in c.replicas
               if r.state == "hinted"), "replicas meant for the dead node must be hints"
    for chunk in manifest.chunks:
        ok = [r for r in chunk.verified if r.node != "azure-node-1"
              and str(blake3.blake3(_sdk_get(clouds, r.node, chunk.key) or b"").hexdigest())
              == chunk.digest]
        assert len(ok) >= 2
    for chunk in hinted:
        # a hint is a replica still owed to its node: the killed one, or (on a loaded
        # machine) one whose write failed while the run was re-routing
        nodes = {r.node for r in chunk.replicas if r.state == "hinted"}
        assert nodes and not nodes & {r.node for r in chunk.verified}, chunk.replicas
        assert "azure-node-1" not in {r.node for r in chunk.verified}
        assert len({r.cloud for r in chunk.verified}) >= 2


def test_a_hung_server_is_routed_around(clouds: sf_servers.CloudEnv, topology: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import sf_faults

    sf_faults.reset()
    assert clouds.az.proc is not None
    monkeypatch.setenv("SF_SIGNAL_PID", str(clouds.az.proc.pid))
    monkeypatch.setenv("SF_SIGNAL", "SIGSTOP")
    source = _source(clouds, tmp_path, 4000)
    try:
        result = run_pipeline(_config(source, topology, "hung",
                                      transforms=["tests.helpers.sf_faults:signal_server_on_second_chunk"]))
    finally:
        clouds.az.signal(signal.SIGCONT)
    assert result.status == "completed", result.error
    assert "azure-node-1" in result.down_nodes
    manifest = _manifest("hung")
    for chunk in manifest.chunks:
        assert len([r for r in chunk.verified if r.node != "azure-node-1"]) >= 2
    reason = result.down_reasons["azure-node-1"]
    # detected within 5 s: by the failure detector's probes, a write's deadline, or the
    # probe of a share that started later
    match = re.search(r"(?:within|probe timed out after|no answer to probes for) ([0-9.]+)s",
                      reason)
    assert match and float(match.group(1)) <= 5.0, reason


def test_export_fails_over_from_a_replica_corrupted_on_the_server(
        clouds: sf_servers.CloudEnv, topology: Path, tmp_path: Path) -> None:
    source = _source(clouds, tmp_path, 1500)
    assert run_pipeline(_config(source, topology, "rot")).status == "completed"
    manifest = _manifest("rot")
    topo = load_topology(str(topology))
    clean = DatasetReader("rot", topology=topo).read_table()
    chunk = manifest.chunks[0]
    first = chunk.verified[0].node
    import boto3

    assert NODES[first][0] == "s3"
    boto3.client("s3", endpoint_url=clouds.s3.endpoint, region_name="us-east-1",
                 aws_access_key_id=sf_servers.S3_KEY,
                 aws_secret_access_key=sf_servers.S3_SECRET).put_object(
        Bucket=first, Key=f"data/{chunk.key}", Body=b"corrupted on the server")
    reader = DatasetReader("rot", topology=topo)
    assert reader.read_table().equals(clean)
    assert reader.report.failovers and first in reader.report.failovers[0]


def _two_node_topology(home: Path, tmp_path: Path, good: str, bad: str) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(f'catalog: "{home}/catalog"\nnodes:\n{good}\n{bad}\n')
    return path


@pytest.mark.parametrize("case", ["wrong-credentials", "missing-bucket", "unreachable",
                                  "refused-write"])
def test_bad_node_configuration_is_a_typed_error_naming_the_node(
        case: str, clouds: sf_servers.CloudEnv, home: Path, tmp_path: Path) -> None:
    clouds.make_bucket("s3", "good")
    good = (f'  - {{name: good, cloud: aws, region: r, url: "s3://good/x", '
            f'storage_options: {_flow_map(clouds.options("s3"))}}}')
    if case == "wrong-credentials":
        clouds.make_bucket("az", "bad")
        conn = clouds.az_connection_string.replace("AccountKey=Eby8", "AccountKey=AAAA")
        bad = f'  - {{name: bad, cloud: azure, region: r, url: "az://bad/x", storage_options: {{connection_string: "{conn}"}}}}'  # noqa: E501
        expect = "AccessDeniedError"
    elif case == "missing-bucket":
        bad = (f'  - {{name: bad, cloud: gcp, region: r, url: "gs://no-such-bucket/x", '
               f'storage_options: {_flow_map(clouds.options("gs"))}}}')
        expect = "ObjectNotFoundError"
    elif case == "unreachable":
        port = sf_servers.free_port()
        bad = (f'  - {{name: bad, cloud: gcp, region: r, url: "s3://good/x", timeout_s: 2, '
               f'storage_options: {{key: k, secret: s, endpoint_url: "http://127.0.0.1:{port}"}}}}')
        expect = "NodeUnavailableError"
    else:
        clouds.make_bucket("az", "readonly")
        conn = clouds.read_only_connection_string("readonly")
        bad = f'  - {{name: bad, cloud: azure, region: r, url: "az://readonly/x", storage_options: {{connection_string: "{conn}"}}}}'  # noqa: E501
        expect = "AccessDeniedError"
    topo = _two_node_topology(home, tmp_path, good, bad)
    src = tmp_path / "a.bin"
    src.write_bytes(b"payload" * 100)
    result = run_pipeline(PipelineConfig(source=str(src), dataset="bad", topology=str(topo),
                                         replicas=2, quorum=2))
    assert result.status == "failed" and result.error_stage == "distribution"
    assert "bad (" in (result.error or ""), result.error
    assert expect in (result.error or ""), result.error
    assert "AccountKey" not in (result.error or "") and "sig=" not in (result.error or "")
    assert not (home / "catalog" / "manifests").exists()


def test_an_azure_credentials_block_drives_a_node(clouds: sf_servers.CloudEnv, home: Path,
                                                   tmp_path: Path) -> None:
    from prefect_azure import AzureBlobStorageCredentials

    AzureBlobStorageCredentials(connection_string=clouds.az_connection_string).save(
        "skyferry-azurite", overwrite=True)
    clouds.make_bucket("az", "blocks-az")
    clouds.make_bucket("s3", "blocks-s3")
    topo = tmp_path / "blocks.yaml"
    topo.write_text(
        f'catalog: "{home}/catalog"\nnodes:\n'
        '  - {name: az-blk, cloud: azure, region: r, url: "az://blocks-az/x", '
        'credentials: azure-blob-storage-credentials/skyferry-azurite}\n'
        '  - {name: s3-blk, cloud: aws, region: r, url: "s3://blocks-s3/x", '
        f'credentials: {BLOCK}}}\n')
    _save_aws_block(clouds)
    src = tmp_path / "b.bin"
    src.write_bytes(os.urandom(50_000))
    result = run_pipeline(PipelineConfig(source=str(src), dataset="blk", topology=str(topo),
                                         replicas=2, quorum=2, chunk_size=20_000))
    assert result.status == "completed", result.error
    assert result.stages["storage"].by_node == {"az-blk": 3, "s3-blk": 3}
    manifest = _manifest("blk")
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(clouds.az_connection_string)
    for chunk in manifest.chunks:
        data = service.get_blob_client("blocks-az", f"x/{chunk.key}").download_blob().readall()
        assert str(blake3.blake3(data).hexdigest()) == chunk.digest
    assert "AccountKey" not in manifest.to_json().decode()


def test_a_gcp_credentials_block_maps_to_gcsfs_options(prefect_harness: None) -> None:
    """No network here, so the service account is only mapped, not used to sign in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from prefect_gcp import GcpCredentials

    from blocks.credentials import options_from_block

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "p1", "private_key_id": "k1",
            "private_key": pem, "client_email": "sa@p1.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}
    GcpCredentials(service_account_info=info, project="p1").save("skyferry-gcs",
                                                                 overwrite=True)
    options = options_from_block("gcp-credentials/skyferry-gcs", node="g")
    assert options["project"] == "p1"
    assert options["token"]["client_email"] == "sa@p1.iam.gserviceaccount.com"
    assert options["token"]["private_key"] == pem


@pytest.mark.parametrize("protocol", ["s3", "gs", "az"])
def test_a_streamed_replica_reads_back_identical_and_a_corrupted_one_is_refused(
        clouds: sf_servers.CloudEnv, home: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    """An 11 MB chunk goes to the server as a multipart (S3), resumable (GCS) or block
    (Azure) upload of two parts. Read from that replica alone, it is the source's bytes.
    Then a replica whose object is changed on the server right after its upload completes
    is refused by the write's verification (S3's ETag, GCS's MD5 or a read-back), and the
    chunk keeps its other replicas and a hint."""
    import fsspec

    from skyferry.storage import PART_SIZE, ObjectWriter

    bucket = f"streamed-{protocol}"
    clouds.make_bucket(protocol, bucket)
    cloud = {"s3": "aws", "gs": "gcp", "az": "azure"}[protocol]
    others = [c for c in ("aws", "gcp", "azure") if c != cloud]
    server = (f'  - {{name: x, cloud: {cloud}, region: r, url: "{protocol}://{bucket}/data", '
              f'timeout_s: 60, storage_options: {_flow_map(clouds.options(protocol))}}}')
    lines = [f'catalog: "{home}/catalog"', "nodes:", server]
    lines += [f'  - {{name: l-{c}, cloud: {c}, region: r, url: "{home}/nodes/l-{c}"}}'
              for c in others]
    topology = tmp_path / "three.yaml"
    topology.write_text("\n".join(lines) + "\n")
    alone = tmp_path / "alone.yaml"
    alone.write_text("\n".join(lines[:3]) + "\n")
    data = os.urandom(PART_SIZE + 3_000_000)  # two parts
    source = tmp_path / "blob.bin"
    source.write_bytes(data)

    def run(dataset: str) -> Any:
        return run_pipeline(PipelineConfig(
            source=str(source), dataset=dataset, format="binary", topology=str(topology),
            chunk_size=len(data), replicas=3, quorum=2, source_cloud=others[0]))

    result = run("streamed")
    assert result.status == "completed", result.error
    (chunk,) = _manifest("streamed").chunks
    assert "x" in {r.node for r in chunk.verified}
    read = b"".join(verified_chunks(DatasetReader("streamed",
                                                  topology=load_topology(str(alone)))))
    assert read == data

    server_fs = fsspec.filesystem(protocol, **clouds.options(protocol), skip_instance_cache=True)
    real_commit = ObjectWriter.commit

    def commit_then_corrupt(out: ObjectWriter) -> None:
        real_commit(out)
        if out.store.name == "x":  # the same size, one byte changed, after the upload
            kept = server_fs.cat_file(out.path)
            server_fs.pipe_file(out.path, bytes([kept[0] ^ 0xFF]) + kept[1:])

    monkeypatch.setattr(ObjectWriter, "commit", commit_then_corrupt)
    result = run("corrupted")
    assert result.status == "completed", result.error
    assert "x" in result.down_reasons and "does not match" in result.down_reasons["x"]
    (chunk,) = _manifest("corrupted").chunks
    assert {r.node for r in chunk.verified} == {f"l-{c}" for c in others}
    assert [r.node for r in chunk.replicas if r.state == "hinted"] == ["x"]
    for node in (f"l-{c}" for c in others):
        assert (home / "nodes" / node / chunk.key).read_bytes() == data


