"""``status/training_status.json``: what the daemon is doing, rewritten atomically.

It is written at every change of state and at least every ``daemon.status_every_seconds`` by a
background thread, so readers see a fresh ``updated_at`` even during a long step, and never a
half-written file.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gearshift.daemon.layout import write_json_atomic

STATES = ("idle", "training", "stopping", "stopped", "error")

FIELDS = ("state", "pid", "started_at", "updated_at", "current_file", "current_step",
          "total_steps", "loss", "learning_rate", "eta_seconds", "files_done", "files_failed",
          "queue_length", "model_dir", "model_kind", "model_display_name", "profile",
          "system_prompt", "peak_memory_mb", "last_error")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusFile:
    """The daemon's status, kept in memory and written to ``path``.

    Args:
        path: ``status/training_status.json``.
        every_seconds: The longest time between two writes while the daemon lives.

    Example:
        >>> status = StatusFile(Path("svc/status/training_status.json"), 5.0)  # doctest: +SKIP
        >>> status.update(state="idle")  # doctest: +SKIP
    """

    def __init__(self, path: Path, every_seconds: float) -> None:
        self.path = path
        self.every_seconds = every_seconds
        self.fields: dict[str, Any] = dict.fromkeys(FIELDS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, *, write: bool | None = None, **values: Any) -> None:
        """Set fields; written now when ``state`` changes or ``write`` is True."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise KeyError(f"unknown status fields: {sorted(unknown)}")
        with self._lock:
            changed = "state" in values and values["state"] != self.fields["state"]
            self.fields.update(values)
        if write or (write is None and changed):
            self.write()

    def write(self) -> None:
        with self._lock:
            self.fields["updated_at"] = now_iso()
            data = dict(self.fields)
            write_json_atomic(self.path, data)

    def start(self) -> None:
        """Rewrite the file every ``every_seconds`` until :meth:`close`."""
        def beat() -> None:
            while not self._stop.wait(self.every_seconds):
                try:
                    self.write()
                except OSError:
                    pass  # a full disk must not kill the daemon; the next beat tries again

        self._thread = threading.Thread(target=beat, name="gs-daemon-status", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every_seconds + 1)


def read_status(path: Path) -> dict[str, Any] | None:
    """The status file's fields, or None when there is none (the daemon never ran)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(status: dict[str, Any], *, alive: bool) -> str:
    """The status as lines for people."""
    s = status
    state = s.get("state") or "unknown"
    if not alive and state not in ("stopped", "error"):
        state = f"{state} (but no daemon holds the pid lock: it was killed; start it again)"
    lines = [f"state:          {state}", f"pid:            {s.get('pid')}",
             f"started:        {s.get('started_at')}", f"updated:        {s.get('updated_at')}"]
    if s.get("current_file"):
        step, total = s.get("current_step"), s.get("total_steps")
        progress = f"step {step}/{total}" if total else f"step {step}"
        loss = s.get("loss")
        lr = s.get("learning_rate")
        extra = "".join([f", loss {loss:.4f}" if isinstance(loss, int | float) else "",
                         f", lr {lr:.2e}" if isinstance(lr, int | float) else ""])
        eta = s.get("eta_seconds")
        eta_text = f", eta {_duration(eta)}" if isinstance(eta, int | float) else ""
        lines.append(f"training:       {s['current_file']} ({progress}{extra}{eta_text})")
    lines += [f"files:          {s.get('files_done') or 0} done, {s.get('files_failed') or 0} "
              f"failed, {s.get('queue_length') or 0} waiting",
              f"model:          {s.get('model_display_name')} ({s.get('model_kind')}) "
              f"{s.get('model_dir')}",
              f"profile:        {s.get('profile')}: {s.get('system_prompt')!r}"]
    peak = s.get("peak_memory_mb")
    if isinstance(peak, int | float):
        lines.append(f"peak memory:    {peak:,.0f} MiB")
    if s.get("last_error"):
        lines.append(f"last error:     {s['last_error']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


