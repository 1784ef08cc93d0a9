"""A trio event loop in a background thread, for driving async code from synchronous test
code such as a hypothesis ``RuleBasedStateMachine`` (whose rules are plain functions).

Everything the loop runs lives in one ``trio.run`` (a Pool's locks, events and device
threads are bound to the run that created them), so a machine keeps one portal for all its
steps and closes it in ``teardown``.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio
import trio.from_thread
import trio.lowlevel

if TYPE_CHECKING:
    from pool import Pool

T = TypeVar("T")


class TrioPortal:
    """``run(fn, *args)`` runs ``await fn(*args)`` on the loop and returns its result (or
    raises its exception) in the calling thread."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="trio-portal", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def loop() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()
        try:
            trio.run(loop)
        except BaseException as exc:  # surfaced by __init__ or close
            self._error = exc
            self._ready.set()

    def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        assert self._token is not None
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        self._token = None
        if self._error is not None:
            raise self._error


def tear_down(portal: TrioPortal, pool: Pool, tmp: str | Path) -> None:
    """A machine's teardown: close its pool on the loop, stop the loop, remove its files."""
    try:
        if not pool.closed:
            portal.run(pool.close)
    finally:
        portal.close()
        shutil.rmtree(tmp, ignore_errors=True)
