"""Stage kinds, found through the ``distill.stages`` entry-point group.

A config's ``uses:`` names a registered kind, or ``package.module:Class`` for a
stage that lives outside this project.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points

from pipeline.core.stage import Stage


@lru_cache(maxsize=1)
def kinds() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="distill.stages")}


def load(kind: str) -> type[Stage]:
    target = kind if ":" in kind else kinds().get(kind)
    if target is None:
        known = ", ".join(sorted(kinds())) or "none registered; is the project installed?"
        raise KeyError(f"unknown stage kind {kind!r} (known: {known})")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise KeyError(f"{target} is not a Stage class")
    return cls
