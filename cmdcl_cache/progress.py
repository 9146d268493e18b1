"""What both programs print: one console factory, one logging handler, the extraction progress display.

Messages are never hard-wrapped when the output is not a terminal (a log file, a pipe, CI, a test), so a
path or a sentence can be searched for whole; on a terminal rich wraps to its width as usual. Log records
of third-party libraries (open_clip, huggingface_hub) go through one handler on stderr, and a warning
that repeats is printed once.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

_configured = False


def markup_mode() -> str | None:
    """typer's help and error panels on a terminal; plain click text (never wrapped) in a pipe or a log."""
    return "rich" if sys.stdout.isatty() and sys.stderr.isatty() else None


def console(stderr: bool = False, quiet: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(stderr=stderr, highlight=False, quiet=quiet, soft_wrap=not terminal,
                   width=None if terminal else 10_000)


def configure_logging() -> None:
    """One stderr handler for every library's log records; each distinct warning printed once."""
    global _configured
    if _configured:
        return
    _configured = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("open_clip", "huggingface_hub", "urllib3", "timm"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    logging.captureWarnings(True)
    warnings.simplefilter("once")


class _Once(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.getMessage()}"
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class ExtractProgress:
    """rich progress bar, or (quiet) one log line every 30 s, on stderr."""

    def __init__(self, total: int, quiet: bool, label: str):
        import threading
        self._lock = threading.Lock()   # updated from the main thread and the committer's
        self.console = console(stderr=True)
        self.quiet, self.total, self.label = quiet, total, label
        self.done = self.failed = self.frames = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if not quiet and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:.1f} frames/s"),
                                 TextColumn("{task.fields[failed]} failed"),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
            self._task = self._bar.add_task(label, total=total, rate=0.0, failed=0)
            self._bar.start()

    def log(self, text: str) -> None:
        self.console.print(text, markup=False)

    def update(self, done=0, failed=0, frames=0) -> None:
        with self._lock:
            self._update(done, failed, frames)

    def _update(self, done, failed, frames) -> None:
        self.done += done
        self.failed += failed
        self.frames += frames
        now = time.monotonic()
        rate = self.frames / max(now - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.failed, rate=rate, failed=self.failed)
        elif now - self._last > 30 or (done or failed) and self.done + self.failed == self.total:
            self._last = now
            left = (self.total - self.done - self.failed) * (now - self.t0) / max(self.done + self.failed, 1)
            self.log(f"{self.label}: {self.done + self.failed}/{self.total} videos, {rate:.1f} frames/s, "
                     f"{self.failed} failed, ~{left:.0f} s left")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
