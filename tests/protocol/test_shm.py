"""Shared-memory segments in one process: the client's encoding, the supervisor's check (which
never opens them) and the worker's mapping, each refusing what could fault or cross a client."""

from __future__ import annotations

import fcntl
import gc
import os

import numpy as np
import pytest
import torch

from isopool.protocol import BadRequest, Limits, decode_payload, encode_payload, validate_payload
from isopool.protocol import shm
from isopool.client.segments import IDLE, Pool, Segments
from isopool.protocol.shm import Spill, segments_in
from isopool.worker.segments import Mappings, Place

BIG = 1 << 20


def spilled(value, threshold=BIG, pool=None):
    spill = Spill(threshold)
    frames = encode_payload(value, spill)
    return frames, Segments(spill, pool or Pool())


def test_large_arrays_go_to_the_segment_and_come_back_equal_and_aligned():
    big = np.random.default_rng(0).standard_normal(BIG // 4 + 3).astype(np.float32)
    tensor = torch.arange(BIG // 8, dtype=torch.float64)
    small = np.arange(10, dtype=np.int16)
    value = {"big": big, "t": tensor, "small": small, "more": [big[:5], "text"]}
    frames, segs = spilled(value)
    try:
        assert len(frames) == 3  # the payload and the two small arrays' frames: the large ones are not there
        assert sum(len(f) for f in frames) < 4096
        assert segs.used % shm.ALIGN == 0 and segs.used >= big.nbytes + tensor.numel() * 8
        validate_payload(frames, segment=segs.used)
        view = Mappings().request(os.getpid(), segs.seg_in.fd, segs.used, segs.seg_in.ino)
        out = decode_payload(frames, segment=view)
        assert np.array_equal(out["big"], big) and not out["big"].flags.writeable
        assert isinstance(out["t"], torch.Tensor) and torch.equal(out["t"], tensor)
        out["t"][0] = 99.0  # the worker's own copy-on-write page: the client's segment keeps its bytes
        assert torch.equal(decode_payload(frames, segment=Mappings().request(os.getpid(), segs.seg_in.fd, segs.used,
                                                                           segs.seg_in.ino))["t"],
                           tensor)
        assert np.array_equal(out["small"], small) and out["more"][1] == "text"
    finally:
        segs.close()


def test_the_supervisor_refuses_offsets_outside_the_segment_and_a_missing_one():
    frames, segs = spilled(np.zeros(BIG, dtype=np.uint8))
    segs.close()
    with pytest.raises(BadRequest, match="inside the segment"):
        validate_payload(frames, segment=BIG - 1)
    with pytest.raises(BadRequest, match="has none"):
        validate_payload(frames)
    with pytest.raises(BadRequest, match="max_message_bytes"):
        validate_payload(frames, Limits(max_message_bytes=BIG), segment=BIG)


def test_the_worker_maps_only_a_sealed_isopool_segment_of_the_size_named(tmp_path):
    unsealed = os.memfd_create(shm.NAME_IN, os.MFD_ALLOW_SEALING)
    os.pwrite(unsealed, b"x" * 4096, 0)
    other = os.memfd_create("someone-else", os.MFD_ALLOW_SEALING)
    path = tmp_path / "file"
    path.write_bytes(b"secret")
    plain = os.open(path, os.O_RDONLY)
    frames, segs = spilled(np.zeros(BIG, dtype=np.uint8))
    try:
        ino = lambda fd: os.fstat(fd).st_ino
        with pytest.raises(BadRequest, match="not sealed"):
            Mappings().request(os.getpid(), unsealed, 4096, ino(unsealed))
        for fd in (other, plain):
            with pytest.raises(BadRequest, match="not an isopool shared-memory segment"):
                Mappings().request(os.getpid(), fd, 6, ino(fd))
        with pytest.raises(BadRequest, match="fewer than"):
            Mappings().request(os.getpid(), segs.seg_in.fd, segs.seg_in.size + 4096, segs.seg_in.ino)
        with pytest.raises(BadRequest, match="cannot open"):
            Mappings().request(os.getpid(), 10_000, 16, 1)
        # the fd of the segment named, but another segment behind it now (a call cancelled, its fd reused)
        with pytest.raises(BadRequest, match="no longer the segment the request named"):
            Mappings().request(os.getpid(), segs.seg_in.fd, segs.used, ino(unsealed))
        with pytest.raises(PermissionError):  # a client cannot shrink what a worker may have mapped
            os.ftruncate(segs.seg_in.fd, 0)
    finally:
        for fd in (unsealed, other, plain):
            os.close(fd)
        segs.close()


def test_an_answer_written_into_the_out_segment_is_mapped_and_its_segment_reused_when_gone():
    big = np.arange(BIG // 4, dtype=np.int32)
    pool = Pool()
    segs = Segments(Spill(BIG), pool)
    assert segs.seg_in is None and segs.seg_out is not None  # nothing large to send: only somewhere for the answer
    out_fd = segs.seg_out.fd
    spill = Spill(BIG)
    frames = encode_payload({"y": big}, spill)
    maps = Mappings()
    maps.write(os.getpid(), out_fd, segs.seg_out.ino, spill)
    out = decode_payload(frames, segment=segs.answer(reuse=False))
    assert np.array_equal(out["y"], big) and pool.idle_out == []
    del out  # the answer's arrays gone: its segment comes back, and the next call writes into it
    pool.settle()
    assert [s.fd for s in pool.idle_out] == [out_fd]
    segs = Segments(Spill(BIG), pool)
    assert segs.seg_out.fd == out_fd
    frames = encode_payload({"y": big[::-1].copy()}, spill := Spill(BIG))
    maps.write(os.getpid(), out_fd, segs.seg_out.ino, spill)  # through the mapping the first answer made
    assert len(maps.kept) == 1
    assert np.array_equal(decode_payload(frames, segment=segs.answer(reuse=False))["y"], big[::-1])


def test_a_client_keeps_its_mapping_of_an_out_segment_for_the_next_answer_unless_it_wrote_to_it():
    pool, maps = Pool(), Mappings()
    big = np.arange(BIG // 4, dtype=np.int32)

    def answer(value, arrays="numpy"):
        segs = Segments(Spill(BIG), pool)
        frames = encode_payload({"y": value}, spill := Spill(BIG))
        maps.write(os.getpid(), segs.seg_out.fd, segs.seg_out.ino, spill)
        return segs.seg_out, decode_payload(frames, segment=segs.answer(reuse=False), arrays=arrays)["y"]

    seg, y = answer(big)
    addr = y.ctypes.data
    assert np.array_equal(y, big) and seg.kept is None
    del y  # gone: the segment back to the pool, with our mapping of it
    pool.settle()
    assert pool.idle_out == [seg] and seg.kept is not None
    again, y = answer(big * 2)
    assert again is seg and y.ctypes.data == addr and np.array_equal(y, big * 2)  # the same pages, new bytes
    del y
    again, t = answer(big * 3, arrays="torch")  # torch answers are writable
    assert torch.equal(t, torch.from_numpy(big * 3))
    t[0] = -1  # that page is now this process's own copy: the mapping must not show it next time
    del t
    pool.settle()
    assert seg.kept is None  # so it was unmapped
    again, y = answer(big * 4)
    assert np.array_equal(y, big * 4)
    del y
    pool.close()
    maps.sweep()
    assert seg.kept is None and segments_in(os.getpid()) == []


def test_the_next_call_takes_the_answered_segment_and_looks_at_its_mapping_only_once_sent():
    """Looking at a 16 MiB mapping's pages takes 0.1-0.4 ms: a call takes the segment whose
    answer went last with its mapping waiting, and looks once the call is on its way
    (Segments.settle, from Session.sent); an answer that comes first looks itself."""
    pool, maps = Pool(), Mappings()
    big = np.arange(BIG // 4, dtype=np.int32)

    def write(segs, value):
        frames = encode_payload({"y": value}, spill := Spill(BIG))
        maps.write(os.getpid(), segs.seg_out.fd, segs.seg_out.ino, spill)
        return frames

    segs = Segments(Spill(BIG), pool)
    seg, y = segs.seg_out, decode_payload(write(segs, big), segment=segs.answer(reuse=False))["y"]
    addr = y.ctypes.data
    del y
    segs = Segments(Spill(BIG), pool)  # no pool.settle(): the call takes it from the answers that went
    assert segs.seg_out is seg and len(seg.waiting) == 1 and seg.kept is None and len(pool.back) == 0
    segs.settle()  # sent
    assert seg.waiting == [] and seg.kept is not None
    t = decode_payload(write(segs, big * 2), segment=segs.answer(reuse=False), arrays="torch")["y"]
    assert t.data_ptr() == addr and torch.equal(t, torch.from_numpy(big * 2))  # through the mapping kept
    t[0] = -1  # torch answers are writable: that page is now ours
    del t
    segs = Segments(Spill(BIG), pool)
    assert segs.seg_out is seg and len(seg.waiting) == 1
    frames = write(segs, big * 3)  # the answer came before the look: the answer looks itself
    y = decode_payload(frames, segment=segs.answer(reuse=False))["y"]
    assert seg.waiting == [] and np.array_equal(y, big * 3)  # the written mapping was not the one read
    del y
    segs = Segments(Spill(BIG), pool)
    segs.close()  # a call that failed: its segments close, the mapping waiting with them
    assert seg.fd < 0 and seg.waiting == [] and seg.kept is None
    pool.close()
    maps.sweep()
    assert segments_in(os.getpid()) == []


def test_an_answer_collected_while_its_pool_is_locked_comes_back_without_a_deadlock():
    """The collector may run an answer's finalizer anywhere, on this thread inside the pool's
    own lock too: the finalizer only queues its segment, and the pool takes it back later."""
    pool, maps = Pool(), Mappings()
    segs = Segments(Spill(BIG), pool)
    seg = segs.seg_out
    frames = encode_payload({"y": np.ones(BIG, dtype=np.uint8)}, spill := Spill(BIG))
    maps.write(os.getpid(), seg.fd, seg.ino, spill)
    held = [decode_payload(frames, segment=segs.answer(reuse=False))]
    held.append(held)  # a cycle: only the collector frees it
    del held
    with pool.lock:
        gc.collect()  # the finalizer runs here
    assert pool.idle_out == [] and len(pool.back) == 1
    pool.settle()
    assert pool.idle_out == [seg] and seg.kept is not None and pool.lent == 0
    pool.close()
    maps.sweep()
    assert segments_in(os.getpid()) == []


def test_a_worker_keeps_out_segments_mapped_only_while_their_client_holds_them_and_within_its_bounds(monkeypatch):
    pool, maps, spill = Pool(), Mappings(), Spill(BIG)
    encode_payload(np.ones(BIG, dtype=np.uint8), spill)
    segs = [Segments(Spill(BIG), pool) for _ in range(Mappings.KEEP + 2)]
    key = lambda s: (os.getpid(), s.seg_out.ino)
    mapped = lambda: sum(1 for line in shm.segments_in(os.getpid()) if line.startswith("map:"))
    try:
        for s in segs:
            maps.write(os.getpid(), s.seg_out.fd, s.seg_out.ino, spill)
        assert list(maps.kept) == [key(s) for s in segs[2:]]  # the least recently used went first
        assert mapped() == Mappings.KEEP
        gone = segs.pop(2)
        gone.close()  # the client lets one go: its mapping goes at the next sweep
        maps.sweep()
        assert list(maps.kept) == [key(s) for s in segs[2:]] and mapped() == Mappings.KEEP - 1
        monkeypatch.setattr(Mappings, "KEEP_BYTES", shm.HUGE)  # room for one: the last one written
        maps.write(os.getpid(), segs[0].seg_out.fd, segs[0].seg_out.ino, spill)
        assert list(maps.kept) == [key(segs[0])] and mapped() == 1
    finally:
        for s in segs:
            s.close()
    maps.sweep()  # its client closed every segment: none is kept
    assert maps.kept == {} and mapped() == 0


def test_an_in_segment_is_reused_only_when_the_worker_says_so_and_the_pool_is_bounded():
    pool = Pool()
    value = np.ones(BIG, dtype=np.uint8)
    _, segs = spilled(value, pool=pool)
    fd = segs.seg_in.fd
    segs.answer(reuse=True)
    _, again = spilled(value * 2, pool=pool)
    assert again.seg_in.fd == fd  # the same pages, written over
    maps = Mappings()
    assert np.array_equal(np.frombuffer(maps.request(os.getpid(), fd, BIG, again.seg_in.ino), dtype=np.uint8), value * 2)
    again.answer(reuse=False)  # the worker may still see it: closed, never reused
    assert pool.idle_in == []
    many = [spilled(value, pool=pool)[1] for _ in range(IDLE + 3)]
    for segs in many:
        segs.answer(reuse=True)
    assert len(pool.idle_in) == IDLE
    _, larger = spilled(np.ones(4 * BIG, dtype=np.uint8), pool=pool)  # fits none of the idle ones
    larger.answer(reuse=True)
    assert len(pool.idle_in) == IDLE and pool.idle_in[-1].size >= 4 * BIG  # kept; the oldest went
    pool.close()
    del many, segs, again, larger
    maps.sweep()  # the worker's mapping of the first segment, kept until its client let it go
    assert segments_in(os.getpid()) == []


def test_a_worker_says_reuse_only_when_no_view_of_the_request_is_left():
    frames, segs = spilled({"a": np.ones(BIG, dtype=np.uint8)})
    header = {"shm": segs.header()}
    maps = Mappings()
    place = Place(header, maps)
    inputs = decode_payload(frames, segment=place.take())
    assert not place.released()
    kept = inputs["a"][:10]
    del inputs
    assert not place.released()  # a model that kept a slice of its input: the client must not reuse it
    del kept
    assert place.released() and len(maps.back) == 1  # given back: kept or unmapped once the answer has left
    maps.tidy()
    assert list(maps.inputs) == [(os.getpid(), segs.seg_in.ino)] and maps.back == []
    segs.close()
    maps.sweep()  # its client let it go: so does the worker
    assert maps.inputs == {} and segments_in(os.getpid()) == []


def test_a_request_mapping_is_kept_for_the_next_request_only_while_no_page_of_it_was_written():
    pool, maps = Pool(), Mappings()
    first = np.full(BIG, 1, dtype=np.uint8)

    def request(value):
        frames, segs = spilled({"a": value}, pool=pool)
        place = Place({"shm": segs.header()}, maps)
        return segs, place, decode_payload(frames, segment=place.take(), arrays="torch")["a"]

    segs, place, a = request(first)
    addr = a.data_ptr()
    assert torch.equal(a, torch.from_numpy(first))
    del a
    segs.answer(reuse=place.released())
    maps.tidy()
    assert len(maps.inputs) == 1
    segs, place, a = request(first * 2)  # the client's next request, written over the same segment
    assert a.data_ptr() == addr and torch.equal(a, torch.from_numpy(first * 2))  # the same mapping, new bytes
    a[BIG // 2] = 9  # the model writes its input: that page is now the worker's own copy
    del a
    segs.answer(reuse=place.released())
    maps.tidy()
    assert maps.inputs == {} and maps.later == []  # so the mapping is not kept, but unmapped
    segs, place, a = request(first * 3)
    assert torch.equal(a, torch.from_numpy(first * 3))  # mapped anew: no page of the old write shows
    del a
    segs.answer(reuse=place.released())
    pool.close()
    maps.sweep()
    assert maps.inputs == {} and segments_in(os.getpid()) == []


def test_a_kept_mapping_is_lent_only_while_the_fd_named_is_still_that_segment(tmp_path):
    """A client that puts something else on its segment's fd after the worker kept a mapping of
    it gets BadRequest, never the old bytes; and the worker looks at the fd's name before any
    stat (a file of a dead FUSE mount would hold a stat forever)."""
    pool, maps = Pool(), Mappings()
    frames, segs = spilled({"a": np.ones(BIG, dtype=np.uint8)}, pool=pool)
    place = Place({"shm": segs.header()}, maps)
    del place.view, place
    maps.tidy()
    assert len(maps.inputs) == 1
    os.mkfifo(tmp_path / "fifo")
    fifo = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    saved = os.dup(segs.seg_in.fd)
    try:
        os.dup2(fifo, segs.seg_in.fd)  # the same fd number, now a FIFO
        with pytest.raises(BadRequest, match="not an isopool shared-memory segment"):
            maps.request(os.getpid(), segs.seg_in.fd, segs.used, segs.seg_in.ino)
        assert maps.inputs == {}  # and the kept mapping is gone with it
    finally:
        os.dup2(saved, segs.seg_in.fd)
        for fd in (saved, fifo):
            os.close(fd)
    segs.close()
    pool.close()
    maps.sweep()
    assert segments_in(os.getpid()) == []


def test_a_segment_dropped_without_close_lets_go_of_its_fds():
    _, segs = spilled(np.zeros(BIG, dtype=np.uint8))
    assert len([s for s in segments_in(os.getpid()) if s.startswith("fd")]) == 2
    del segs
    assert segments_in(os.getpid()) == []
