"""What the benchmarks share: how busy the machine was while they measured."""

from __future__ import annotations

import os
from pathlib import Path


def machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    idle = int(fields[3]) + int(fields[4])  # idle + iowait
    return (sum(int(f) for f in fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"
