"""The Prefect face of skyferry: the ``StorageNode`` block, and credentials blocks resolved
into fsspec storage options. The topology model itself is ``skyferry.topology``."""

from __future__ import annotations
