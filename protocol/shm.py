"""Large arrays in shared memory: the client's memfds, read and written by the worker in place.

    client  memfd "isopool-shm-in": the request's large arrays, copied into its own mapping;
       │    sealed against shrinking, so the worker can map it without fear of SIGBUS
       │    memfd "isopool-shm-out": where the worker writes the large arrays of the answer
       │    header shm = [client pid, in fd, in bytes, out fd, in inode, out inode] (the inodes
       │    say which segment: a late worker finds a reused fd is another); an array's
       │    descriptor names an offset in the segment ([offset]) instead of a buffer frame
       ▼
    supervisor  checks the pid is the connection's own (the kernel's SO_PEERCRED, through
       │        ZAP), the offsets against `in bytes` and the total against its limits and its
       │        shared-memory cap; it never opens either memfd, and copies nothing
       ▼
    worker  (worker/segments.py) opens /proc/PID/fd/N read-only, checks its inode, maps it
       │    copy-on-write (its writes stay its own) and keeps that mapping for the client's
       │    next request on the segment unless the model wrote to it; writes its large result
       │    arrays into the out memfd through a shared mapping it keeps for the client's next
       │    answers (Mappings: bounded, swept between requests each heartbeat interval; only
       │    of a segment sealed against shrinking, so the client cannot fault it) and names
       │    their offsets; says "reuse" in its RESULT when nothing of the request's segment is
       │    still referenced (the model kept no view)
       ▼
    client  maps the out memfd copy-on-write: its answer's arrays are views of that mapping

Every segment is the client's (client/segments.py): it lives while the client holds its fd
or a mapping of it exists, so the kernel frees it when the client, a worker or the
supervisor dies, whatever the moment. A client reuses a segment only when that is safe: an
in segment after a RESULT that says "reuse", an out segment once the arrays of the answer
it held are gone. tcp:// and HTTP clients, and workers in a sandbox (another uid cannot
open the client's fds), keep the frame path.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import weakref
from typing import Iterable

import numpy as np


NAME_IN, NAME_OUT = "isopool-shm-in", "isopool-shm-out"
ALIGN = 64  # each array's offset in a segment: a cache line, so numpy and torch views are aligned
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
SEAL_SEAL, SEAL_SHRINK, SEAL_GROW, SEAL_WRITE = 1, 2, 4, 8


class Spill:
    """Where an encoder puts arrays of `threshold` bytes or more: offsets in one segment.

    With `home` (a segment's memory that the caller filled, as the HTTP gateway reads a body
    into one: gateway/body.py), an array that lies in it, at an offset its item size divides,
    is named where it is, and nothing is copied; one that does not makes the spill `away`,
    for the caller to encode again without a home (arrays of one message share one segment,
    and a model gets no misaligned array that a copy would have aligned)."""

    __slots__ = ("threshold", "parts", "size", "home", "away")

    def __init__(self, threshold: int, home: memoryview | None = None):
        self.threshold = threshold
        self.parts: list[tuple[int, memoryview]] = []
        self.size = 0
        self.home = home
        self.away = False

    def place(self, data: memoryview, itemsize: int = 1) -> int:
        if self.home is not None:  # where it lies, if it does, and aligned for its type
            offset = offset_in(self.home, data)
            if offset is None or offset % itemsize:
                self.away = True
                return 0
            self.size = max(self.size, offset + len(data))
            return offset
        offset = self.size
        self.parts.append((offset, data))
        self.size = -(-(offset + len(data)) // ALIGN) * ALIGN
        return offset


def offset_in(home: memoryview, data: memoryview) -> int | None:
    """Where `data` starts in `home` if all of it lies there, else None."""
    base = np.frombuffer(home, np.uint8).ctypes.data
    at = np.frombuffer(data, np.uint8).ctypes.data - base if len(data) else -1
    return at if 0 <= at and at + len(data) <= len(home) else None


# ---------------------------------------------------------------- mappings

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_HUGEPAGE = 14  # 2 MiB pages for this mapping's memory, where the kernel gives shmem huge pages
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23  # Linux 5.14: map every page in one call, not a fault each
HUGE = 2 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
LOOK_PAGES = 512  # pages untouched() reads between offers of the core (2 MiB of 4 KiB pages)
THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


@functools.cache
def huge_pages() -> bool:
    """Does this kernel give shared memory 2 MiB pages where a mapping asks (MADV_HUGEPAGE)?
    The host's setting (THP_SHMEM), "never" on most distributions: a 16 MiB array is then
    4,096 pages, and what a segment costs is mostly the kernel's work per page (mapping one,
    writing one), not the copy (docs/performance.md, "Huge pages")."""
    try:
        with open(THP_SHMEM) as f:
            text = f.read()
    except OSError:
        return False
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
    return mode in ("always", "within_size", "advise", "force")


def map_fd(fd: int, size: int, shared: bool = False) -> memoryview:
    """`size` bytes of `fd`, mapped copy-on-write (this process's writes stay its own) or shared.
    Unlike mmap.mmap it keeps no fd: the mapping lives exactly as long as a view of it (an
    array made from it) does; thousands of answers held cost no fds."""
    addr = mmap_fd(fd, size, shared)
    region = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(region, _libc.munmap, addr, size)
    return memoryview(region).cast("B")


def mmap_fd(fd: int, size: int, shared: bool = False, populate: int = 0) -> int:
    """The address of a new mapping of `size` bytes of `fd`, its first `populate` bytes' pages
    mapped now; munmap is the caller's to do."""
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    _libc.madvise(addr, size, MADV_HUGEPAGE)  # no effect where the host gives shmem no huge pages
    if populate:  # never more than is written: a hole would be allocated, and charged to us
        _libc.madvise(addr, -(-populate // PAGE) * PAGE, MADV_POPULATE_READ)  # EINVAL before 5.14: faults do it
    return addr


def untouched(addr: int, size: int, offer: bool = False) -> bool:
    """Is every page of this private (copy-on-write) mapping still the segment's own, none
    written by this process? Then what is written into the segment next (by the client, or
    by the worker for an answer) is what the mapping shows. /proc/self/pagemap says, a
    64-bit word per page: bit 63 present, 62 swapped, 61 a page of a file (here, the
    segment) rather than this process's own copy.

    The kernel reads each page's own record to say so, and after a large copy those are
    out of the cache: 16 MiB took 0.4 ms in a worker right after an answer, 0.12 ms warm.
    The pages are read LOOK_PAGES at a time, and a written page ends the look. With `offer`
    the core is offered between pieces (sched_yield): a worker looks just after sending an
    answer, whose wake-ups may have queued the supervisor behind it on its vCPU, and has
    nothing else to do. A client does not offer: its look lies between its request and the
    answer it waits for, and beside a CPU-bound neighbour each offer hands that neighbour a
    whole slice (16 MiB round trips took 14-16 ms against 8 that way)."""
    first, pages = addr // PAGE, -(-size // PAGE)
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:  # self now: a worker is a fork
            for at in range(0, pages, LOOK_PAGES):
                if at and offer:
                    os.sched_yield()
                n = min(LOOK_PAGES, pages - at)
                words = np.frombuffer(os.pread(f.fileno(), n * 8, (first + at) * 8), dtype=np.uint64)
                if len(words) != n:
                    return False
                if (((words >> np.uint64(62)) != 0) & ((words >> np.uint64(61)) & np.uint64(1) == 0)).any():
                    return False
    except OSError:
        return False  # no pagemap here: map the segment anew each time
    return True


def _flat(data: memoryview) -> memoryview:
    """An array's bytes as one flat run of bytes, to copy or write."""
    return data.cast("B") if data.format != "B" or data.ndim != 1 else data


def write_parts(fd: int, parts: Iterable[tuple[int, memoryview]]) -> None:
    for offset, data in parts:
        data = _flat(data)
        done = 0
        while done < len(data):  # a file write is whole but for a signal; go on where it stopped
            done += os.pwrite(fd, data[done:], offset + done)


def segments_in(pid: int) -> list[str]:
    """Every isopool segment process `pid` holds, open or mapped (for tests and leak checks)."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith(("/memfd:" + NAME_IN, "/memfd:" + NAME_OUT)):
                found.append(f"fd {fd}: {link}")
        with open(f"/proc/{pid}/maps") as maps:
            found += [f"map: {line.strip()}" for line in maps if "/memfd:isopool-shm-" in line]
    except OSError:
        pass  # the process is gone: it holds nothing
    return found
