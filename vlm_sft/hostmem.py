"""This process's host memory: resident set now and its high-water mark, read from /proc on Linux.

Why not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries it across fork + exec, so a trainer started by a large
process (a pytest run, a notebook, a launcher holding a dataset) reports its parent's resident set as its own peak.
VmHWM belongs to the process's own address space, which exec replaces. ru_maxrss stays the fallback where /proc is
missing (macOS, where it counts bytes)."""
from __future__ import annotations

import resource
import sys


def _status_gib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2 ** 20  # kB
    except OSError:
        return None
    return None


def _maxrss_gib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def resident_gib() -> float:
    """The resident set now (VmRSS), GiB."""
    now = _status_gib("VmRSS")
    return _maxrss_gib() if now is None else now


def peak_resident_gib() -> float:
    """The highest resident set of this process's own address space so far (VmHWM), GiB."""
    peak = _status_gib("VmHWM")
    return _maxrss_gib() if peak is None else peak
