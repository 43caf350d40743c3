"""``StorageNode``: a node saved as a Prefect block, so a topology can live in the Prefect API.

Example::

    StorageNode(cloud="aws", region="us-east-1", url="s3://bucket/skyferry",
                credentials="aws-credentials/prod", work_pool="aws-pool").save("aws-node-1")
    topology = topology_from_blocks(["aws-node-1", "gcp-node-1", "azure-node-1"])
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from skyferry.config import Settings, get_settings
from skyferry.topology import Link, Node, Topology

__all__ = ["StorageNode", "topology_from_blocks"]


class StorageNode(Block):
    """A storage location (an fsspec URL) in a cloud and region, for skyferry's replicas."""

    _block_type_name = "skyferry Storage Node"
    _block_type_slug = "skyferry-storage-node"
    _description = "A skyferry node: where replicas are stored, and the pool that computes near it."

    cloud: str = Field(..., description="aws, gcp, azure, ...")
    region: str = Field(..., description="Region within the cloud.")
    url: str = Field(..., description="fsspec URL of the node's root, e.g. s3://bucket/prefix.")
    credentials: str | None = Field(
        default=None, description="A saved credentials block: aws-credentials/NAME, "
        "gcp-credentials/NAME or azure-blob-storage-credentials/NAME.")
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="Extra fsspec options; stored as secrets.")
    work_pool: str | None = Field(default=None, description="Work pool near this node.")
    enabled: bool = Field(default=True, description="false marks the node down.")
    timeout_s: float = Field(default=5.0, description="Backend call timeout in seconds.")
    max_writes: int | None = Field(
        default=None, ge=1, description="Replica writes to this node at once; unset, as many "
        "as there are chunks in flight.")

    def to_node(self, name: str) -> Node:
        options: dict[str, Any] = {k: v.get_secret_value()
                                   for k, v in self.storage_options.items()}
        return Node(name=name, cloud=self.cloud, region=self.region, url=self.url,
                    storage_options=options, credentials=self.credentials,
                    work_pool=self.work_pool, enabled=self.enabled, timeout_s=self.timeout_s,
                    max_writes=self.max_writes)


def topology_from_blocks(names: list[str], *, links: list[Link] | None = None,
                         source_cloud: str = "aws", catalog: str | None = None,
                         settings: Settings | None = None) -> Topology:
    """A topology from saved ``StorageNode`` blocks (names as saved), bound to ``settings``
    (default: the process's)."""
    nodes = [StorageNode.load(name).to_node(name) for name in names]  # type: ignore[union-attr]
    return Topology(nodes=nodes, links=links or [], source_cloud=source_cloud,
                    catalog=catalog).bind(settings or get_settings())
