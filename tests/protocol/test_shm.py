"""Shared-memory segments in one process: the client's encoding, the supervisor's check (which
never opens them) and the worker's mapping, each refusing what could fault or cross a client."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest
import torch

from isopool.protocol import BadRequest, Limits, decode_payload, encode_payload, validate_payload
from isopool.protocol import shm
from isopool.protocol.shm import Segments, Spill, map_request, segments_in

BIG = 1 << 20


def spilled(value, threshold=BIG):
    spill = Spill(threshold)
    frames = encode_payload(value, spill)
    return frames, Segments(spill)


def test_large_arrays_go_to_the_segment_and_come_back_equal_and_aligned():
    big = np.random.default_rng(0).standard_normal(BIG // 4 + 3).astype(np.float32)
    tensor = torch.arange(BIG // 8, dtype=torch.float64)
    small = np.arange(10, dtype=np.int16)
    value = {"big": big, "t": tensor, "small": small, "more": [big[:5], "text"]}
    frames, segs = spilled(value)
    try:
        assert len(frames) == 3  # the payload and the two small arrays' frames: the large ones are not there
        assert sum(len(f) for f in frames) < 4096
        assert segs.size_in % shm.ALIGN == 0 and segs.size_in >= big.nbytes + tensor.numel() * 8
        validate_payload(frames, segment=segs.size_in)
        view = map_request(os.getpid(), segs.fd_in, segs.size_in)
        out = decode_payload(frames, segment=view)
        assert np.array_equal(out["big"], big) and not out["big"].flags.writeable
        assert isinstance(out["t"], torch.Tensor) and torch.equal(out["t"], tensor)
        out["t"][0] = 99.0  # the worker's own copy-on-write page: the client's segment keeps its bytes
        assert torch.equal(decode_payload(frames, segment=map_request(os.getpid(), segs.fd_in, segs.size_in))["t"],
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
        with pytest.raises(BadRequest, match="not sealed"):
            map_request(os.getpid(), unsealed, 4096)
        for fd in (other, plain):
            with pytest.raises(BadRequest, match="not an isopool shared-memory segment"):
                map_request(os.getpid(), fd, 6)
        with pytest.raises(BadRequest, match="fewer than"):
            map_request(os.getpid(), segs.fd_in, segs.size_in + 4096)
        with pytest.raises(BadRequest, match="cannot open"):
            map_request(os.getpid(), 10_000, 16)
        fcntl.fcntl(unsealed, shm.F_ADD_SEALS, shm.SEAL_SHRINK)  # a client cannot shrink what is mapped
        with pytest.raises(PermissionError):
            os.ftruncate(segs.fd_in, 0)
    finally:
        for fd in (unsealed, other, plain):
            os.close(fd)
        segs.close()


def test_an_answer_written_into_the_out_segment_is_mapped_and_its_fds_closed():
    big = np.arange(BIG // 4, dtype=np.int32)
    segs = Segments(Spill(BIG))
    assert segs.fd_in == -1 and segs.fd_out >= 0  # nothing large to send: only somewhere for the answer
    spill = Spill(BIG)
    frames = encode_payload({"y": big}, spill)
    shm.write_answer(os.getpid(), segs.fd_out, spill)
    view = segs.answer()
    assert segs.fd_out == -1 and segs.fd_in == -1
    out = decode_payload(frames, segment=view)
    assert np.array_equal(out["y"], big)
    assert [s for s in segments_in(os.getpid()) if s.startswith("fd")] == []  # the mapping alone holds it
    del out, view
    assert segments_in(os.getpid()) == []


def test_a_segment_dropped_without_close_lets_go_of_its_fds():
    _, segs = spilled(np.zeros(BIG, dtype=np.uint8))
    assert len([s for s in segments_in(os.getpid()) if s.startswith("fd")]) == 2
    del segs
    assert segments_in(os.getpid()) == []
