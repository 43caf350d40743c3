"""Test helpers: local cloud servers, a Prefect server, data builders, faults, transforms."""
