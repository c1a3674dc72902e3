"""If: a constant condition inlines the taken branch; otherwise the node stays opaque."""

from __future__ import annotations
