"""Module-level ``__getattr__`` for packages that import their heavy modules on first use
(PEP 562): ``__getattr__ = lazy_attributes(__name__, {"Name": "package.module", ...})``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    def getattr_(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)   # the next lookup finds it directly
        return value
    return getattr_
