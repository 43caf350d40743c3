"""Storage: the one way skyferry reaches a node, the catalog or a source.

- :mod:`~skyferry.storage.store`: :class:`Store`, an fsspec filesystem and a root, with
  deadlines and cancellation on every backend call;
- :mod:`~skyferry.storage.keys`: keys that cannot leave their root;
- :mod:`~skyferry.storage.errors`: backend errors as the StorageError family;
- :mod:`~skyferry.storage.uploads`: streamed writes on S3, GCS and Azure's own upload APIs;
- :mod:`~skyferry.storage.local`: durability on a local disk.
"""

from __future__ import annotations

from skyferry.storage.keys import safe_key, temp_target
from skyferry.storage.store import ObjectInfo, Store, open_url
from skyferry.storage.uploads import PART_SIZE, ObjectWriter

__all__ = ["PART_SIZE", "ObjectInfo", "ObjectWriter", "Store", "open_url", "safe_key",
           "temp_target"]
