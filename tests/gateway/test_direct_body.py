"""A large binary infer body goes from the socket straight into shared memory (gateway/body.py):
the kernel's read is its only copy in the gateway, and everything HTTP promises still holds."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess

import numpy as np
import tritonclient.http as triton

from isopool.client.segments import IDLE
from isopool.gateway.body import ALIGN, DIRECT_BYTES
from isopool.protocol.shm import NAME_IN, segments_in
from tests.helpers import http_pool, need

WHERE = "isopool.examples.faulty:make_where_mapped"
INFER = "/v2/models/default/infer"


def binary_request(arrays: dict[str, np.ndarray], *headers: bytes, close: bool = False,
                   outputs: list[str] | None = None) -> tuple[bytes, int]:
    """(the raw request, its JSON's length) of an infer with every input as binary FP32, its
    answer as JSON (for small arrays): the inputs back, or the `outputs` named."""
    head = json.dumps({"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": a.nbytes}} for n, a in arrays.items()],
                       "outputs": [{"name": n} for n in outputs or arrays]}).encode()
    body = head + b"".join(a.tobytes() for a in arrays.values())
    return (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n" + (b"Connection: close\r\n" if close else b"")
            + b"".join(h + b"\r\n" for h in headers) + b"Inference-Header-Content-Length: %d\r\n" % len(head)
            + b"Content-Length: %d\r\n\r\n" % len(body) + body), len(head)


def read_answer(reader) -> tuple[int, dict]:
    """(status, JSON body) of the next response on a connection's one reader (sock.makefile)."""
    status, length = int(reader.readline().split()[1]), 0
    for _ in range(100):  # bounded: a response has a few headers
        line = reader.readline().strip()
        if not line:
            break
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, json.loads(reader.read(length))


def test_a_large_binary_body_reaches_the_model_where_the_kernel_put_it(start_pool):
    """tritonclient's binary tensors of 4 MiB and 3 MiB: the worker's arrays lie in the
    gateway's shared-memory segment at the very offsets of the body (after its JSON, padded to
    64 bytes), so the gateway named the bytes where its reads put them and copied nothing; a
    copy would have placed the first at 0. Below DIRECT_BYTES the body takes the ASGI path."""
    pool = http_pool(start_pool, "--model", WHERE, workers=1)
    client = triton.InferenceServerClient(pool.address)
    assert client.is_server_ready()  # the gateway's client has its hello answered: shared memory is offered
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(n).astype(np.float32) for n in (1 << 20, (3 << 18) + 1))
    inputs = []
    for name, arr in (("x", x), ("y", y)):
        inputs.append(triton.InferInput(name, list(arr.shape), "FP32"))
        inputs[-1].set_data_from_numpy(arr, binary_data=True)
    for _ in range(3):  # the segment comes back to the gateway's pool, and serves the next body
        result = client.infer("default", inputs, outputs=[triton.InferRequestedOutput(n, binary_data=True)
                                                          for n in ("x", "y", "mapped:x", "mapped:y")])
        assert np.array_equal(result.as_numpy("x"), x) and np.array_equal(result.as_numpy("y"), y)
        where = {n: result.as_numpy(f"mapped:{n}")[0].decode() for n in "xy"}
        segment, at = where["x"].rsplit("@", 1)
        assert segment.startswith("/memfd:" + NAME_IN), where
        assert int(at) > 0 and int(at) % ALIGN == 0, where  # after the JSON, padded: not a copy's 0
        assert where["y"] == f"{segment}@{int(at) + x.nbytes}", where  # right behind x, as in the body
    small = rng.standard_normal(DIRECT_BYTES // 8).astype(np.float32)  # half of DIRECT_BYTES: ASGI, as before
    one = triton.InferInput("x", list(small.shape), "FP32")
    one.set_data_from_numpy(small, binary_data=True)
    result = client.infer("default", [one], outputs=[triton.InferRequestedOutput("x", binary_data=True)])
    assert np.array_equal(result.as_numpy("x"), small)


def test_a_request_pipelined_behind_a_direct_body_is_read_by_a_new_parser(start_pool):
    """Three requests written at once on one connection: a large body, a small one, a large one.
    The kernel reads exactly up to the first body's end, so the second request's bytes go to
    the HTTP protocol, which answers all three in order."""
    pool = http_pool(start_pool, "--model", WHERE, workers=1)
    host, port = pool.address.rsplit(":", 1)
    arrays = [np.full(n, i, dtype=np.float32) for i, n in enumerate((1 << 19, 8, (1 << 19) + 3))]
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"".join(binary_request({"x": a}, close=i == 2)[0] for i, a in enumerate(arrays)))
        reader = sock.makefile("rb")
        for i, a in enumerate(arrays):
            status, answer = read_answer(reader)
            assert status == 200, answer
            out = {o["name"]: o for o in answer["outputs"]}
            assert out["x"]["shape"] == [a.size] and set(out["x"]["data"]) == {i}, (i, answer)


def test_curl_expecting_100_continue_gets_it(start_pool, tmp_path):
    """curl asks `Expect: 100-continue` for a large body and waits for the go-ahead before
    sending it (here up to 30 s): the gateway, which reads the body without the app asking,
    says it at once."""
    curl = need("curl")
    pool = http_pool(start_pool, "--model", WHERE, workers=1)
    x = np.arange(1 << 20, dtype=np.float32)
    request, head_length = binary_request({"x": x})
    (tmp_path / "body").write_bytes(request.split(b"\r\n\r\n", 1)[1])
    out = subprocess.run([curl, "-s", "--expect100-timeout", "30", "-H", "Expect: 100-continue",
                          "-H", f"Inference-Header-Content-Length: {head_length}", "--data-binary", f"@{tmp_path}/body",
                          f"http://{pool.address}{INFER}", "-w", "\n%{http_code}"], capture_output=True, timeout=20)
    text, code = out.stdout.rsplit(b"\n", 1)
    assert code == b"200", out
    assert np.array_equal(np.array(json.loads(text)["outputs"][0]["data"], dtype=np.float32), x)


def test_a_body_cut_short_or_stalled_lets_its_segment_go_and_the_gateway_serves_on(start_pool):
    """A client that goes away mid-body, and one that stops sending (a 408 after
    --http-client-timeout, and the connection closed: its stream cannot be read on): neither
    leaves a segment held in the gateway, and the next large body is served."""
    pool = http_pool(start_pool, "--model", WHERE, "--http-client-timeout", "1", workers=1)
    host, port = pool.address.rsplit(":", 1)
    [gateway] = [g["pid"] for g in pool.status()["pool"]["gateways"]]
    x = np.ones(1 << 20, dtype=np.float32)
    request, _ = binary_request({"x": x}, close=True)
    half = request[:len(request) // 2]
    for _ in range(3):  # gone mid-body: the connection's end fails the body
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(half)
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # stalled: the 408
        sock.sendall(half)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 408 and b"stalled" in answer.read()
        assert sock.recv(1) == b""  # and closed
    for _ in range(2):
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(request)
            status, answer = read_answer(sock.makefile("rb"))
            assert status == 200 and len(answer["outputs"][0]["data"]) == x.size
    held = [s for s in segments_in(gateway) if NAME_IN in s and s.startswith("fd")]
    assert len(held) <= IDLE, held  # the pool's idle ones at most: none kept for the bodies cut short


def test_a_misaligned_tensor_an_upgrade_and_no_fds_left_each_take_the_old_path(start_pool):
    """Three reasons not to name a body's bytes where they lie, each served correctly:
    an FP64 tensor behind 1 MiB + 1 byte of UINT8 (named in place it would reach the model
    misaligned; all of them are copied, aligned); an upgrade request (the parser never reads
    its body: no lease may wait for it); and a gateway out of fds (no segment can be made:
    the body goes through ASGI and the tensors as frames, where it was a 400 and a reset)."""
    import resource

    pool = http_pool(start_pool, "--model", WHERE, workers=1)
    host, port = pool.address.rsplit(":", 1)
    [gateway] = [g["pid"] for g in pool.status()["pool"]["gateways"]]
    client = triton.InferenceServerClient(pool.address)
    assert client.is_server_ready()
    odd, wide = np.arange((1 << 20) + 1, dtype=np.uint8), np.arange(1 << 17, dtype=np.float64)
    inputs = [triton.InferInput("odd", list(odd.shape), "UINT8"), triton.InferInput("wide", list(wide.shape), "FP64")]
    inputs[0].set_data_from_numpy(odd, binary_data=True)
    inputs[1].set_data_from_numpy(wide, binary_data=True)
    result = client.infer("default", inputs, outputs=[triton.InferRequestedOutput(n, binary_data=True)
                                                      for n in ("odd", "wide", "mapped:wide")])
    assert np.array_equal(result.as_numpy("odd"), odd) and np.array_equal(result.as_numpy("wide"), wide)
    assert int(result.as_numpy("mapped:wide")[0].decode().rsplit("@", 1)[1]) % 8 == 0
    x = np.arange(1 << 19, dtype=np.float32)
    request, _ = binary_request({"x": x}, b"Connection: Upgrade", b"Upgrade: foo")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        status, answer = read_answer(sock.makefile("rb"))
        assert status == 400 and "upgrade the connection" in answer["error"]  # httptools reads no body after it
    larger = np.arange(4 << 20, dtype=np.float32)  # than any segment the gateway keeps: it needs a new one
    soft, hard = resource.prlimit(gateway, resource.RLIMIT_NOFILE)
    try:
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            reader = sock.makefile("rb")
            # first 512 KiB (frames, no segment): the connection is accepted (an fd of the
            # gateway's), and pyzmq's thread for such frames started
            sock.sendall(binary_request({"x": np.zeros(1 << 17, np.float32)}, outputs=["mapped:x"])[0])
            assert read_answer(reader)[0] == 200
            open_now = len(os.listdir(f"/proc/{gateway}/fd"))
            resource.prlimit(gateway, resource.RLIMIT_NOFILE, (open_now, hard))  # no fd left for a segment
            sock.sendall(binary_request({"x": larger}, close=True, outputs=["mapped:x"])[0])
            status, answer = read_answer(reader)
        assert status == 200 and answer["outputs"][0]["data"] == ["@"], answer  # it came as a frame
    finally:
        resource.prlimit(gateway, resource.RLIMIT_NOFILE, (soft, hard))
    held = [s for s in segments_in(gateway) if NAME_IN in s and s.startswith("fd")]
    assert len(held) <= IDLE, held  # nothing waits for the upgrade's body
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # and the direct path serves on
        sock.sendall(binary_request({"x": larger}, outputs=["mapped:x"])[0])
        status, answer = read_answer(sock.makefile("rb"))
        where = answer["outputs"][0]["data"][0]
        assert status == 200 and where.startswith("/memfd:" + NAME_IN) and not where.endswith("@0"), answer
