"""A client's shared-memory segments (protocol/shm.py): made, lent to calls, and reused.

    call ──Segments(spill)──► an in segment (its arrays copied into our own mapping of it)
                              and an out segment (empty, or one used before)
    answer ──answer(reuse)──► the out segment mapped: the answer's arrays are views of it;
                              the in segment back to the pool if the worker says "reuse"
    the answer's arrays gone ──► the out segment queued (a finalizer may run anywhere, inside
                              the pool's lock too), taken by the next call; once that call is
                              sent (Segments.settle), our mapping of it is kept for its answer
                              unless a page of it was written
    error, timeout, cancel ──close()──► both closed: a worker may still read the request

A fresh segment costs the kernel a page allocation per 4 KiB, written or not (about as much
as copying the bytes again), so a few segments stay in the pool between calls: at most
IDLE of each kind and IDLE_BYTES in all. A segment is reused only when no one can see it:
an in segment after the worker said nothing refers to it any more, an out segment after
the last array of the answer it held was collected. Reading an answer through a mapping
already made is a copy; through a new one, the kernel maps each page as it is first read
(a 16 MiB answer: 2.8 ms against 1.4 ms to copy it out), so an out segment keeps its
mapping between answers (`Segment.kept`), as a worker keeps its own (worker/segments.py).
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import os
import threading
import weakref

from isopool.protocol.shm import (F_ADD_SEALS, NAME_IN, NAME_OUT, HUGE, SEAL_GROW, SEAL_SEAL, SEAL_SHRINK, Spill, _libc,
                                  map_fd, mmap_fd, untouched)

IDLE = 4  # idle segments of each kind kept for reuse
IDLE_BYTES = 256 << 20  # and their bytes, all kinds together
GRAIN = HUGE  # in segments are made in whole huge pages (2 MiB), so a slightly larger request still fits one


class Segment:
    """One memfd. An in segment has our own shared mapping of it (`view`), to copy arrays in;
    an out segment may have our copy-on-write mapping of it from its last answer (`kept`), or
    that mapping still to be looked at (`waiting`: taken for a call, looked at once the call
    is sent, while its answer is being made)."""

    __slots__ = ("fd", "ino", "size", "view", "kept", "waiting")

    def __init__(self, name: str, size: int = 0):
        self.fd, self.ino, self.size, self.view, self.kept = -1, 0, size, None, None
        self.waiting: list[tuple[int, int]] = []  # at most one (address, bytes); list.pop() takes it once
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)  # EMFILE: nothing to close
        try:
            # which segment this is: a call names it by fd and inode, so a worker that comes late
            # to a cancelled call finds the fd reused by another segment and touches nothing of it
            self.ino = os.fstat(self.fd).st_ino
            if size:  # an in segment: its size for good, so a worker's mapping of it can never fault
                os.ftruncate(self.fd, size)
                fcntl.fcntl(self.fd, F_ADD_SEALS, SEAL_SHRINK | SEAL_GROW | SEAL_SEAL)
                self.view = map_fd(self.fd, size, shared=True)
            else:  # an out segment: the worker may grow it, and nobody shrink it under our mapping
                fcntl.fcntl(self.fd, F_ADD_SEALS, SEAL_SHRINK)
        except BaseException:
            self.close()
            raise

    def bytes(self) -> int:
        return self.size if self.view is not None else os.fstat(self.fd).st_size

    def mapping(self, size: int) -> tuple[int, int]:
        """(address, bytes) of a copy-on-write mapping of at least `size` bytes: the one kept from
        the last answer if it is large enough (its pages already mapped), else a new one."""
        self.settle()
        kept, self.kept = self.kept, None
        if kept is not None:
            if kept[1] >= size:
                return kept
            _libc.munmap(*kept)
        return mmap_fd(self.fd, size), size

    def settle(self) -> None:
        """Look at the mapping an earlier answer left (`waiting`): kept, or unmapped."""
        try:
            addr, size = self.waiting.pop()
        except IndexError:
            return
        self.keep(addr, size)

    def keep(self, addr: int, size: int) -> None:
        """An answer's mapping, its views all gone: kept for the next answer if no page of it
        was written (a written page is ours, and would show the old answer), else unmapped."""
        try:
            clean = self.fd >= 0 and self.kept is None and untouched(addr, size)
        except BaseException:  # noqa: BLE001 - whatever stopped the look: the mapping is not kept
            clean = False
        if clean:
            self.kept = addr, size
        else:
            _libc.munmap(addr, size)

    def close(self) -> None:
        self.view = None  # our mapping goes with its last view
        while self.waiting:
            try:
                _libc.munmap(*self.waiting.pop())
            except IndexError:  # taken meanwhile by settle()
                break
        if self.kept is not None:
            kept, self.kept = self.kept, None
            _libc.munmap(*kept)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:  # an idle segment of a client that is gone
        self.close()


class Pool:
    """The idle segments of one client, thread-safe: answers are collected on any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle_in: list[Segment] = []
        self.idle_out: list[Segment] = []
        self.lent = 0  # out segments under answers still held, each to come back (at most IDLE)
        # out segments whose answers are gone, with our mappings: (segment, address, bytes)
        self.back: collections.deque[tuple[Segment, int, int]] = collections.deque()
        self.closed = False

    def answered(self, seg: Segment, addr: int, size: int) -> None:
        """An answer's last view is gone. Run by a finalizer, on whatever thread the collector
        ran, maybe inside this pool's lock on this very thread: so it only queues the segment,
        and `settle()`, outside the lock, takes it back."""
        if self.closed:
            _libc.munmap(addr, size)
            seg.close()
        else:
            self.back.append((seg, addr, size))

    def settle(self) -> None:
        while True:
            try:
                seg, addr, size = self.back.popleft()
            except IndexError:
                return
            try:
                seg.keep(addr, size)
            finally:
                self.give(seg, lent=True)

    def take_in(self, size: int) -> Segment:
        with self.lock:
            fits = [s for s in self.idle_in if s.size >= size]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self.idle_in.remove(seg)
                return seg
        return Segment(NAME_IN, -(-size // GRAIN) * GRAIN)

    def take_out(self) -> Segment:
        """An out segment: the one whose answer went last, its mapping to be looked at once the
        call is sent (Segments.settle: the look is work no answer waits on), else an idle one."""
        while True:
            try:
                seg, addr, size = self.back.pop()  # the most recent: its pages likeliest cached
            except IndexError:
                break
            with self.lock:
                self.lent -= 1
                closed = self.closed
            seg.waiting.append((addr, size))
            if seg.fd >= 0 and not closed:
                return seg
            seg.close()  # its mapping with it
        with self.lock:
            if self.idle_out:
                return self.idle_out.pop()
        return Segment(NAME_OUT)

    def lend(self) -> bool:
        """May one more out segment stay open under an answer, to come back when it is gone?"""
        self.settle()
        with self.lock:
            if self.lent >= IDLE:
                return False
            self.lent += 1
            return True

    def give(self, seg: Segment, lent: bool = False) -> None:
        """Keep `seg` for reuse, closing the least recently used idle segments past the bounds
        (so a client whose arrays grew keeps segments of the size it sends now)."""
        gone: list[Segment] = []
        with self.lock:
            self.lent -= lent
            if self.closed or seg.fd < 0 or seg.bytes() > IDLE_BYTES:
                gone.append(seg)
            else:
                idle = self.idle_in if seg.view is not None else self.idle_out
                idle.append(seg)
                gone += idle[:-IDLE]  # the oldest of its kind past IDLE
                del idle[:-IDLE]
                gone += self._past_bytes(keep=seg)
        for old in gone:
            old.close()

    def _past_bytes(self, keep: Segment) -> list[Segment]:
        """The oldest idle segments (ins, then outs) past IDLE_BYTES, taken out of the pool;
        never `keep`. Under the lock."""
        sized = [(s.bytes(), s) for s in (*self.idle_in, *self.idle_out)]
        held = sum(size for size, _ in sized)
        out = []
        for size, old in sized:
            if held <= IDLE_BYTES:
                break
            if old is not keep:
                (self.idle_in if old.view is not None else self.idle_out).remove(old)
                out.append(old)
                held -= size
        return out

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle, self.idle_in, self.idle_out = [*self.idle_in, *self.idle_out], [], []
        for seg in idle:
            seg.close()
        self.settle()  # closed: each is closed as it comes

    def __del__(self) -> None:  # answers that went after close() and before it saw them
        self.settle()


class Lease:
    """An in segment lent to a caller that fills it itself (the HTTP gateway reads a request's
    body straight into one: gateway/body.py), then names it as a call's `home` (Spill): the
    call's arrays that lie in it are not copied. The call never gives it back to the pool nor
    closes it; it records whether it may be reused: only once the worker said `reuse` of a call
    that named it (its answer came, so the request's frames, which may refer to the lease for
    its smaller arrays, have all left). `release()`, once the caller is done with every view
    of `view`, gives it back or closes it; a lease dropped unreleased closes it."""

    __slots__ = ("pool", "seg", "view", "reusable")

    def __init__(self, pool: Pool, size: int):
        self.pool, self.seg, self.view, self.reusable = pool, None, None, False
        self.seg = pool.take_in(size)  # OSError (no fd, no memory left): the caller goes without
        self.view = self.seg.view[:size]

    def release(self) -> None:
        seg, self.seg, self.view = self.seg, None, None
        if seg is not None:
            self.pool.give(seg) if self.reusable else seg.close()

    def __del__(self) -> None:
        seg, self.seg = self.seg, None
        if seg is not None:
            seg.close()


class Segments:
    """A call's two segments: its request's arrays, and where its answer's go."""

    __slots__ = ("pool", "seg_in", "used", "seg_out", "lease")

    def __init__(self, spill: Spill, pool: Pool, lease: Lease | None = None):
        self.pool, self.seg_in, self.used, self.seg_out, self.lease = pool, None, spill.size, None, None
        try:
            if lease is not None:  # the arrays lie in it already (spill.home): nothing to copy
                self.seg_in, self.lease, self.used = lease.seg, lease, len(lease.view)
            elif spill.parts:
                self.seg_in = seg = pool.take_in(spill.size)
                for offset, data in spill.parts:
                    seg.view[offset:offset + len(data)] = data  # one copy, into pages already ours
            self.seg_out = pool.take_out()
        except BaseException:
            self.close()
            raise

    def settle(self) -> None:
        """The call is sent: look at the mapping its out segment kept from an earlier answer."""
        seg = self.seg_out
        if seg is not None:
            seg.settle()

    def header(self) -> list:
        seg_in, seg_out = self.seg_in, self.seg_out
        if seg_in is None:
            return [os.getpid(), -1, 0, seg_out.fd, 0, seg_out.ino]
        return [os.getpid(), seg_in.fd, self.used, seg_out.fd, seg_in.ino, seg_out.ino]

    def answer(self, reuse: bool) -> memoryview | None:
        """The out segment as the worker left it, mapped copy-on-write (None if it is empty). The
        in segment goes back to the pool if the worker is done with it (`reuse`)."""
        seg_in, seg_out, self.seg_in, self.seg_out = self.seg_in, self.seg_out, None, None
        if self.lease is not None:
            self.lease.reusable, self.lease = reuse, None  # the lease's holder gives it back
        elif seg_in is not None:
            self.pool.give(seg_in) if reuse else seg_in.close()
        if seg_out is None:
            return None
        pool, lent = self.pool, False
        try:
            size = os.fstat(seg_out.fd).st_size
            if not size:
                pool.give(seg_out)
                return None
            if not pool.lend():  # many answers held: this one keeps its memory, not an fd as well
                view = map_fd(seg_out.fd, size)
                seg_out.close()
                return view
            lent = True
            addr, mapped = seg_out.mapping(size)
            try:
                region = (ctypes.c_char * mapped).from_address(addr)
                weakref.finalize(region, pool.answered, seg_out, addr, mapped).atexit = False
            except BaseException:
                _libc.munmap(addr, mapped)  # no finalizer owns it yet
                raise
            return memoryview(region).cast("B")[:size]
        except BaseException:
            seg_out.close()
            if lent:
                pool.give(seg_out, lent=True)  # closed: it only gives the slot back
            raise

    def close(self) -> None:
        if self.lease is not None:  # a worker may still read it: never reused, closed on release
            self.lease.reusable, self.lease, self.seg_in = False, None, None
        for seg in (self.seg_in, self.seg_out):
            if seg is not None:
                seg.close()
        self.seg_in = self.seg_out = None

    def __del__(self) -> None:  # a call dropped on a path that did not close it still lets go
        self.close()

