"""Flows: multicloud-pipeline composes the four stages."""

from __future__ import annotations
