"""One daemon per base directory: ``daemon.pid`` held with a lock while the daemon lives."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from gearshift.errors import UsageError


def read_pid(path: Path) -> int | None:
    """The pid written in ``path``, or None (no file, empty, not a number)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def pid_running(pid: int) -> bool:
    """Whether a process with this pid is alive (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class PidLock:
    """The lock on ``daemon.pid``: taken for the daemon's life, released when it exits.

    The operating system drops the lock when the process dies, even by SIGKILL, so a pid file
    left behind by a dead daemon is stale and is taken over with a message.

    Example:
        >>> with PidLock(Path("svc/daemon.pid")):  # doctest: +SKIP
        ...     serve()
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = FileLock(str(path))

    def acquire(self) -> None:
        """Take the lock and write this process's pid.

        Raises:
            UsageError: When another live daemon holds it, naming its pid.
        """
        previous = read_pid(self.path)
        try:
            # A short wait: `status` or `stop` may be probing the lock at this very instant.
            self._lock.acquire(timeout=1.0)
        except Timeout:
            who = f"pid {previous}" if previous is not None else "another process"
            raise UsageError(f"a daemon is already running on {self.path.parent} ({who} holds "
                             f"{self.path.name}); stop it with `gearshift daemon stop "
                             f"{self.path.parent}`") from None
        if previous is not None and previous != os.getpid():
            state = "still exists but does not hold the lock" if pid_running(previous) else \
                "is gone"
            print(f"taking over a stale {self.path.name}: pid {previous} {state}",
                  file=sys.stderr)
        with open(self.path, "r+", encoding="ascii") as fh:  # the lock keeps the inode
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            os.fsync(fh.fileno())

    def release(self) -> None:
        """Empty the pid file and drop the lock."""
        try:
            with open(self.path, "r+", encoding="ascii") as fh:
                fh.truncate(0)
        except OSError:
            pass
        self._lock.release()

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: Path) -> int | None:
    """The pid of the daemon holding ``path`` now, or None when no daemon holds it."""
    with held_unless_running(path) as running:
        return running


class held_unless_running:  # noqa: N801 (a context manager used like a function)
    """Hold the lock for the ``with`` block when no daemon does (so none can start meanwhile);
    the block gets None, or the running daemon's pid (-1 when it has not written it yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = FileLock(str(path))
        self._held = False

    def __enter__(self) -> int | None:
        if not self.path.exists():
            return None
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return read_pid(self.path) or -1
        self._held = True
        return None

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._lock.release()


def request_stop(stop_file: Path, pid: int | None) -> None:
    """Ask the daemon to stop gracefully: the stop file (read between steps and while idle)
    and, where signals exist, SIGTERM."""
    stop_file.parent.mkdir(parents=True, exist_ok=True)
    stop_file.touch()
    if pid is not None and pid > 0 and hasattr(signal, "SIGTERM"):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

