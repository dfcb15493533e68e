"""Process memory on Linux: current and peak resident set size, with a resettable peak.

Writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS counter (VmHWM), so the peak of one phase
(build, prompt processing, generation) can be read on its own. Where that is not possible the peak is the
process's lifetime peak, and `peak_is_per_phase()` says so. Also: the resident pages of a folder's mmap'd files
(from /proc/self/smaps).
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


def mapped_file_rss_bytes(folder: Path) -> int:
    """Resident bytes of this process's mappings of the files in `folder` (e.g. an mmap'd checkpoint). smaps names
    the resolved file, so symlinked files (a Hugging Face cache snapshot) count too."""
    targets = {str(f.resolve()) for f in Path(folder).iterdir() if f.is_file()}
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(maxsplit=5)
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                    inside = len(head) == 6 and head[5].strip() in targets
                elif inside and head[0] == "Rss:":
                    total += int(head[1]) * 1024
    except OSError:
        return 0
    return total


def available_bytes() -> int | None:
    """Memory this machine can still give a process: MemAvailable + SwapFree from /proc/meminfo."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(fields["MemAvailable"].split()[0]) + int(fields["SwapFree"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None
