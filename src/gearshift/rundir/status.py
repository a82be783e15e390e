"""Where a run stands, read from its ``events.jsonl``: finished, interrupted, diverged or running.

A run that is still training and one that was killed (SIGKILL, power loss) look the same on
disk: neither has written its last event yet. Both read as ``running``; the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gearshift.rundir.readers import EventRecord, read_events

State = Literal["finished", "interrupted", "diverged", "running"]

#: Events that open a segment of work (a fresh start or a resume).
SEGMENT_STARTS = ("start", "resume")
#: The last event of a run that stopped on its own, and the state it leaves the run in.
ENDINGS: dict[str, State] = {"end": "finished", "interrupted": "interrupted",
                             "diverged": "diverged"}


@dataclass(frozen=True)
class RunStatus:
    """How far a run got and how long it worked.

    Attributes:
        state: ``finished`` (an ``end`` event closes the last segment), ``interrupted``
            (Ctrl-C / SIGTERM), ``diverged`` (stopped by the NaN or out-of-memory guard), or
            ``running`` (no closing event: in progress, or killed).
        step: The highest step any event recorded.
        total_steps: The planned length, from the ``start`` event (None when not recorded).
        resumes: How many times the run was resumed.
        active_seconds: Wall time summed over the segments of work, from each start or resume
            to the last event of that segment (time between a kill and its resume not counted).
        peak_memory_mb: The highest peak memory any event recorded (None when none did).
    """

    state: State
    step: int
    total_steps: int | None
    resumes: int
    active_seconds: float
    peak_memory_mb: float | None


def run_status(run_dir: str | Path, events: Sequence[EventRecord] | None = None) -> RunStatus:
    """Read where ``run_dir`` stands from its events (``events`` when already read).

    Raises:
        RunDirError: For a corrupt line of ``events.jsonl``, naming ``file:line``.
    """
    events = read_events(run_dir) if events is None else events
    state: State = "running"
    total: int | None = None
    resumes = 0
    active = 0.0
    opened: float | None = None
    last: float | None = None
    peak: float | None = None
    for event in events:
        if event.kind in SEGMENT_STARTS:
            if opened is not None and last is not None:
                active += max(last - opened, 0.0)
            opened = last = event.time
            resumes += event.kind == "resume"
            state = "running"
        elif event.time is not None:
            last = event.time
        if event.kind == "start" and isinstance(event.fields.get("total_steps"), int):
            total = int(event.fields["total_steps"])
        if event.kind in ENDINGS:
            state = ENDINGS[event.kind]
        memory = event.fields.get("peak_memory_mb")
        if isinstance(memory, int | float) and not isinstance(memory, bool):
            peak = float(memory) if peak is None else max(peak, float(memory))
    if opened is not None and last is not None:
        active += max(last - opened, 0.0)
    step = max((e.step for e in events), default=0)
    return RunStatus(state, step, total, resumes, active, peak)
