"""docs/protocol.md is enough to write a client: this one uses only pyzmq, msgpack, struct
and what that page says, against a live pool."""

from __future__ import annotations

import struct

import msgpack
import zmq

STREAMING = "isopool.examples.streaming:Countdown"


class Raw:
    """A client written from docs/protocol.md alone."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, op: str, rid, payload=None, buffers=(), **fields) -> None:
        header = msgpack.packb({"v": 1, "op": op, "id": rid, **fields})
        self.sock.send_multipart([header, msgpack.packb(payload, use_bin_type=True), *buffers])

    def recv(self) -> tuple[dict, object, list[bytes]]:
        assert self.sock.poll(30_000), "no reply within 30 s"
        header, payload, *buffers = self.sock.recv_multipart()
        return msgpack.unpackb(header), msgpack.unpackb(payload, strict_map_key=False), buffers

    def close(self) -> None:
        self.sock.close()


def array(dtype: str, shape: list[int], index: int) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, shape, index, 0]))


def test_a_client_from_the_protocol_page_alone(pool):
    raw = Raw(pool.endpoint)
    try:
        raw.send("hello", 1)
        header, limits, _ = raw.recv()
        assert header == {"v": 1, "op": "result", "id": 1}
        assert set(limits["limits"]) >= {"max_message_bytes", "max_depth", "max_elements", "max_buffers"}

        x = struct.pack("<16f", *range(16))  # the built-in model: 16 float32 in, 4 out
        raw.send("infer", 2, array("float32", [16], 0), [x], timeout=10.0)
        header, payload, buffers = raw.recv()
        assert (header["op"], header["id"]) == ("result", 2)
        assert isinstance(payload, msgpack.ExtType) and payload.code == 1
        dtype, shape, index, origin = msgpack.unpackb(payload.data)
        assert (dtype, shape, index) == ("float32", [4], 0) and origin in (0, 1)
        assert len(struct.unpack("<4f", buffers[index])) == 4

        raw.send("infer", "as-a-list", list(map(float, range(16))))  # a plain msgpack array works too
        header, payload, buffers = raw.recv()
        assert header["id"] == "as-a-list" and header["op"] == "result"

        raw.send("infer", 3, [1.0, 2.0])  # the model raises: RemoteError with its traceback
        header, err, _ = raw.recv()
        assert header["op"] == "error" and err["type"] == "RemoteError" and "Traceback" in err["traceback"]

        raw.send("infer", 4, array("float32", [16], 0), [b"\0" * 8])  # the shape lies: BadRequest
        header, err, _ = raw.recv()
        assert (header["op"], header["id"], err["type"]) == ("error", 4, "BadRequest")

        raw.sock.send_multipart([msgpack.packb({"v": 2, "op": "infer", "id": 5}), msgpack.packb(None)])
        header, err, _ = raw.recv()
        assert err["type"] == "BadRequest" and "v1" in err["message"]

        raw.send("infer", 6, None, timeout=-1)  # a header field out of range names the field
        header, err, _ = raw.recv()
        assert err["type"] == "BadRequest" and err["field"] == "timeout"

        raw.send("status", 7)
        header, status, _ = raw.recv()
        assert header["id"] == 7 and status["pool"]["workers_ready"] == 2 and status["workers"]

        raw.send("control", 8, action="scale", args={"workers": 2})
        header, answer, _ = raw.recv()
        assert header["op"] == "result" and answer["workers_target"] == 2
    finally:
        raw.close()


def test_a_stream_on_the_wire_is_chunks_then_a_nil_result(start_pool):
    pool = start_pool("--workers", "1", "--model", STREAMING)
    raw = Raw(pool.endpoint)
    try:
        raw.send("infer", 1, {"n": 3, "tag": "w"}, stream=True)
        parts = []
        while True:
            header, payload, _ = raw.recv()
            assert header["id"] == 1
            if header["op"] == "result":
                assert payload is None
                break
            assert header["op"] == "chunk"
            parts.append(payload)
        assert parts == [{"tag": "w", "i": i} for i in range(3)]
        raw.send("infer", 2, {"n": 3})  # no stream: true: refused, nothing ran
        header, err, _ = raw.recv()
        assert err["type"] == "BadRequest" and "stream" in err["message"]
    finally:
        raw.close()
