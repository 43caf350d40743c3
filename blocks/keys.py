"""Master keys from a saved Prefect ``Secret`` block: ``--keys block:NAME``.

The block's value holds ``id:base64`` lines (``skyferry keys new ID`` prints one), the first
being the key that wraps new data keys. It is found through the ``skyferry.keys`` entry point
(skyferry/crypto.py), so the domain imports no Prefect.
"""

from __future__ import annotations

from typing import Any

from skyferry.errors import KeyUnavailableError

__all__ = ["master_keys_from_block"]


def master_keys_from_block(name: str) -> str:
    """The text of the ``Secret`` block ``name``; a typed error names the block, never its value."""
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name)
    except Exception as exc:
        raise KeyUnavailableError(f"cannot load Secret block {name!r} for master keys: "
                                  f"{type(exc).__name__}", key_id=None) from None
    value = block.get()
    if not isinstance(value, str):
        raise KeyUnavailableError(f"Secret block {name!r} holds a {type(value).__name__}, not "
                                  "id:base64 lines", key_id=None)
    return value
