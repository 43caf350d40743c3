"""The production job templates are valid for their worker types (ECS, Cloud Run, ACI).

Each template is turned into its worker's job configuration, with the values an operator
would give, exactly as the worker does before it starts a flow run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "deployments" / "job-templates"

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _fake_service_account(path: Path) -> Path:
    """A syntactically real service-account key (fresh RSA key), so ADC can load it offline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "skyferry-test", "private_key_id": "k1",
        "private_key": pem, "client_email": "sf@skyferry-test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    return path


def _configure(worker: Any, template: str, values: dict[str, Any]) -> Any:
    base = json.loads((TEMPLATES / template).read_text())
    return asyncio.run(worker.job_configuration.from_template_and_values(base, values))


def test_ecs_template() -> None:
    from prefect_aws.workers.ecs_worker import ECSWorker

    config = _configure(ECSWorker, "aws-ecs.json", {"cluster": "skyferry"})
    container = config.task_definition["containerDefinitions"][0]
    assert container["image"] == "skyferry:0.1.0" and container["name"] == "skyferry"
    assert (config.task_definition["cpu"], config.task_definition["memory"]) == (2048, 8192)
    assert config.env["PREFECT_LOGGING_CONFIG_PATH"].endswith("deployments/logging.yml")


def test_cloud_run_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_gcp.workers.cloud_run_v2 import CloudRunWorkerV2

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       str(_fake_service_account(tmp_path / "sa.json")))
    config = _configure(CloudRunWorkerV2, "gcp-cloud-run.json", {})
    container = config.job_body["template"]["template"]["containers"][0]
    assert container["image"] == "skyferry:0.1.0"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert config.region == "us-east1"


def test_aci_template() -> None:
    from prefect_azure.workers.container_instance import AzureContainerWorker

    config = _configure(AzureContainerWorker, "azure-aci.json",
                        {"resource_group_name": "skyferry", "subscription_id": "sub-1"})
    assert config.image == "skyferry:0.1.0" and config.stream_output is True
    container = config.arm_template["resources"][0]["properties"]["containers"][0]
    assert container["properties"]["resources"]["requests"] == {"cpu": 2.0, "memoryInGB": 8.0}


def test_the_setup_script_uses_these_templates_for_cloud_pools() -> None:
    sys.path.insert(0, str(ROOT / "deployments"))
    import setup_local

    for cloud, (kind, _) in setup_local.CLOUD_POOLS.items():
        request = setup_local.pool_request(cloud, f"{cloud}-pool", cloud_pools=True)
        assert request.type == kind
        assert request.base_job_template["variables"]["properties"]["image"]["default"] == (
            "skyferry:0.1.0")
        assert setup_local.pool_request(cloud, "p", cloud_pools=False).type == "process"
