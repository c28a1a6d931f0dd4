"""The icons data-set builder's former import path: every name is
:mod:`mbdl.data.builders.icons`'s (loaded on first use)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from mbdl.data.builders import icons

    return getattr(icons, name)
