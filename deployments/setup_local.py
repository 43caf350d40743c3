"""Create skyferry's work pools and register its blocks on a Prefect server.

    python deployments/setup_local.py [--topology FILE] [--cloud-pools]

- One work pool per cloud of the topology (the nodes' ``work_pool``, else ``<cloud>-pool``).
  Locally they are ``process`` pools. With ``--cloud-pools`` they are ECS, Cloud Run and ACI
  pools made from ``deployments/job-templates/`` instead (a production server).
- The block types skyferry uses (``StorageNode`` and the integrations' credentials blocks), and
  one ``StorageNode`` block per node of the topology, named after the node.

It is idempotent: existing pools are left as they are, and blocks are overwritten.
Point it at a server with ``PREFECT_API_URL``.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", help="topology YAML (default: the embedded one)")
    parser.add_argument("--cloud-pools", action="store_true",
                        help="ECS / Cloud Run / ACI pools instead of local process pools")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
