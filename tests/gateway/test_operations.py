"""Operating the HTTP front: its metrics and access log, slow clients, declared signatures, tcp://."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, free_port, http_pool, read_to_end

INFER = "/v2/models/{}/infer"
GOOD = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.25] * 16}]}


def post(address: str, path: str, body: dict) -> int:
    request = urllib.request.Request(f"http://{address}{path}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def http_counts(metrics_url: str) -> dict:
    """isopool_http_requests_total by (route, status, model), from one scrape."""
    counts = {}
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "isopool_http_requests_total":
                counts[(s.labels["route"], s.labels["status"], s.labels["model"])] = s.value
    return counts


def test_http_requests_are_counted_by_route_status_and_model_and_logged_as_json(start_pool):
    pool = http_pool(start_pool, "--metrics-port", str(free_port()), "--http-access-log", "--log-format", "json")
    calls = [(INFER.format("default"), GOOD, 200)] * 5 + [
        (INFER.format("default"), {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400),
        (INFER.format("no-such-model"), GOOD, 404),
        ("/v2/nowhere", {}, 404)]
    for path, body, status in calls:
        assert post(pool.address, path, body) == status
    # a request is counted and logged just after its answer has left: read until all are there
    for _ in range(200):  # bounded (~10 s)
        counts = http_counts(pool.status()["pool"]["metrics_url"])
        lines = [json.loads(line) for line in pool.output().splitlines()
                 if line.startswith("{") and '"isopool.http"' in line]
        if sum(counts.values()) >= len(calls) and len(lines) >= len(calls):
            break
        time.sleep(0.05)
    assert counts == {("/v2/models/{name}/infer", "200", "default"): 5, ("/v2/models/{name}/infer", "400", "default"): 1,
                      ("/v2/models/{name}/infer", "404", ""): 1, ("unmatched", "404", ""): 1}  # summed over gateways
    assert sorted((r["path"], r["status"]) for r in lines) == sorted((p, s) for p, _, s in calls)
    assert all(r["route"] and r["duration_ms"] >= 0 and r["client"].startswith("127.0.0.1:") for r in lines)


def test_slow_clients_get_408_and_never_hold_the_gateway(start_pool):
    pool = http_pool(start_pool, "--http-client-timeout", "1", workers=1)
    host, port = pool.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as slow_headers, \
            socket.create_connection((host, int(port)), timeout=30) as slow_body, \
            socket.create_connection((host, int(port)), timeout=30) as silent:
        slow_headers.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\n")  # and no more
        slow_body.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert post(pool.address, INFER.format("default"), GOOD) == 200  # the one gateway serves others meanwhile
        assert b" 408 " in slow_headers.recv(4096).split(b"\r\n")[0]
        answer = b""
        for _ in range(20):  # the head and the body may come in separate reads; bounded, each by the timeout
            chunk = slow_body.recv(4096)
            answer += chunk
            if not chunk or b"stalled" in answer:
                break
        assert b" 408 " in answer.split(b"\r\n")[0] and b"stalled" in answer
        assert silent.recv(4096) == b""  # a connection that never sends is closed, without an answer
    assert pool.status()["pool"]["gateways"][0]["restarts"] == 0


def test_bytes_after_an_answer_never_keep_a_connection_open_for_good(start_pool):
    """Found by hostile passes: every byte stopped uvicorn's keep-alive timer and only an
    answer's end started it again, so a stray CRLF after an answer, or the rest of a body sent
    after its early 404, left the connection open with no timer at all; then a CRLF every few
    seconds, each starting the keep-alive time anew; and a byte now and then of such a body.
    Each now closes: idle, the keep-alive time (5 s) after the answer, whatever bytes that begin
    no request come; the rest of an answered body, after one client timeout in all."""
    pool = http_pool(start_pool, "--http-client-timeout", "1", workers=1)
    host, port = pool.address.rsplit(":", 1)
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    early = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as stray, \
            socket.create_connection((host, int(port)), timeout=30) as rest, \
            socket.create_connection((host, int(port)), timeout=30) as trickle:
        for sock, request in ((stray, ready), (rest, early), (trickle, early)):
            sock.sendall(request)
            assert sock.recv(4096).split(b"\r\n")[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found")
        rest.sendall(b"x" * 1000)  # the whole body: the connection is idle again after it
        stray.settimeout(0.5)
        for crlfs in range(1, 40):  # a CRLF each 0.5 s, bounded: the close comes 5 s after the answer
            try:
                stray.sendall(b"\r\n")
                if stray.recv(4096) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:  # reset: the gateway closed it
                break
        assert crlfs < 20, f"{crlfs} CRLFs, one each 0.5 s, kept an idle connection open"
        assert rest.recv(4096) == b""  # closed by the keep-alive timer (5 s)
        trickle.setblocking(False)
        for sent in range(100):  # a byte each 0.1 s, bounded: the cut comes after about 1 s
            try:
                trickle.send(b"x")
                if trickle.recv(4096) == b"":
                    break
            except BlockingIOError:
                pass
            except OSError:  # reset: the gateway closed it
                break
            time.sleep(0.1)
        assert sent < 50, f"a body trickling in after its answer kept the connection for {sent} bytes"
    assert post(pool.address, INFER.format("default"), GOOD) == 200
    assert pool.status()["pool"]["gateways"][0]["restarts"] == 0


def test_pipelined_requests_trailers_and_upgrades_are_bounded(start_pool):
    """Found by a hostile pass: 8 MiB of pipelined `GET /` grew a gateway to 1 GB (uvicorn
    read on after each answer, and every read became more queued requests); the trailers of
    a chunked body were all kept (105 MiB of them: 2.5 GB); a POST that asked to upgrade the
    connection lost its body (httptools reads none after such headers) and the connection
    answered nothing more after it; garbage after a request lost that request's 200. Now at most MAX_PIPELINE requests wait read ahead of their
    answers (then those are answered and the connection closes), trailers are dropped and
    bounded like headers, and an upgrade is answered and closes the connection (with a body,
    a 400 that says why)."""
    from isopool.gateway.connection import MAX_PIPELINE

    pool = http_pool(start_pool, "--http-client-timeout", "2", workers=1)
    host, port = pool.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as flood:
        flood.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        answers = read_to_end(flood)
    count = answers.count(b"HTTP/1.1 200 OK")
    assert MAX_PIPELINE // 2 <= count < 2000 and answers.rstrip().endswith(b"}"), count  # whole answers, then the close
    assert answers.lower().count(b"connection: close") == 1
    with socket.create_connection((host, int(port)), timeout=30) as trailers:
        trailers.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\n{}\r\n0\r\n")
        with contextlib.suppress(OSError):  # the gateway may close while these are on their way
            for _ in range(40):  # 80 KiB of trailers, past the 64 KiB a request's headers may take
                trailers.sendall(b"a: b\r\n" * 350)
        assert b" 200 " not in read_to_end(trailers)
    body = json.dumps(GOOD).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # a request, then garbage
        sock.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body + b"\x00\x01garbage\r\n\r\n")
        answers = read_to_end(sock)
    assert answers.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in answers.lower()  # the 200 was lost
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = sock.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.1 400") and b"upgrade the connection" in answer, answer[:400]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                     b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_to_end(sock)
    assert answers.count(b"HTTP/1.1 200 OK") == 1 and b"connection: close" in answers.lower()
    assert post(pool.address, INFER.format("default"), GOOD) == 200
    assert pool.status()["pool"]["gateways"][0]["restarts"] == 0
    assert "Exception in ASGI application" not in pool.output()


def test_head_is_answered_wherever_get_is(start_pool):
    """RFC 9110 asks that a server answer HEAD wherever it answers GET; it was a 405. The head
    comes with no body, so a GET behind it on the same connection is read whole."""
    pool = http_pool(start_pool, workers=1)
    host, port = pool.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\nGET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = read_to_end(sock)
    head, _, rest = answers.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"}"), answers
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"HEAD /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 405") and b"allow: post\r\n" in answer.lower()


def test_a_client_that_stops_reading_its_answer_is_cut_and_a_slow_reader_is_not(start_pool):
    """Found by a hostile pass: a client that never read its answer held the connection, the
    answer's 16 MiB in the gateway and the app's task for good, the keep-alive timer's close()
    included (it waits for the buffer to drain). Once an answer is written faster than read,
    the peer must take 500 bytes a second over each client timeout: a stalled reader is cut,
    a slow one that keeps reading gets its whole answer."""
    import numpy as np

    pool = http_pool(start_pool, "--model", "isopool.examples.faulty:make_echo", "--http-client-timeout", "1",
                     workers=1)
    host, port = pool.address.rsplit(":", 1)
    x = np.arange(4 << 20, dtype=np.float32)  # 16 MiB, past what the kernel's socket buffers hold
    head = json.dumps({"inputs": [{"name": "x", "shape": [x.size], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    request = (b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: %d\r\n"
               b"Content-Length: %d\r\n\r\n" % (len(head), len(head) + x.nbytes)) + head + x.tobytes()
    socks = []
    for window in (4096, 0):
        sock = socket.socket()
        if window:  # before connecting: the stalled client's window is small, so the gateway holds the rest
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        sock.settimeout(30)
        sock.connect((host, int(port)))
        sock.sendall(request)
        socks.append(sock)
    stalled, slow = socks
    with stalled, slow:
        got = b""
        for _ in range(2000):  # 128 KiB at most each 10 ms, slower than written: bounded, 20 s at most
            chunk = slow.recv(128 << 10)
            if not chunk:
                break
            got += chunk
            head_end = got.find(b"\r\n\r\n")
            if head_end > 0 and len(got) - head_end - 4 >= int(got.split(b"\r\ncontent-length: ")[1].split(b"\r\n")[0]):
                break
            time.sleep(0.01)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(x.tobytes()[-(1 << 16):]), (len(got), got[:300])
        taken, ended = 0, False
        stalled.settimeout(10)
        for _ in range(8000):  # what the kernel holds for it (4 KiB a read), then the cut: bounded
            try:
                chunk = stalled.recv(1 << 20)
            except ConnectionResetError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            taken += len(chunk)
        assert ended and taken < x.nbytes, f"a client that read nothing for seconds was sent {taken} bytes"
    assert post(pool.address, INFER.format("default"), GOOD) == 200
    assert pool.status()["pool"]["gateways"][0]["restarts"] == 0
    assert "Exception in ASGI application" not in pool.output()  # no task wrote to the cut connection


def test_headers_over_64_kib_are_431_and_pipelined_headers_still_have_a_deadline(start_pool):
    """Two ways a client held a gateway, found by a hostile pass: headers of any size (64 MiB
    took 4 s of the gateway's loop, httptools joining them piece by piece); and the first
    bytes of a request's headers pipelined behind a slow answer, which stopped the header
    deadline there and uvicorn's keep-alive timer, so the connection stayed open for good."""
    pool = http_pool(start_pool, "--model", "isopool.examples.streaming:Countdown", "--http-client-timeout", "1",
                     workers=1)
    host, port = pool.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as big:
        big.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (128 << 10) + b"\r\n\r\n")
        assert big.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    body = json.dumps({"n": 3, "delay": 1.5}).encode()  # an answer that takes 3 s, longer than the timeout
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/default/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body + b"GET /v2 HTTP/1.1\r\n")  # and no more
        got = read_to_end(sock)
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") == 3  # the stream, whole
    assert b" 408 " in got  # then the pipelined headers' deadline, and the connection closed
    assert pool.status()["pool"]["gateways"][0]["restarts"] == 0


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(start_pool):
    """`printf ... | nc -N` and shutdown(SHUT_WR) end the client's side once the request is
    sent: uvloop closed the connection at that end of stream, and the answer (the request ran)
    was dropped. The connection now stays open for what is owed, then closes."""
    pool = http_pool(start_pool, "--model", "isopool.examples.faulty:Faulty", workers=1)
    host, port = pool.address.rsplit(":", 1)
    body = json.dumps({"inputs": [{"name": "do", "shape": [1], "datatype": "BYTES", "data": ["sleep"]},
                                  {"name": "s", "shape": [1], "datatype": "FP32", "data": [0.3]}],
                       "outputs": [{"name": "pid"}]}).encode()  # not the echo: a map is no tensor
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            sock.shutdown(socket.SHUT_WR)  # the answer takes 0.3 s: the end of stream comes first
            got = read_to_end(sock)
        assert got.startswith(b"HTTP/1.1 200") and b'"outputs"' in got, got[:300]
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # three pipelined, then the end
        request = (b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                   + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.sendall(request * 3)
        sock.shutdown(socket.SHUT_WR)
        got = read_to_end(sock)
    assert got.count(b"HTTP/1.1 200") == 3, got[:600]  # the last was dropped: the close came as it started


def test_an_http_client_that_hangs_up_withdraws_its_request(start_pool, tmp_path):
    """A client whose connection is reset before its answer withdraws its request, as a ZeroMQ
    client's cancel does: a queued one leaves the queue and never runs (it ran for nobody, and
    held its place, before: a hostile pass saw an /infer hung up with 1,500 sentences keep the
    pool busy 18 s). One worker, held by a first request on a gate. (A FIN alone cannot be
    told from a half-close after the request, which is answered: the test above.)"""
    pool = http_pool(start_pool, "--model", "isopool.examples.faulty:Faulty", "--workers", "1", workers=1)
    host, port = pool.address.rsplit(":", 1)
    gate = tmp_path / "gate"

    def request(action: str) -> bytes:
        body = json.dumps({"inputs": [
            {"name": "do", "shape": [], "datatype": "BYTES", "data": [action]},
            {"name": "path", "shape": [], "datatype": "BYTES", "data": [str(gate)]},
            {"name": "s", "shape": [], "datatype": "FP32", "data": [60]}], "outputs": [{"name": "pid"}]}).encode()
        return (b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    def until(predicate) -> dict:
        for _ in range(2000):  # bounded: status round trips
            status = pool.status()["pool"]
            if predicate(status):
                return status
        raise AssertionError(f"status never got there: {status}")

    with socket.create_connection((host, int(port)), timeout=60) as first:
        try:
            first.sendall(request("wait"))  # runs on the one worker until the gate opens
            until(lambda s: s["in_flight"] == 1)
            with socket.create_connection((host, int(port)), timeout=60) as gone:
                gone.sendall(request("wait"))
                until(lambda s: s["queue_depth"] + s["in_flight"] == 2)  # queued, or sent ahead to the worker
                gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: reset
            # withdrawn (where it was sent ahead, the busy worker hears of it when it is free)
            until(lambda s: s["outcomes"].get("cancelled") == 1)
        finally:
            gate.touch()
        assert read_to_end(first).startswith(b"HTTP/1.1 200")
    status = until(lambda s: s["in_flight"] == 0)
    assert status["outcomes"] == {"ok": 1, "cancelled": 1}, status  # the withdrawn one never ran
    assert pool.workers()[0]["requests"] == 1


def test_each_answer_arrives_whole_in_one_read_on_a_kept_alive_connection(start_pool):
    """Each head held for its body (gateway/connection.py: OneWrite; its calls are checked in
    test_onewrite.py) leaves nothing behind on a kept-alive connection: every answer comes
    whole in one read, in order, and apart from the next."""
    pool = http_pool(start_pool, workers=1)
    host, port = pool.address.rsplit(":", 1)
    body = json.dumps(GOOD).encode()
    request = (b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        for i in range(5):
            conn.sendall(request)
            answer = conn.recv(1 << 16)  # one read: whatever the first write put on the wire
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), answer[:200]
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            assert len(payload) == length, f"answer {i}: {len(payload)} of {length} body bytes in the first read"
            assert json.loads(payload)["outputs"][0]["name"] == "OUTPUT0"


def test_a_declared_signature_is_checked_and_a_bad_one_stops_the_load(start_pool, short_tmp):
    pool = http_pool(start_pool)
    wrong = [({"name": "x", "shape": [1, 16], "datatype": "FP32"}, "takes input(s) INPUT0"),
             ({"name": "INPUT0", "shape": [16], "datatype": "FP32"}, "has shape [-1, 16]"),
             ({"name": "INPUT0", "shape": [1, 16], "datatype": "FP64"}, "is FP32, not FP64")]
    for tensor, words in wrong:
        request = urllib.request.Request(f"http://{pool.address}{INFER.format('default')}", method="POST",
                                         data=json.dumps({"inputs": [{**tensor, "data": [0.0] * 16}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 400 and words in json.loads(info.value.read())["error"]
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--model", "isopool.examples.faulty:BadSignature",
                          "--workers", "1", "--endpoint", f"ipc://{short_tmp}/bad.sock"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "declares a signature that is not valid" in out.stderr
    assert "datatype must be one of" in out.stderr


def test_http_in_front_of_a_tcp_endpoint_with_curve(start_pool, short_tmp):
    keys = short_tmp / "keys"
    for name, directory in (("server", keys), ("alice", short_tmp / "clients")):
        subprocess.run([sys.executable, "-m", "isopool.cli", "keygen", name, "--dir", str(directory)], check=True,
                       capture_output=True, timeout=60, cwd=ROOT)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pool = http_pool(start_pool, "--curve-secret-key", str(keys / "server.key_secret"), "--curve-clients",
                     str(short_tmp / "clients"), endpoint=endpoint,
                     client_kw={"curve_secret_key": str(short_tmp / "clients" / "alice.key_secret"),
                                "curve_server_key": str(keys / "server.key")})
    assert post(pool.address, INFER.format("default"), GOOD) == 200  # the gateways hold a key of their own
    assert pool.status()["pool"]["auth_denied"] == 0


def test_liveness_asks_the_supervisor_so_a_stopped_loop_is_not_live(start_pool):
    pool = http_pool(start_pool, workers=1)
    url = f"http://{pool.address}/v2/health/live"
    assert urllib.request.urlopen(url, timeout=30).status == 200
    os.kill(pool.pid, signal.SIGSTOP)  # the supervisor's loop stands still; its gateway runs on
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=30)
        assert info.value.code == 503 and "did not answer" in json.loads(info.value.read())["error"]
    finally:
        os.kill(pool.pid, signal.SIGCONT)
    assert urllib.request.urlopen(url, timeout=30).status == 200
