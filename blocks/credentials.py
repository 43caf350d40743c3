"""Turn a node's credentials into fsspec storage options.

A node names a saved Prefect integration block as ``"<block-type-slug>/<block-name>"``:

- ``aws-credentials/prod`` (prefect-aws ``AwsCredentials``) -> s3fs options;
- ``gcp-credentials/prod`` (prefect-gcp ``GcpCredentials``) -> gcsfs options;
- ``azure-blob-storage-credentials/prod`` (prefect-azure ``AzureBlobStorageCredentials``)
  -> adlfs options.

Secrets stay inside the options handed to fsspec: they are never logged, and nothing that
holds them is ever put in a manifest, an artifact or an error message.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from skyferry.errors import TopologyError

__all__ = ["options_from_block"]

logger = logging.getLogger("skyferry.blocks")


def _secret(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def options_from_block(reference: str, node: str) -> dict[str, Any]:
    """Load the named credentials block and return fsspec storage options."""
    from prefect.blocks.core import Block

    try:
        block: Any = Block.load(reference)
    except Exception as exc:  # the message names the block, never a secret
        raise TopologyError(f"node {node}: cannot load credentials block {reference!r}: "
                            f"{type(exc).__name__}", source=node) from None
    kind = type(block).__name__
    if kind == "AwsCredentials":
        options: dict[str, Any] = {}
        if block.aws_access_key_id:
            options["key"] = block.aws_access_key_id
        if block.aws_secret_access_key:
            options["secret"] = _secret(block.aws_secret_access_key)
        if getattr(block, "aws_session_token", None):
            options["token"] = _secret(block.aws_session_token)
        params = getattr(block, "aws_client_parameters", None)
        endpoint = getattr(params, "endpoint_url", None) if params else None
        if endpoint:
            options["endpoint_url"] = endpoint
        if block.region_name:
            options.setdefault("client_kwargs", {})["region_name"] = block.region_name
        return options
    if kind == "GcpCredentials":
        info = block.service_account_info
        if info is not None:
            raw = _secret(info)
            return {"token": json.loads(raw) if isinstance(raw, str) else dict(raw),
                    "project": block.project}
        if block.service_account_file:
            return {"token": str(block.service_account_file), "project": block.project}
        return {"project": block.project} if block.project else {}
    if kind == "AzureBlobStorageCredentials":
        if block.connection_string is not None:
            return {"connection_string": _secret(block.connection_string)}
        if block.account_url:
            account = block.account_url.split("//", 1)[-1].split(".", 1)[0]
            return {"account_name": account, "anon": False}
        return {}
    raise TopologyError(f"node {node}: block {reference!r} is a {kind}, not AwsCredentials, "
                        "GcpCredentials or AzureBlobStorageCredentials", source=node)
