"""Resize, Upsample and GridSample."""

from __future__ import annotations
