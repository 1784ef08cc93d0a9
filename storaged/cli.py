"""The old entry point of storagectl, kept for console scripts installed before the CLI
moved to storaged/ctl/ (they run ``from storaged.cli import main``). New code imports
storaged.ctl.cli."""

from storaged.ctl.cli import main

__all__ = ["main"]
