"""A worker's side of shared memory (protocol/shm.py): its clients' segments, opened, mapped, kept.

    RUN with "shm" ──Place──► the request's segment mapped copy-on-write: the mapping kept
                              from the client's last request on that segment, or a new one
    the inputs gone ────────► the mapping back to Mappings, kept for the next request on
                              the segment, unless the model wrote to it
    RESULT ──encode_answer──► large arrays written into the client's out segment, through a
                              mapping kept from its last answer
    each heartbeat interval ──sweep()──► mappings of segments their clients let go, dropped

A mapping made anew costs the kernel's work per page (4,096 of them for a 16 MiB array, 4 KiB
pages) on top of the copy, and undoing it as much again; kept, the next request on the same
segment costs neither (docs/performance.md, "Kept mappings").
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import weakref

from isopool.protocol.codec import encode_payload
from isopool.protocol.errors import BadRequest
from isopool.protocol.shm import (F_GET_SEALS, HUGE, MADV_POPULATE_WRITE, NAME_IN, NAME_OUT, SEAL_SHRINK, Spill,
                                  _flat, _libc, map_fd, mmap_fd, untouched, write_parts)


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
        opened = os.fstat(mine)
        if opened.st_ino != ino or opened.st_dev != _memfd_device():
            raise BadRequest(f"process {pid}'s fd {fd} is no longer the segment the request named (inode "
                             f"{ino}): the client let it go (a cancelled call?), so its answer has nowhere to go")
    except BaseException:
        os.close(mine)
        raise
    return mine


def _holds(pid: int, fd: int, ino: int, name: str) -> bool:
    """Does process `pid` hold our segment `ino` (an isopool memfd called `name`) at `fd` now?
    The name first, as `_open` does: a stat of whatever else the fd is could wait forever (a
    file of a FUSE mount whose daemon never answers), and only a memfd is on the memfds' device."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{name} "):
            return False
        held = os.stat(path)
    except OSError:
        return False
    return held.st_ino == ino and held.st_dev == _memfd_device()


@functools.cache
def _memfd_device() -> int:
    probe = os.memfd_create("isopool-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(probe).st_dev
    finally:
        os.close(probe)


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
            self.view = maps.request(spec[0], spec[1], spec[2], spec[4])
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
    """A worker's mappings of its clients' segments, kept between requests.

    Out segments, where large answers go, are mapped shared: writing through a mapping already
    made is a memcpy, where a fresh one pays the kernel's work per page again (a 16 MiB
    answer: 1.2 ms against 5.5 ms for `pwrite` or a new mapping, with 4 KiB pages).

    A request's segment is mapped copy-on-write (a model may write its inputs; its writes stay
    its own) and lent to that request alone. When the request's views are all gone the mapping
    comes back (`back`), and `tidy()` keeps it for the client's next request on the segment if
    no page of it was written (`untouched`): a client reuses an in segment only after the
    worker said nothing refers to it, and writes its next request's arrays over it, which an
    unwritten page of the mapping shows as they are. A written one is unmapped.

    A client reuses its segments (client/segments.py), so its next call finds them mapped
    here. The cost: a segment stays allocated while it is mapped, also after its client let it
    go. So at most KEEP mappings of each kind and KEEP_BYTES of both, the least recently used
    dropped first, and `sweep()` (each heartbeat interval, between requests) drops every one
    whose client no longer holds it: closed, or the client gone. A segment outlives its client
    by one interval, or by the model call running when the interval ends if that is longer;
    a worker's death frees them all at once."""

    KEEP = 4
    KEEP_BYTES = 256 << 20

    def __init__(self) -> None:
        # (client pid, segment inode) -> (the client's fd for it, our mapping of it)
        self.kept: dict[tuple[int, int], tuple[int, memoryview]] = {}
        # the same, of request segments mapped and not lent: -> (fd, address, bytes)
        self.inputs: dict[tuple[int, int], tuple[int, int, int]] = {}
        self.back: list[tuple[tuple[int, int], int, int, int]] = []  # lent, and nothing refers to them now
        self.later: list[tuple[int, int]] = []  # request mappings to unmap: (address, bytes)

    def request(self, pid: int, fd: int, size: int, ino: int) -> memoryview:
        """The first `size` bytes of the request's segment (the client's `fd`, inode `ino`),
        mapped copy-on-write, for this request alone until its views are gone."""
        self._settle()  # what the last request gave back, kept in time for this one
        key = (pid, ino)
        kept = self.inputs.pop(key, None)
        if kept is not None and (kept[2] < size or not _holds(pid, fd, ino, NAME_IN)):
            self.later.append(kept[1:])
            kept = None
        if kept is None:
            kept = fd, *self._map_request(pid, fd, size, ino)
        _, addr, mapped = kept
        region = (ctypes.c_char * mapped).from_address(addr)
        # not at exit: a model's thread may still read it then, and the process's end unmaps it
        weakref.finalize(region, _given_back, weakref.ref(self), (key, fd, addr, mapped)).atexit = False
        return memoryview(region).cast("B")[:size]

    def _map_request(self, pid: int, fd: int, size: int, ino: int) -> tuple[int, int]:
        """(address, bytes) of a new mapping of the request's segment, checked first: sealed
        against shrinking (no client can make this worker fault) and as large as named."""
        mine = _open(pid, fd, ino, NAME_IN, os.O_RDONLY)
        try:
            if not fcntl.fcntl(mine, F_GET_SEALS) & SEAL_SHRINK:
                raise BadRequest("the request's shared memory is not sealed against shrinking; a client must seal "
                                 "it (client/segments.py) before it sends")
            held = os.fstat(mine).st_size
            if held < size:
                raise BadRequest(f"the request's shared memory holds {held} bytes, fewer than the {size} its "
                                 "header names")
            mapped = min(held, -(-size // HUGE) * HUGE)  # room for a slightly larger next request
            try:
                return mmap_fd(mine, mapped, populate=size), mapped
            except OSError as exc:
                raise BadRequest(f"cannot map the request's shared memory: {exc.strerror}") from None
        finally:
            os.close(mine)

    def tidy(self) -> None:
        """Between requests: keep the request mappings given back that no one wrote to, and
        unmap the rest (4,096 page-table entries for 16 MiB: no work for an answer to wait on)."""
        self._settle()
        self._unmap_later()

    def _unmap_later(self) -> None:
        while self.later:
            _libc.munmap(*self.later.pop())

    def _settle(self) -> None:
        while self.back:
            key, fd, addr, size = self.back.pop(0)  # in the order they came back: the last, the most recent
            if key in self.inputs or size > self.KEEP_BYTES or not untouched(addr, size, offer=True):
                self.later.append((addr, size))
                continue
            self._bound(self.inputs, size)
            self.inputs[key] = (fd, addr, size)  # the most recently used last

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
        self._bound(self.kept, size)
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

    def held(self) -> int:
        return sum(len(view) for _, view in self.kept.values()) + sum(size for _, _, size in self.inputs.values())

    def _bound(self, kind: dict, coming: int) -> None:
        """Room for one more mapping of `kind`, of `coming` bytes: the least recently used of its
        kind go first, then of the other if the bytes are still too many."""
        held = self.held()
        other = self.inputs if kind is self.kept else self.kept
        for mappings, key in [*((kind, key) for key in kind), *((other, key) for key in other)]:
            if len(kind) < self.KEEP and held + coming <= self.KEEP_BYTES:
                break
            held -= self._drop(mappings, key)

    def _drop(self, kind: dict, key: tuple[int, int]) -> int:
        gone = kind.pop(key)
        if kind is self.inputs:
            self.later.append(gone[1:])
            return gone[2]
        return len(gone[1])  # unmapped with its last view

    def __del__(self) -> None:  # mappings of no use to anyone now (a worker's die with it)
        self.later += [entry[1:] for entry in self.inputs.values()] + [entry[2:] for entry in self.back]
        self.inputs, self.back = {}, []
        self._unmap_later()

    def sweep(self) -> None:
        """Drop the mappings of segments their clients no longer hold."""
        self._settle()  # those given back since the last request among them
        for kind, name in ((self.kept, NAME_OUT), (self.inputs, NAME_IN)):
            for (pid, ino), entry in list(kind.items()):
                if not _holds(pid, entry[0], ino, name):
                    self._drop(kind, (pid, ino))
        self._unmap_later()


def _given_back(maps: "weakref.ref[Mappings]", entry: tuple[tuple[int, int], int, int, int]) -> None:
    """A lent request mapping that nothing refers to now: back to its Mappings, or unmapped."""
    owner = maps()
    if owner is None:
        _libc.munmap(entry[2], entry[3])
    else:
        owner.back.append(entry)
