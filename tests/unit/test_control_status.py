"""``status`` says whether the daemon is ready (storaged/api.py ``ControlAPI.ready``): the
control socket answers while the daemon is still starting (before its FUSE mount and
metrics listener are up), so a script polling ``storagectl status`` must be able to tell
the two apart; and ``storagectl status`` shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from storaged.api import ControlAPI
from storaged.ctl.cli import show_status
from storaged.registry import Registry


async def _progress(_step: dict[str, Any]) -> None:
    return None


async def test_status_says_ready_only_once_the_daemon_is(tmp_path: Path) -> None:
    serving = trio.Event()
    api = ControlAPI(Registry(str(tmp_path)), None, None, ready=serving)
    starting = await api.status({}, _progress)
    assert starting["ready"] is False and starting["pools"] == []
    assert show_status(starting).startswith("STARTING:")
    serving.set()
    up = await api.status({}, _progress)
    assert up["ready"] is True
    assert "STARTING" not in show_status(up)
    # An API not told when the daemon is up (tools, tests) counts as ready.
    assert (await ControlAPI(Registry(str(tmp_path)), None, None).status(
        {}, _progress))["ready"] is True
