"""generate_stream: a streaming model's parts as server-sent events, over a real HTTP connection."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.helpers import http_pool, read_to_end

STREAMING = "isopool.examples.streaming:Countdown"


def events(pool, body: dict, limit: int | None = None) -> list[tuple[str, dict]]:
    """(event kind, data) of each server-sent event, reading at most `limit` before hanging up."""
    host, port = pool.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v2/models/default/generate_stream", body=json.dumps(body))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    out, kind = [], "message"
    while limit is None or len(out) < limit:
        line = resp.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[len("data: "):])))
            kind = "message"
    conn.close()
    return out


def test_parts_arrive_in_order_as_events(start_pool):
    pool = http_pool(start_pool, "--model", STREAMING, "--workers", "1")
    got = events(pool, {"n": 5, "tag": "s"})
    assert got == [("message", {"tag": "s", "i": i}) for i in range(5)]


def test_a_worker_dying_mid_stream_ends_it_with_an_error_event(start_pool):
    pool = http_pool(start_pool, "--model", STREAMING, "--workers", "1")
    # each part has 0.5 s to leave before the next step (a part sent an instant before the
    # crash may die with its worker: the README says so; 50 ms was too short on a loaded host)
    got = events(pool, {"n": 10, "crash_after": 3, "delay": 0.5})
    assert got[:3] == [("message", {"tag": None, "i": i}) for i in range(3)]
    kind, error = got[-1]
    assert len(got) == 4 and kind == "error" and error["type"] == "WorkerCrashed" and error["parts_delivered"] == 3


@pytest.mark.parametrize("n, delay", [(1000, 0.01), (10**8, 0)])
def test_the_http_client_going_away_stops_the_generator_in_the_worker(start_pool, n, delay):
    """Also where the next part is always there already (no delay): the gateway looked at the
    next part before at the hang-up, so a stream whose parts were ready never saw it go."""
    pool = http_pool(start_pool, "--model", STREAMING, "--workers", "1")
    assert len(events(pool, {"n": n, "delay": delay}, limit=3)) == 3  # then hangs up
    with pool.client() as c:
        for _ in range(500):  # the worker closes it at its next part: bounded polling of its own counters
            stats = c.infer({"stats": True}, timeout=60)
            if stats["closed_early"]:
                break
    assert stats["closed_early"] == 1 and stats["parts"] < n


def test_a_hang_up_behind_a_pipelined_request_still_stops_the_generator_and_a_431_waits(start_pool):
    """Found by a hostile pass: uvicorn tells only the newest request on a connection that the
    client hung up, so a stream with a request read after it ran on to its end on the worker
    (n parts: as long as the model liked); and headers over 64 KiB read behind a stream got
    their 431 written into the stream's body, cutting it short. Now every request still being
    answered hears the hang-up, and the stream is answered whole before the connection closes."""
    import socket

    pool = http_pool(start_pool, "--model", STREAMING, "--workers", "1")
    host, port = pool.address.rsplit(":", 1)
    body = json.dumps({"n": 10**6, "delay": 0.01}).encode()
    stream = (b"POST /v2/models/default/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(stream)
        assert b"data: " in sock.recv(4096)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # read behind the stream, then gone
    with pool.client() as c:
        for _ in range(500):  # the worker closes it at its next part: bounded polling of its own counters
            stats = c.infer({"stats": True}, timeout=60)
            if stats["closed_early"]:
                break
    assert stats["closed_early"] == 1 and stats["parts"] < 10**6
    body = json.dumps({"n": 4, "delay": 0.3}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/default/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = sock.recv(4096)
        assert b"data: " in got
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 << 10))  # past 64 KiB of headers
        got += read_to_end(sock)
    assert got.count(b"data: ") == 4 and b" 431 " not in got  # the stream whole, then the close


def test_an_http_client_that_stops_reading_frees_the_worker(start_pool):
    """A client that reads nothing more (and does not hang up): the gateway's writes wait,
    the parts pile up in its client until MAX_STREAM_BEHIND, and then the stream is
    cancelled in the worker, which serves others again."""
    import socket

    pool = http_pool(start_pool, "--model", STREAMING, "--workers", "1")
    host, port = pool.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"n": 10**8}).encode()
    sock.sendall(b"POST /v2/models/default/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        assert sock.recv(64).startswith(b"HTTP/1.1 200")  # it began, and now it is not read
        with pool.client() as c:  # the only worker answers once the stream is cancelled
            stats = c.infer({"stats": True}, timeout=60)
        assert stats["closed_early"] == 1 and stats["parts"] < 10**8
    finally:
        sock.close()


def test_unknown_model_or_bad_body_is_an_http_error_not_a_stream(start_pool):
    pool = http_pool(start_pool, "--model", STREAMING, "--workers", "1")
    host, port = pool.address.rsplit(":", 1)
    for path, body, status in [("/v2/models/nope/generate_stream", "{}", 404),
                               ("/v2/models/default/generate_stream", "{bad", 400)]:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        assert resp.status == status and "error" in json.loads(resp.read())
        conn.close()
