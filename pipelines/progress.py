"""Periodic progress lines with rate and ETA, for work that can take minutes."""

from __future__ import annotations

import logging
import resource
import time


class Progress:
    """Logs "<what>: done/total unit, rate/s, ETA" at most every `every_s` seconds, and once at the end."""

    def __init__(self, log: logging.Logger, what: str, total: int | None, unit: str, every_s: float = 10.0):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        t = time.monotonic()
        if t - self.last >= self.every_s:
            self.last = t
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done:,}"
        if self.total:
            text += f"/{self.total:,}"
        text += f" {self.unit}, {rate:,.0f}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text

    def finish(self) -> float:
        elapsed = time.monotonic() - self.started
        if self.done:
            self.log.info("%s in %s", self.line(), format_seconds(elapsed))
        return elapsed


def format_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def peak_rss_mb() -> float:
    """This process's own peak resident memory, in MiB. Linux's `ru_maxrss` carries a parent's peak into a child
    across fork and exec (a build measured in a child of the 2 GB process that prepared its data reported 2,040 MB
    whatever it used itself), so the peak of this process's own memory map (`VmHWM`) comes first."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS: not Linux
