"""Writing a snapshot to disk in one pass over its bytes, and the handle of a background save.

Each file's bytes are hashed from memory by a helper thread while this thread writes them, so no
file is ever read back to build the manifest (``hashlib`` and ``os.write`` both release the GIL,
so the two overlap on two cores).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gearshift.checkpoint.snapshot import Snapshot

_CHUNK = 8 << 20
_HASH_WORKERS = 2


def sha256_bytes(data: memoryview) -> str:
    """The hex sha256 of a buffer (chunked, so the GIL is released for each large chunk)."""
    digest = hashlib.sha256()
    for start in range(0, len(data), _CHUNK):
        digest.update(data[start:start + _CHUNK])
    return digest.hexdigest()


def write_durably(path: Path, data: memoryview) -> None:
    """Write ``data`` to a new file and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view, done = data.cast("B"), 0
        while done < len(view):
            done += os.write(fd, view[done:done + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(directory: Path, snapshot: Snapshot,
                   hook: Callable[[Path], None] | None = None) -> dict[str, dict[str, Any]]:
    """Write every file of ``snapshot`` into ``directory`` (fsynced); their manifest entries.

    Args:
        directory: An empty folder.
        snapshot: The files' bytes.
        hook: Called with each file's path once it is written (fault injection in drills).

    Returns:
        File name to ``{"sha256": ..., "bytes": ...}``, hashed from memory.
    """
    files = snapshot.files()
    with ThreadPoolExecutor(max_workers=_HASH_WORKERS, thread_name_prefix="gs-hash") as pool:
        digests = {name: pool.submit(sha256_bytes, data) for name, data in files}
        for name, data in files:
            write_durably(directory / name, data)
            if hook is not None:
                hook(directory / name)
        return {name: {"sha256": digests[name].result(), "bytes": len(data)}
                for name, data in sorted(files)}


class PendingSave:
    """A checkpoint being written in the background, returned by
    ``CheckpointManager.save(..., asynchronous=True)``.

    Attributes:
        step: The step the snapshot was taken at.
        path: The folder the checkpoint is committed to.
        blocked_s: Seconds the caller was blocked (waiting for the previous save + snapshot).
        waited_s: Of those, seconds spent waiting for the previous save to finish.
        write_s: Seconds the writer took (snapshot bytes to committed folder), once done.

    Example:
        >>> handle = manager.save(200, model=model, trainer_state=s, asynchronous=True)  # doctest: +SKIP
        >>> ...                       # training goes on
        >>> handle.wait()             # the committed folder, or the writer's error raised here
        PosixPath('run/checkpoints/step-00000200')
    """

    def __init__(self, step: int, path: Path, blocked_s: float, waited_s: float) -> None:
        self.step = step
        self.path = path
        self.blocked_s = blocked_s
        self.waited_s = waited_s
        self.write_s: float | None = None
        self._future: Future[Path] = Future()
        self._reported = False
        self._thread: threading.Thread | None = None

    def _run(self, job: Callable[[], Path], then: Callable[[], None]) -> None:
        """Run ``job`` (write and commit) in a new thread, then ``then`` (retention) in it.

        The handle resolves when ``job`` is done: retention is not part of the wait, but the
        next save waits for it (:meth:`join`).
        """
        self._future.set_running_or_notify_cancel()

        def target() -> None:
            start = time.perf_counter()
            try:
                result = job()
            except BaseException as exc:  # handed to whoever waits
                self.write_s = time.perf_counter() - start
                self._future.set_exception(exc)
                return
            self.write_s = time.perf_counter() - start
            self._future.set_result(result)
            try:
                then()
            except Exception as exc:  # the checkpoint is committed; only clean-up failed
                warnings.warn(f"after committing {result}: {exc}", stacklevel=1)

        # Not a daemon: a process that ends while a checkpoint is being written finishes it.
        self._thread = threading.Thread(target=target, name=f"gs-checkpoint-{self.step}")
        self._thread.start()

    def done(self) -> bool:
        """Whether the writer has finished (committed or failed)."""
        return self._future.done()

    def error(self) -> BaseException | None:
        """The writer's error once it is done (None while running or after success)."""
        return self._future.exception() if self._future.done() else None

    def join(self) -> BaseException | None:
        """Wait for the writer; its error if nobody was given it yet (it counts as given now)."""
        self._future.exception()  # blocks until done
        if self._thread is not None:
            self._thread.join()
        error = self._future.exception()
        if error is None or self._reported:
            return None
        self._reported = True
        return error

    def join_quietly(self) -> None:
        """Wait for the writer without taking its result (``wait`` gives it)."""
        self._future.exception()
        if self._thread is not None:
            self._thread.join()

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the checkpoint is committed.

        Args:
            timeout: Seconds to wait at most (None: as long as it takes).

        Returns:
            The committed checkpoint folder.

        Raises:
            TimeoutError: If ``timeout`` passed first.
            Exception: The writer's own error (e.g. ``OSError`` for a full disk); the previous
                checkpoint is then still intact and ``latest``.
        """
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self._reported = True
            raise

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self.error() else "committed")
        return f"PendingSave(step={self.step}, path={str(self.path)!r}, {state})"
