"""The installed package's version, for ``storaged --version`` and ``storagectl --version``.

Looked up only when asked for: importlib.metadata costs a few ms that every other
storagectl run (a send or receive in a pipeline) should not pay.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def version() -> str:
    """The version in the package metadata (pyproject.toml's ``version``)."""
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415 - see above
    from importlib.metadata import version as dist_version  # noqa: PLC0415
    try:
        return dist_version("storaged")
    except PackageNotFoundError:
        return "unknown (the storaged package is not installed)"


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` on stdout and exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS,
                 help: str = "print the version and exit") -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()
