"""The inbox: which files are ready to be taken, oldest first, and waking up when one arrives.

A file is taken only when complete: names starting with ``.`` or ending in ``.tmp`` /
``.partial`` are being written by someone (write under such a name, then rename), and any other
file whose size or mtime changed within ``settle_seconds`` is left for a later scan (a plain
copy that is still growing). Events come from the ``watchdog`` package when it can watch the
folder; a scan every ``poll_seconds`` runs in any case, so nothing depends on events arriving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORED_SUFFIXES = (".tmp", ".partial")


def is_ignored(name: str) -> bool:
    """Whether an inbox entry is still being written (or hidden): never taken."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


@dataclass(frozen=True)
class Seen:
    size: int
    mtime_ns: int


class Inbox:
    """Scans ``folder`` and tells which files have settled.

    Args:
        folder: The inbox.
        settle_seconds: How long a file's size and mtime must stay unchanged.
        clock: Wall-clock seconds (``time.time``), replaceable in tests.

    Example:
        >>> inbox = Inbox(Path("svc/inbox"), settle_seconds=2.0)  # doctest: +SKIP
        >>> inbox.ready()  # doctest: +SKIP
        [PosixPath('svc/inbox/a.jsonl')]
    """

    def __init__(self, folder: Path, settle_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._seen: dict[str, Seen] = {}  # name -> its stat at the previous scan

    def candidates(self) -> list[Path]:
        """Every file that may be taken once settled, oldest (mtime, then name) first."""
        out = []
        for entry in self.folder.iterdir():
            if is_ignored(entry.name):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # renamed away meanwhile
            if entry.is_file():
                out.append((st.st_mtime_ns, entry.name, entry))
        return [p for _, _, p in sorted(out)]

    def ready(self) -> list[Path]:
        """The settled candidates, oldest first.

        Settled: unchanged (size and mtime) since the previous scan, and last modified at least
        ``settle_seconds`` ago.
        """
        now = self.clock()
        out, seen = [], {}
        for path in self.candidates():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            current = Seen(st.st_size, st.st_mtime_ns)
            previous = self._seen.get(path.name)
            seen[path.name] = current
            if previous not in (None, current):
                continue  # changed since the last scan: still being written
            if now - st.st_mtime_ns / 1e9 >= self.settle_seconds:
                out.append(path)
        self._seen = seen
        return out

    def next_settle_in(self) -> float | None:
        """Seconds until the earliest unsettled file seen could settle (None: none)."""
        now = self.clock()
        waits = [self.settle_seconds - (now - s.mtime_ns / 1e9) for s in self._seen.values()]
        waits = [w for w in waits if w > 0]
        return min(waits) if waits else None


class Wakeup:
    """An event set by watchdog whenever something happens in the inbox (when it can watch).

    ``wait(timeout)`` returns early on an event; the caller scans either way.
    """

    def __init__(self, folder: Path, watch: bool, say: Callable[[str], None]) -> None:
        self.event = threading.Event()
        self.observer: Any = None
        self.mode = "polling"
        if not watch:
            return
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            wake = self.event

            class _Handler(FileSystemEventHandler):
                def on_any_event(self, event: Any) -> None:
                    wake.set()

            observer = Observer()
            observer.schedule(_Handler(), str(folder), recursive=False)
            observer.daemon = True
            observer.start()
            self.observer, self.mode = observer, "watchdog"
        except Exception as exc:  # no inotify watches left, unsupported filesystem, …
            say(f"inbox: watchdog cannot watch {folder} ({exc}); polling instead")

    def wait(self, timeout: float) -> None:
        self.event.wait(max(timeout, 0.0))
        self.event.clear()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=2)
