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
    worker  opens /proc/PID/fd/N read-only, checks its inode, maps it copy-on-write (its writes
       │    stay its own); writes its large result arrays into the out memfd through a shared
       │    mapping it keeps for the client's next answers (Mappings: bounded, swept between
       │    requests each heartbeat interval; only of a segment sealed against shrinking, so
       │    the client cannot fault it)
       │    and names their offsets; says "reuse" in its RESULT
       │    when nothing of the request's segment is still referenced (the model kept no view)
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
import errno
import fcntl
import functools
import mmap
import os
import weakref
from typing import Any, Callable, Iterable

from .codec import encode_payload
from .errors import BadRequest

NAME_IN, NAME_OUT = "isopool-shm-in", "isopool-shm-out"
ALIGN = 64  # each array's offset in a segment: a cache line, so numpy and torch views are aligned
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
SEAL_SEAL, SEAL_SHRINK, SEAL_GROW, SEAL_WRITE = 1, 2, 4, 8


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


def map_fd(fd: int, size: int, shared: bool = False, then: Callable[[], Any] | None = None,
           populate: bool = False, later: list | None = None) -> memoryview:
    """`size` bytes of `fd`, mapped copy-on-write (this process's writes stay its own) or shared.
    Unlike mmap.mmap it keeps no fd: the mapping lives exactly as long as a view of it (an
    array made from it) does, then `then()` runs; thousands of answers held cost no fds.
    With `later`, the unmapping is put there for the caller to do when it has time."""
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    _libc.madvise(addr, size, MADV_HUGEPAGE)  # no effect where the host gives shmem no huge pages
    if populate:
        _libc.madvise(addr, size, MADV_POPULATE_READ)  # an older kernel says EINVAL: the faults do it
    region = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(region, _unmap, addr, size, then, later)
    return memoryview(region).cast("B")


def _unmap(addr: int, size: int, then: Callable[[], Any] | None, later: list | None = None) -> None:
    if later is not None:
        later.append((addr, size))  # nothing refers to it: only the page tables are left to undo
    else:
        _libc.munmap(addr, size)
    if then is not None:
        then()


def _flat(data: memoryview) -> memoryview:
    """An array's bytes as one flat run of bytes, to copy or write."""
    return data.cast("B") if data.format != "B" or data.ndim != 1 else data


def write_parts(fd: int, parts: Iterable[tuple[int, memoryview]]) -> None:
    for offset, data in parts:
        data = _flat(data)
        done = 0
        while done < len(data):  # a file write is whole but for a signal; go on where it stopped
            done += os.pwrite(fd, data[done:], offset + done)


# ---------------------------------------------------------------- the worker's side

def _open(pid: int, fd: int, ino: int, name: str, flags: int) -> int:
    """The client's memfd `fd`, opened through /proc, checked to be one of ours and the very
    segment the request named (inode `ino`): a call cancelled while its worker ran has had its
    segments closed, and the fd may by now be another call's. What the fd is, is looked at
    before it is opened, and it is opened never to wait: a client's fd that is a FIFO with no
    writer (or a device) would otherwise hold the worker in open() until it was killed."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        named = os.readlink(path)
        if not named.startswith(f"/memfd:{name} "):
            raise BadRequest(f"process {pid}'s fd {fd} is not an isopool shared-memory segment ({name}); "
                             "shared memory names only the segments the client made for the call")
        mine = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise BadRequest(f"cannot open the client's shared memory (process {pid}, fd {fd}): {exc.strerror}. "
                         "The client must be a live process on this host that this worker's user may read; "
                         "else send arrays as frames (Client(shm=False))") from None
    try:
        target = os.readlink(f"/proc/self/fd/{mine}")  # what was opened, not what the name said before
        if not target.startswith(f"/memfd:{name} "):
            raise BadRequest(f"process {pid}'s fd {fd} is not an isopool shared-memory segment ({name}); "
                             "shared memory names only the segments the client made for the call")
        if os.fstat(mine).st_ino != ino:
            raise BadRequest(f"process {pid}'s fd {fd} is no longer the segment the request named (inode "
                             f"{ino}): the client let it go (a cancelled call?), so its answer has nowhere to go")
    except BaseException:
        os.close(mine)
        raise
    return mine


def map_request(pid: int, fd: int, size: int, ino: int, later: list | None = None) -> memoryview:
    """The request's segment, mapped copy-on-write: read in place, never written back."""
    mine = _open(pid, fd, ino, NAME_IN, os.O_RDONLY)
    try:
        if not fcntl.fcntl(mine, F_GET_SEALS) & SEAL_SHRINK:
            raise BadRequest("the request's shared memory is not sealed against shrinking; a client must seal "
                             "it (client/segments.py) before it sends")
        if os.fstat(mine).st_size < size:
            raise BadRequest(f"the request's shared memory holds {os.fstat(mine).st_size} bytes, fewer than the "
                             f"{size} its header names")
        return map_fd(mine, size, populate=True, later=later)
    finally:
        os.close(mine)


class Place:
    """A RUN's shared memory on the worker: the request's segment mapped (`view`, for the
    decoder), where large results go (`out`), and whether the segment is free again."""

    __slots__ = ("view", "out", "_region")

    def __init__(self, header: dict, maps: "Mappings"):
        spec = header.get("shm")
        self.view = self._region = None
        # [pid, in fd, in bytes, out fd, in inode, out inode]; a stream's parts go as frames
        self.out = (spec[0], spec[3], spec[5]) if spec and not header.get("stream") else None
        if spec and spec[1] >= 0 and spec[2]:
            self.view = map_request(spec[0], spec[1], spec[2], spec[4], later=maps.later)
            self._region = weakref.ref(self.view.obj)

    def take(self) -> memoryview | None:
        """The mapping, for the decoder; this Place keeps no reference to it."""
        view, self.view = self.view, None
        return view

    def released(self) -> bool:
        """True when nothing refers to the request's segment any more: the client may reuse it."""
        return self._region is not None and self._region() is None


def encode_answer(value: object, out: tuple[int, int, int] | None, threshold: int, maps: "Mappings") -> list:
    """[payload, *buffers] of a result; its arrays of `threshold` bytes or more written into the
    client's out segment first when it gave one."""
    if out is None:
        return encode_payload(value)
    spill = Spill(threshold)
    frames = encode_payload(value, spill)
    if spill.parts:
        maps.write(*out, spill)
    return frames


class Mappings:
    """A worker's mappings of its clients' segments.

    Out segments, where large answers go, stay mapped (shared) between requests: writing
    through a mapping already made is a memcpy, where a fresh one pays the kernel's work per
    page again (a 16 MiB answer: 1.2 ms against 5.5 ms for `pwrite` or a new mapping, with
    4 KiB pages). A client reuses its out segments (client/segments.py), so its next answer
    finds its mapping here. The cost: a segment stays allocated while it is mapped, also after
    its client let it go. So at most KEEP mappings and KEEP_BYTES, the least recently used
    dropped first, and `sweep()` (each heartbeat interval, between requests) drops every one
    whose client no longer holds it: closed, or the client gone. A segment outlives its client
    by one interval, or by the model call running when the interval ends if that is longer;
    a worker's death frees them all at once.

    A request's segment is mapped for the request alone (copy-on-write: a model may write its
    inputs), and unmapped by `tidy()`, after the answer has left: undoing 4,096 page-table
    entries is no work for the answer to wait on."""

    KEEP = 4
    KEEP_BYTES = 256 << 20

    def __init__(self) -> None:
        # (client pid, segment inode) -> (the client's fd for it, our mapping of it)
        self.kept: dict[tuple[int, int], tuple[int, memoryview]] = {}
        self.later: list[tuple[int, int]] = []  # request mappings nothing refers to, to unmap

    def tidy(self) -> None:
        while self.later:
            _libc.munmap(*self.later.pop())

    def write(self, pid: int, fd: int, ino: int, spill: Spill) -> None:
        """Copy `spill`'s arrays into the client's out segment (fd `fd`, inode `ino`), grown to
        hold them. A mapping kept is of that very segment: it is written without a look at the
        fd (if the client closed it since, no one reads what is written there)."""
        key = (pid, ino)
        try:
            view = self.kept.pop(key, (fd, None))[1]
            if view is None or len(view) < spill.size:
                view = self._map(pid, fd, ino, spill)
                if view is None:  # not to be mapped: written through the file
                    return
            for offset, data in spill.parts:
                data = _flat(data)
                view[offset:offset + len(data)] = data
            if len(view) <= self.KEEP_BYTES:
                self.kept[key] = (fd, view)  # the most recently used last
        except OSError as exc:
            raise BadRequest(f"cannot write the answer into the client's shared memory: {exc.strerror}; the "
                             "client must leave its out segment open and writable until the answer") from None

    def _map(self, pid: int, fd: int, ino: int, spill: Spill) -> memoryview | None:
        """A new shared mapping of the out segment, as much of it as the answer needs (never the
        whole file, which a client may make huge and sparse to make us allocate it), its pages
        allocated now (ENOMEM here, not a fault mid-copy). Only of a segment sealed against
        shrinking, so no client can make this worker fault; one that is not is written with
        `pwrite`, and not kept."""
        size = -(-spill.size // HUGE) * HUGE
        self._bound(size)
        mine = _open(pid, fd, ino, NAME_OUT, os.O_RDWR)
        try:
            if not fcntl.fcntl(mine, F_GET_SEALS) & SEAL_SHRINK:
                write_parts(mine, spill.parts)
                return None
            if os.fstat(mine).st_size < size:
                os.ftruncate(mine, size)
            view = map_fd(mine, size, shared=True)
            if _libc.madvise(ctypes.addressof(view.obj), size, MADV_POPULATE_WRITE) \
                    and ctypes.get_errno() != errno.EINVAL:  # EINVAL: before Linux 5.14, the copy faults them in
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            return view
        finally:
            os.close(mine)

    def _bound(self, coming: int) -> None:
        """Room for a mapping of `coming` bytes: the least recently used go first."""
        held = sum(len(view) for _, view in self.kept.values())
        for key in list(self.kept):
            if len(self.kept) < self.KEEP and held + coming <= self.KEEP_BYTES:
                break
            held -= len(self.kept.pop(key)[1])

    def sweep(self) -> None:
        """Drop the mappings of segments their clients no longer hold."""
        for (pid, ino), (fd, _) in list(self.kept.items()):
            try:
                held = os.stat(f"/proc/{pid}/fd/{fd}").st_ino == ino
            except OSError:
                held = False
            if not held:
                del self.kept[(pid, ino)]


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
