"""A steady CPU heap for timing: glibc's malloc serves every allocation from its heap and keeps freed memory there.

By default glibc maps each allocation above its mmap threshold (at most 32 MiB) afresh and returns it on free, so a step
whose activations are tens of MB pays a page fault per 4 KiB on every step: about 0.27 s of kernel time in a 0.75 s plain
SGD step of the DP benchmark's CNN at B = 512, against almost none for a step that works in chunks of 256. Those faults
then decide the ratio of two steps, not the arithmetic. With `steady_heap()` (mmap off, trimming above 1 GiB only) both
steps run from memory already mapped, as they do under jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4          # mallopt parameters (malloc.h)


def steady_heap() -> str:
    "Turn glibc's per-allocation mmap off and keep freed memory; returns what was done, for the bench's header."
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError, TypeError):
        ok = False
    return "steady heap (glibc mallopt: no mmap, trim above 1 GiB)" if ok else "default heap (mallopt unavailable)"
