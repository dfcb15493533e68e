"""Process memory on Linux: current and peak resident set size, with a resettable peak.

Writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS counter (VmHWM), so the peak of one phase
(build, prompt processing, generation) can be read on its own. Where that is not possible the peak is the
process's lifetime peak, and `peak_is_per_phase()` says so.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024
