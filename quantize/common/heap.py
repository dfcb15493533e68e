"""The process heap (glibc): freed memory handed back to the OS."""

from __future__ import annotations


def release_free_heap() -> bool:
    """Hand freed heap pages back to the OS (glibc malloc_trim). glibc keeps large freed blocks in the process,
    e.g. the buffers of a checkpoint decompressed at load, so RSS would keep counting them. Returns malloc_trim's
    answer (whether memory was released); False without glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
