"""Create skyferry's work pools and register its blocks on a Prefect server.

    python deployments/setup_local.py [--topology FILE] [--cloud-pools]

- One work pool per cloud of the topology (the nodes' ``work_pool``, else ``<cloud>-pool``).
  Locally they are ``process`` pools. With ``--cloud-pools`` they are ECS, Cloud Run and ACI
  pools made from ``deployments/job-templates/`` instead (a production server).
- The block types skyferry uses (``StorageNode`` and the integrations' credentials blocks), and
  one ``StorageNode`` block per node of the topology, named after the node.
- With ``--alert-url URL`` (or ``SKYFERRY_ALERT_URL``): a webhook notification block
  ``skyferry-alerts`` that posts ``{"text": subject and body}`` to URL (a Slack incoming
  webhook takes it as it is), and the automations of ``deployments/alerts.yaml`` that send
  through it (those of the same names are replaced).

It is idempotent: existing pools are left as they are, and blocks are overwritten.
Point it at a server with ``PREFECT_API_URL``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.exceptions import ObjectAlreadyExists  # noqa: E402

from blocks.storage_node import StorageNode  # noqa: E402
from skyferry.topology import load_topology  # noqa: E402

logger = logging.getLogger("skyferry.setup")

TEMPLATES = ROOT / "deployments" / "job-templates"
CLOUD_POOLS = {  # cloud -> (worker type, job template)
    "aws": ("ecs", "aws-ecs.json"),
    "gcp": ("cloud-run-v2", "gcp-cloud-run.json"),
    "azure": ("azure-container-instance", "azure-aci.json"),
}


def pool_request(cloud: str, name: str, cloud_pools: bool) -> WorkPoolCreate:
    """The work pool of ``cloud``: a process pool, or its cloud type with our job template."""
    if not cloud_pools:
        return WorkPoolCreate(name=name, type="process",
                              description=f"skyferry compute near {cloud} (local stand-in)")
    kind, template = CLOUD_POOLS[cloud]
    return WorkPoolCreate(name=name, type=kind, description=f"skyferry compute in {cloud}",
                          base_job_template=json.loads((TEMPLATES / template).read_text()))


def register_block_types() -> list[str]:
    """Register StorageNode and the credentials blocks that nodes may name."""
    from prefect_aws import AwsCredentials
    from prefect_azure import AzureBlobStorageCredentials
    from prefect_gcp import GcpCredentials

    kinds = [StorageNode, AwsCredentials, GcpCredentials, AzureBlobStorageCredentials]
    for kind in kinds:
        kind.register_type_and_schema()
    return [k.get_block_type_slug() for k in kinds]


ALERTS = ROOT / "deployments" / "alerts.yaml"
ALERT_BLOCK = "skyferry-alerts"


def create_alerts(url: str) -> list[str]:
    """The webhook block and the alert automations; returns the automations' names."""
    import yaml
    from prefect.automations import Automation, EventTrigger, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(  # the URL (Slack's holds a token) kept secret
        name=ALERT_BLOCK, url="{{webhook_url}}", secrets={"webhook_url": url},
        json_data={"text": "{{subject}}\n{{body}}"})
    block_id = block.save(ALERT_BLOCK, overwrite=True)
    specs = yaml.safe_load(ALERTS.read_text())["automations"]
    names = []
    with get_client(sync_client=True) as client:
        existing = {a.name: a.id for a in client.read_automations()}
    for spec in specs:
        if spec["name"] in existing:
            Automation.read(id=existing[spec["name"]]).delete()
        Automation(
            name=spec["name"], description=spec["description"],
            trigger=EventTrigger(posture="Reactive", threshold=1, **spec["trigger"]),
            actions=[SendNotification(block_document_id=block_id, subject=spec["subject"],
                                      body=spec["body"])],
        ).create()
        names.append(spec["name"])
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", help="topology YAML (default: the embedded one)")
    parser.add_argument("--cloud-pools", action="store_true",
                        help="ECS / Cloud Run / ACI pools instead of local process pools")
    parser.add_argument("--alert-url", default=os.environ.get("SKYFERRY_ALERT_URL"),
                        help="a webhook (Slack's incoming webhook, or any HTTP receiver) for "
                             "the alert automations of deployments/alerts.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    topology = load_topology(args.topology)
    with get_client(sync_client=True) as client:
        for cloud in topology.clouds:
            name = topology.pool_for(cloud)
            try:
                client.create_work_pool(pool_request(cloud, name, args.cloud_pools))
                logger.info("work pool %s: created", name)
            except ObjectAlreadyExists:
                logger.info("work pool %s: exists, left as it is", name)
    for slug in register_block_types():
        logger.info("block type %s: registered", slug)
    for node in topology.nodes:
        StorageNode(cloud=node.cloud, region=node.region, url=node.url,
                    credentials=node.credentials, storage_options=node.storage_options,
                    work_pool=node.work_pool, enabled=node.enabled,
                    timeout_s=node.timeout_s).save(node.name, overwrite=True)
        logger.info("block skyferry-storage-node/%s: saved (%s, %s)", node.name, node.cloud,
                    node.url)
    if args.alert_url:
        for name in create_alerts(args.alert_url):
            logger.info("automation %s: sends to block %s", name, ALERT_BLOCK)
    else:
        logger.info("no --alert-url: no alert automations (see docs/operations.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
