"""Large arrays in shared memory: the client's memfds, read and written by the worker in place.

    client  memfd "isopool-shm-in": the request's large arrays, written once, then sealed
            (no shrink, grow or write: the worker can map it without fear of SIGBUS, and
            nobody can change it after the send); memfd "isopool-shm-out", empty
       │    header shm = [client pid, in fd, in bytes, out fd]; an array's descriptor names an
       │    offset in the segment ([offset]) instead of a buffer frame
       ▼
    supervisor  checks the pid is the connection's own (the kernel's SO_PEERCRED, through
       │        ZAP), the offsets against `in bytes` and the total against its limits and its
       │        shared-memory cap; it never opens either memfd, and copies nothing
       ▼
    worker  opens /proc/PID/fd/N read-only and maps it copy-on-write (its writes stay its own);
            writes its large result arrays into the out memfd (pwrite: a client that shrinks
            it cannot fault the worker) and names their offsets
       ▼
    client  seals the out memfd, maps it, and its answer's arrays are views of that mapping

Every segment is the client's: it lives while the client holds its fds (until the call's
answer, cancel or timeout) or a mapping of it exists, so the kernel frees it when the client,
a worker or the supervisor dies, whatever the moment. tcp:// and HTTP clients, and workers in
a sandbox (another uid cannot open the client's fds), keep the frame path.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import weakref
from typing import Iterable

from .codec import encode_payload
from .errors import BadRequest

NAME_IN, NAME_OUT = "isopool-shm-in", "isopool-shm-out"
DEFAULT_THRESHOLD = 1 << 20  # arrays from this many bytes travel in shared memory
ALIGN = 64  # each array's offset in a segment: a cache line, so numpy and torch views are aligned
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
SEAL_SEAL, SEAL_SHRINK, SEAL_GROW, SEAL_WRITE = 1, 2, 4, 8
SEALED = SEAL_SEAL | SEAL_SHRINK | SEAL_GROW | SEAL_WRITE


class Spill:
    """Where an encoder puts arrays of `threshold` bytes or more: offsets in one segment."""

    __slots__ = ("threshold", "parts", "size")

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.parts: list[tuple[int, memoryview]] = []
        self.size = 0

    def place(self, data: memoryview) -> int:
        offset = self.size
        self.parts.append((offset, data))
        self.size = -(-(offset + len(data)) // ALIGN) * ALIGN
        return offset


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def map_private(fd: int, size: int) -> memoryview:
    """`size` bytes of `fd`, mapped copy-on-write: this process's writes stay its own. Unlike
    mmap.mmap it keeps no fd: the mapping lives exactly as long as a view of it (an array
    made from it) does, and thousands of answers held cost no file descriptors."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if addr is None or addr == MAP_FAILED:
        raise OSError(ctypes.get_errno(), f"mmap of {size} bytes: {os.strerror(ctypes.get_errno())}")
    region = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(region, _libc.munmap, addr, size)
    return memoryview(region).cast("B")


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def write_parts(fd: int, parts: Iterable[tuple[int, memoryview]]) -> None:
    for offset, data in parts:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        done = 0
        while done < len(data):  # a file write is whole but for a signal; go on where it stopped
            done += os.pwrite(fd, data[done:], offset + done)


class Segments:
    """A call's two memfds (client side). close() lets both go; it is idempotent."""

    __slots__ = ("fd_in", "size_in", "fd_out")

    def __init__(self, spill: Spill):
        self.fd_in, self.size_in, self.fd_out = -1, spill.size, -1
        try:
            if spill.parts:
                self.fd_in = _memfd(NAME_IN)
                write_parts(self.fd_in, spill.parts)
                os.ftruncate(self.fd_in, spill.size)  # the padding after the last array
                fcntl.fcntl(self.fd_in, F_ADD_SEALS, SEALED)
            self.fd_out = _memfd(NAME_OUT)
        except BaseException:
            self.close()
            raise

    def header(self) -> list:
        return [os.getpid(), self.fd_in, self.size_in, self.fd_out]

    def answer(self) -> memoryview | None:
        """The out segment as the worker left it, sealed and mapped (copy-on-write); None if it
        wrote nothing. Closes both fds: the mapping alone keeps the answer's memory."""
        fd, self.fd_out = self.fd_out, -1
        if fd < 0:
            self.close()
            return None
        try:
            try:
                fcntl.fcntl(fd, F_ADD_SEALS, SEALED)  # from here on nobody can shrink it under us
            except OSError:  # a writable shared mapping exists (only a hostile worker makes one)
                raise BadRequest("the worker left the shared-memory answer open to changes; it is refused") from None
            size = os.fstat(fd).st_size
            return map_private(fd, size) if size else None
        finally:
            os.close(fd)
            self.close()

    def close(self) -> None:
        for name in ("fd_in", "fd_out"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __del__(self) -> None:  # a call dropped on a path that did not close it still lets go
        self.close()


# ---------------------------------------------------------------- the worker's side

def _open(pid: int, fd: int, name: str, flags: int) -> int:
    """The client's memfd `fd`, opened through /proc, checked to be one of ours."""
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_CLOEXEC)
    except OSError as exc:
        raise BadRequest(f"cannot open the client's shared memory (process {pid}, fd {fd}): {exc.strerror}. "
                         "The client must be a live process on this host that this worker's user may read; "
                         "else send arrays as frames (Client(shm=False))") from None
    try:
        target = os.readlink(f"/proc/self/fd/{mine}")  # what was opened, not what the name said before
        if not target.startswith(f"/memfd:{name} "):
            raise BadRequest(f"process {pid}'s fd {fd} is not an isopool shared-memory segment ({name}); "
                             "shared memory names only the segments the client made for the call")
    except BaseException:
        os.close(mine)
        raise
    return mine


def map_request(pid: int, fd: int, size: int) -> memoryview:
    """The request's segment, mapped copy-on-write: read in place, never written back."""
    mine = _open(pid, fd, NAME_IN, os.O_RDONLY)
    try:
        if fcntl.fcntl(mine, F_GET_SEALS) & (SEAL_SHRINK | SEAL_WRITE) != SEAL_SHRINK | SEAL_WRITE:
            raise BadRequest("the request's shared memory is not sealed against shrinking and writing; "
                             "a client must seal it (protocol/shm.py) before it sends")
        if os.fstat(mine).st_size < size:
            raise BadRequest(f"the request's shared memory holds {os.fstat(mine).st_size} bytes, fewer than the "
                             f"{size} its header names")
        return map_private(mine, size)
    finally:
        os.close(mine)


def request_segment(header: dict) -> memoryview | None:
    """A RUN's shared memory, mapped, if its header names some (shm: [pid, in fd, in bytes, out fd])."""
    spec = header.get("shm")
    if not spec or spec[1] < 0 or not spec[2]:
        return None
    return map_request(spec[0], spec[1], spec[2])


def answer_to(header: dict) -> tuple[int, int] | None:
    """(pid, out fd) where a RUN's large results go; None: as frames (streams always are)."""
    spec = header.get("shm")
    return None if not spec or header.get("stream") else (spec[0], spec[3])


def encode_answer(value: object, out: tuple[int, int] | None, threshold: int) -> list:
    """[payload, *buffers] of a result; its arrays of `threshold` bytes or more written into the
    client's out segment first when it gave one."""
    if out is None:
        return encode_payload(value)
    spill = Spill(threshold)
    frames = encode_payload(value, spill)
    if spill.parts:
        write_answer(out[0], out[1], spill)
    return frames


def write_answer(pid: int, fd: int, spill: Spill) -> None:
    """Write an answer's large arrays into the client's out segment."""
    mine = _open(pid, fd, NAME_OUT, os.O_WRONLY)
    try:
        write_parts(mine, spill.parts)
    except OSError as exc:
        raise BadRequest(f"cannot write the answer into the client's shared memory: {exc.strerror}; the "
                         "client must leave its out segment empty and unsealed until the answer") from None
    finally:
        os.close(mine)


def segments_in(pid: int) -> list[str]:
    """Every isopool segment process `pid` holds, open or mapped (for tests and `status`)."""
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
