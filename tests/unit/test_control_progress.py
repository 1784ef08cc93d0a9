"""The control API's progress lines (storaged/control.py) when several tasks of one
operation report at once, as a RADOS pool destroy's parallel deletes do: every line goes
out whole, one at a time, and the operation ends with its result, not an internal error
(trio refuses a second sender on a stream while the first waits). A real unix socket and a
stand-in API whose method reports from eight tasks at once."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import trio

from storaged.api import ControlAPI
from storaged.control import ControlServer

Progress = Callable[[dict[str, Any]], Awaitable[None]]


class _Parallel:
    """A method that reports progress from eight tasks at once."""

    async def call(self, method: str, params: dict[str, Any], progress: Progress) -> Any:
        async def one(i: int) -> None:
            await progress({"phase": "deleting", "done": i, "total": 8})
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        return {"method": method, "done": 8}


async def test_progress_from_parallel_tasks_goes_out_line_by_line(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    server = ControlServer(cast(ControlAPI, _Parallel()), path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        stream = await trio.open_unix_socket(path)
        await stream.send_all(json.dumps({"method": "pool.destroy", "params": {}}).encode()
                              + b"\n")
        buf = b""
        answers: list[dict[str, Any]] = []
        with trio.fail_after(10):
            while not answers or "progress" in answers[-1]:
                chunk = await stream.receive_some()
                assert chunk, "the server closed the connection"
                buf += chunk
                *lines, buf = buf.split(b"\n")
                answers += [json.loads(line) for line in lines]
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert answers[-1] == {"result": {"method": "pool.destroy", "done": 8}}, answers[-1]
    steps = [a["progress"] for a in answers[:-1]]
    assert sorted(p["done"] for p in steps) == list(range(8))
    assert all(p == {"phase": "deleting", "done": p["done"], "total": 8} for p in steps)
