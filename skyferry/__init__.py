"""skyferry: move ML training data across clouds, replicated, verified and committed."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
