"""Progress of a long storagectl command (scrub/rebuild --wait, send, receive, import,
export) on stderr, so stdout keeps only the result.

On a terminal: one bar that redraws itself in place (at most 5 times a second) with the
done and total in human sizes, the rate and the ETA, ended by a newline. Elsewhere (a pipe,
a log file, cron): one plain line per step — when a phase begins, at each tenth of the
total, every ``LINE_PERIOD`` seconds where the total is unknown, and at the end — so a log
shows how the work went without carriage returns or a flood of lines. Lines start only once
the command has run ``LINE_DELAY`` seconds: work that ends sooner (or is refused at once)
leaves its result or its one-line error alone, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from storaged.sizes import format_size

BAR_WIDTH = 24
REDRAW = 0.2        # seconds between redraws of the terminal bar
LINE_PERIOD = 10.0  # seconds between lines when the total is unknown
LINE_DELAY = 1.0    # seconds of work before the first line


def duration(seconds: float) -> str:
    """'0:07', '12:05', '1:02:03' (h:mm:ss, hours only when there are some)."""
    s = max(0, int(seconds + 0.5))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Feed it ``update(phase, done, total)``; ``close()`` ends the bar's line."""

    def __init__(self, stream: TextIO, *, tty: bool, unit: str = "bytes",
                 clock: Callable[[], float] = time.monotonic,
                 line_delay: float = LINE_DELAY) -> None:
        self.stream, self.tty, self.unit, self.clock = stream, tty, unit, clock
        self.lines_from = clock() + line_delay
        self.phase: str | None = None
        self.start = clock()
        self.start_done = 0
        self.drawn_at = -1e9
        self.width = 0          # length of the bar line last drawn (to blank its tail)
        self.step = -1          # the last tenth of the total a line was written for
        self.open = False       # a bar line is on the terminal without its newline
        self.line_done = -1     # ``done`` of the last plain line (no repeat at the end)

    def _amount(self, n: int) -> str:
        return format_size(n) if self.unit == "bytes" else f"{n} {self.unit}"

    def text(self, done: int, total: int | None, rate: float | None = None,
             eta: float | None = None) -> str:
        """'1.2G of 2.7G (45%) at 120M/s, ETA 0:13' from the counts (the rate and ETA
        measured here since the phase began, unless given)."""
        elapsed = self.clock() - self.start
        if rate is None:
            rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        out = self._amount(done)
        if total:
            out += f" of {self._amount(total)} ({min(100.0, 100 * done / total):.0f}%)"
        if rate > 0:
            out += (f" at {format_size(int(rate))}/s" if self.unit == "bytes"
                    else f" at {rate:.1f}/s")
            if eta is None and total:
                eta = max(0, total - done) / rate
        if eta is not None and total and done < total:
            out += f", ETA {duration(eta)}"
        return out

    def update(self, phase: str, done: int, total: int | None, *, rate: float | None = None,
               eta: float | None = None, final: bool = False) -> None:
        now = self.clock()
        new_phase = phase != self.phase
        if new_phase:
            if self.open:
                self._newline()
            self.phase, self.start, self.start_done, self.step = phase, now, done, -1
        if self.tty:
            if not (new_phase or final or now - self.drawn_at >= REDRAW
                    or (total and done >= total)):
                return
            line = " ".join(x for x in (phase, self._bar(done, total),
                                        self.text(done, total, rate, eta)) if x)
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width, self.open = len(line), True
            if final:
                self._newline()
        else:
            if now < self.lines_from:
                return
            if total:
                step = min(10, 10 * done // total)
                due = step > self.step
            else:
                step = self.step
                due = now - self.drawn_at >= LINE_PERIOD
            first = self.line_done < 0
            if not (first or new_phase or due or final) or (final and done == self.line_done):
                return
            self.step, self.line_done = step, done
            self.stream.write(f"{phase}: {self.text(done, total, rate, eta)}\n")
        self.drawn_at = now
        self.stream.flush()

    def _bar(self, done: int, total: int | None) -> str:
        if not total:
            return ""
        filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
        return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"

    def _newline(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
        self.open, self.width = False, 0

    def close(self) -> None:
        if self.open:
            self._newline()
