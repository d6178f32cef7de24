"""Resident and peak memory of this process, from Linux's /proc/self/status (shared by the
speed, quality and training-cost suites)."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux.")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from VmRSS


def settle() -> int:
    """Resident bytes after returning freed memory to the system, with the peak reset to it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak()
    return rss_bytes()
