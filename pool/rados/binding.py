"""librados' Python binding, found without exposing the rest of Debian's dist-packages.

Debian ships the binding (package python3-rados) only for its own /usr/bin/python3, as
``/usr/lib/python3/dist-packages/rados.cpython-3XX-<arch>.so``. A virtualenv made from
another build of the same Python minor version can load that one extension module, but
putting all of dist-packages on sys.path would let Debian's copies of other packages shadow
the virtualenv's. So: a plain ``import rados`` first (``make venv`` exposes the module by a
.pth line pointing at a directory that holds only a link to it), else the extension module
is loaded from its file by name.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import cast

from pool.errors import StorageError

DIST = Path("/usr/lib/python3/dist-packages")


class RadosUnavailable(StorageError):
    """This host cannot talk to Ceph: the binding is missing or does not load."""


def debian_binding() -> Path | None:
    """The path of Debian's rados extension module for this Python, if installed."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = DIST / f"rados{suffix}"
        if p.exists():
            return p
    return None


def load() -> ModuleType:
    """The ``rados`` module; RadosUnavailable (one line, says what to install) if absent."""
    mod = sys.modules.get("rados")
    if mod is not None:
        return mod
    try:
        import rados  # noqa: PLC0415 - optional, only where a RADOS pool is used
    except ImportError:
        pass
    else:
        return cast(ModuleType, rados)
    path = debian_binding()
    if path is None:
        raise RadosUnavailable(
            f"librados' Python binding is not installed for Python "
            f"{sys.version_info.major}.{sys.version_info.minor} "
            f"(apt-get install python3-rados)")
    spec = importlib.util.spec_from_file_location("rados", path)
    if spec is None or spec.loader is None:
        raise RadosUnavailable(f"cannot load librados' Python binding from {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        raise RadosUnavailable(f"librados' Python binding {path} does not load: {e}") from e
    sys.modules["rados"] = mod
    return mod
