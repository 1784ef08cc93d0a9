"""``storagectl completion bash|zsh``: the shell completion script, generated from
storagectl's own parser by shtab (so it never lags behind the commands).

Device and file arguments complete file names (their actions carry shtab's ``complete``
attribute, set in storaged.ctl.cli without importing shtab).
"""

from __future__ import annotations

import argparse

import shtab


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` ("bash" or "zsh")."""
    return str(shtab.complete(parser, shell=shell))
