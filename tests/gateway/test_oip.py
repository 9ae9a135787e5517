"""The Open Inference Protocol over HTTP, called by real clients: tritonclient.http and curl."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.http as triton

from isopool.models.default import DefaultModel
from tests.helpers import ROOT, Background, assert_replaced, http_pool, need

FAULTY = "isopool.examples.faulty:Faulty"


def test_tritonclient_health_metadata_and_infer_json_and_binary(start_pool):
    pool = http_pool(start_pool)
    client = triton.InferenceServerClient(pool.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("default")
    meta = client.get_model_metadata("default")
    assert meta["name"] == "default" and meta["platform"] == "isopool"
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]  # its declared signature
    assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_repository"]
    model = DefaultModel()
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    for binary_in in (False, True):
        for binary_out in (False, True):
            inp = triton.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary_in)
            out = triton.InferRequestedOutput("OUTPUT0", binary_data=binary_out)
            result = client.infer("default", [inp], outputs=[out], request_id=f"r-{binary_in}-{binary_out}")
            np.testing.assert_allclose(result.as_numpy("OUTPUT0"), model(x), rtol=1e-6)
            assert result.get_response()["id"] == f"r-{binary_in}-{binary_out}"
    with pytest.raises(triton.InferenceServerException) if hasattr(triton, "InferenceServerException") else \
            pytest.raises(Exception):
        client.infer("no_such_model", [inp])


def test_curl_gets_json_and_typed_errors(start_pool):
    curl = need("curl")
    pool = http_pool(start_pool, "--model", FAULTY)
    base = f"http://{pool.address}/v2/models/default/infer"

    def post(body: str) -> tuple[int, dict]:
        out = subprocess.run([curl, "-s", "-X", "POST", base, "-d", body, "-w", "\n%{http_code}"],
                             capture_output=True, text=True, timeout=60)
        text, code = out.stdout.rsplit("\n", 1)
        return int(code), json.loads(text)

    code, body = post('{"id": "a", "inputs": [{"name": "do", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]}')
    assert code == 200 and body["id"] == "a" and body["outputs"]
    for bad, status, words in [
        ("{not json", 400, "not JSON"),
        ('{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}', 400, "holds 2 elements"),
        ('{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}', 400, "datatype"),
        ('{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', 400, "numbers"),
        ('{"inputs": []}', 400, "inputs"),
    ]:
        code, body = post(bad)
        assert code == status and words in body["error"], (bad, code, body)
    out = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{pool.address}/v2/models/x"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "404"


class HTTPLoad:
    """Threads that each call the pool over one keep-alive HTTP connection, until stopped;
    a connection that breaks is counted and opened again."""

    def __init__(self, address: str, threads: int = 4, limit: int = 20000):
        self.host, port = address.rsplit(":", 1)
        self.port, self.limit = int(port), limit
        self.ok = self.broken = 0
        self.statuses: list[int] = []  # answers other than 200
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        self.body = json.dumps({"inputs": [{"name": "do", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]})

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while not self.stop.is_set() and self.ok < self.limit:
            try:
                conn.request("POST", "/v2/models/default/infer", self.body)
                answer = conn.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException):
                self.broken += 1  # its gateway died under it: reconnect (another gateway accepts)
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                continue
            if answer.status == 200:
                self.ok += 1
            else:
                self.statuses.append(answer.status)
        conn.close()

    def wait_ok(self, n: int, timeout: float = 60.0) -> None:
        """Until n requests have been answered 200 (polled: the threads count without an event)."""
        end = time.monotonic() + timeout
        while self.ok < n and time.monotonic() < end:
            self.stop.wait(0.01)
        assert self.ok >= n, f"{self.ok} of {n} HTTP requests answered in {timeout}s; broken {self.broken}"

    def __enter__(self) -> "HTTPLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_a_gateway_killed_under_http_load_is_restarted_and_the_models_never_notice(start_pool):
    pool = http_pool(start_pool, "--model", FAULTY)
    pool.subscribe()
    victim = pool.status()["pool"]["gateways"][0]["pid"]
    with pool.client() as native, Background(native) as bg, HTTPLoad(pool.address) as load:
        load.wait_ok(200)
        os.kill(victim, signal.SIGKILL)
        pool.wait_event("gateway_exited", pid=victim, timeout=60)
        before = load.ok
        pool.wait_event("gateway_started", gateway=0, timeout=60)
        load.wait_ok(before + 200)
    assert load.statuses == [] and load.ok >= before + 200  # the other gateway served on
    assert load.broken <= len(load.threads)  # only the connections the dead gateway held: one each at most
    assert bg.failed == [] and bg.ok > 0
    status = pool.status()
    assert status["pool"]["gateways"][0]["restarts"] == 1
    assert_replaced(status, {})


def test_a_body_over_the_message_limit_is_413_and_a_public_address_needs_insecure(start_pool, short_tmp):
    import urllib.error
    import urllib.request

    pool = http_pool(start_pool, "--max-message-bytes", "1MiB")
    request = urllib.request.Request(f"http://{pool.address}/v2/models/default/infer", data=b" " * (2 << 20),
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 413 and "max_message_bytes" in json.loads(info.value.read())["error"]
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--http", "0.0.0.0:0", "--endpoint",
                          f"ipc://{short_tmp}/public.sock"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--insecure" in out.stderr and "Traceback" not in out.stderr


def raw_http(address: str, data: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    """(status, body) of one request written as raw bytes; the connection is closed after."""
    import socket

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, answer.read()


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_client_mistakes_a_hostile_pass_found_are_4xx_and_the_gateway_serves_on(start_pool):
    """Each of these was a 500 (or a 200 that dropped an input): an error of the gateway's own
    for what was the client's mistake."""
    pool = http_pool(start_pool, "--model", FAULTY, workers=1)
    infer = "/v2/models/default/infer"

    def tensor(shape, **extra):
        return {"name": "x", "shape": shape, "datatype": "BYTES", **extra}

    binary_head = json.dumps({"inputs": [tensor([0, 2**62], parameters={"binary_data_size": 0})]}).encode()
    zeros_head = json.dumps({"inputs": [tensor([2], parameters={"binary_data_size": 12})]}).encode()
    cases = {  # what -> (request, words the 400 says)
        "output parameters not a map": (post(infer, json.dumps({
            "inputs": [tensor([1], data=["a"])], "outputs": [{"name": "echo", "parameters": 7}]}).encode()), "outputs"),
        "no array has shape [0, 2**62] (JSON)": (post(infer, json.dumps({
            "inputs": [tensor([0, 2**62], data=[])]}).encode()), "max_elements"),
        "no array has shape [0, 2**62] (binary)": (post(infer, binary_head, b"Inference-Header-Content-Length: "
                                                        + str(len(binary_head)).encode()), "max_elements"),
        "more BYTES elements than the shape": (post(infer, zeros_head + b"\0" * 12, b"Inference-Header-Content-Length: "
                                                    + str(len(zeros_head)).encode()), "more"),
        "a float for an INT32 (it was truncated: 1.5 became 1)": (post(infer, json.dumps({"inputs": [
            {"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 1.5]}]}).encode()), "must be integers, got 1.5"),
        "a datatype that is a list (unhashable: a 500)": (post(infer, json.dumps({"inputs": [
            {"name": "x", "shape": [1], "datatype": ["FP32"], "data": [1]}]}).encode()), "datatype"),
        "a number past FP16's range (it became inf)": (post(infer, json.dumps({"inputs": [
            {"name": "x", "shape": [1], "datatype": "FP16", "data": [1e300]}]}).encode()), "beyond its range"),
        "an id that is not a string (nested 300 deep, it was a 500 after the model ran)": (post(infer, json.dumps({
            "id": json.loads("[" * 300 + "]" * 300), "inputs": [tensor([1], data=["a"])]}).encode()),
            '\\"id\\" must be a string'),
        "two inputs of one name": (post(infer, json.dumps({"inputs": [tensor([1], data=["a"]),
                                                                      tensor([1], data=["b"])]}).encode()), "taken"),
        "repository index nested past any depth": (post("/v2/repository/index", b"[" * 100_000), "not JSON"),
        "a stream's input nested past any depth": (post("/v2/models/default/generate_stream", b"[" * 100_000),
                                                   "not JSON"),
        "a stream's input a lone surrogate": (post("/v2/models/default/generate_stream", b'{"x": "\\ud800"}'),
                                              "not JSON"),
    }
    for what, (request, words) in cases.items():
        status, body = raw_http(pool.address, request)
        assert status == 400 and words in body.decode(), (what, status, body[:300])
    status, _ = raw_http(pool.address, b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                       b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                       b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert status == 200  # no websocket here: the request is read as plain HTTP (it was a 500)
    # an integer past 64 bits (msgpack cannot carry it: was a 500) is read as JSON's number, a float
    status, body = raw_http(pool.address, post("/v2/models/default/generate_stream", b'{"x": 18446744073709551616}'))
    assert status == 200 and b'"x":1.8446744073709552e+19' in body
    status, body = raw_http(pool.address, post(infer, json.dumps({"inputs": [tensor([1], data=["ok"])]}).encode()))
    assert status == 200 and json.loads(body)["outputs"]


def test_a_body_that_trickles_in_is_408_however_often_a_byte_comes(start_pool):
    """A pause longer than --http-client-timeout was a 408, but a byte every so often, just
    inside it, held the connection (and its buffer) for as long as the client liked. Each byte
    now buys 2 ms past the timeout (500 bytes/s, as Apache's mod_reqtimeout)."""
    import socket

    pool = http_pool(start_pool, "--model", FAULTY, "--http-client-timeout", "1", workers=1)
    host, port = pool.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        sock.setblocking(False)
        answered = b""
        for _ in range(200):  # a byte each 0.3 s, for at most 60 s; the 408 comes after about 1 s
            try:
                sock.send(b"{")
            except OSError:  # closed after its answer
                pass
            time.sleep(0.3)
            try:
                answered += sock.recv(4096)
            except BlockingIOError:
                continue
            if answered:
                break
    assert answered.startswith(b"HTTP/1.1 408"), answered[:200]


def test_a_bytes_tensor_of_any_rank_comes_back_through_an_echo(start_pool):
    """The gateway hands a model a BYTES tensor of rank 2 as nested lists of bytes, and refused
    the same nested lists as an answer (a 500: "dtype |S1, which the protocol cannot carry")."""
    pool = http_pool(start_pool, "--model", "isopool.examples.faulty:make_echo", workers=1)
    data = ["a", "bb", "ccc", "dddd", "", "f"]
    for shape in ([6], [2, 3], [3, 1, 2]):
        status, body = raw_http(pool.address, post("/v2/models/default/infer", json.dumps(
            {"inputs": [{"name": "x", "shape": shape, "datatype": "BYTES", "data": data}]}).encode()))
        assert status == 200, (shape, body[:300])
        [out] = json.loads(body)["outputs"]
        assert out["datatype"] == "BYTES" and out["shape"] == shape and out["data"] == data


def test_answers_the_protocol_cannot_carry_say_so_and_non_finite_floats_survive_json(start_pool):
    """Found by a hostile pass: NaN and ±inf came back as null in JSON (tritonclient read NaN for
    all three); an answer holding a map came back as its Python repr in JSON and as a 500
    "internal error in the gateway" in binary; an input named "parameters" was silently
    replaced by the request's parameters. Now: NaN, Infinity and -Infinity as Triton writes
    them, read back exactly by tritonclient; a 500 naming the output that is no tensor (an
    output the request does not ask for need not be one); a 400 for the name clash."""
    pool = http_pool(start_pool, "--model", "isopool.examples.faulty:make_echo", workers=1)
    client = triton.InferenceServerClient(pool.address)
    x = np.array([[np.inf, -np.inf, np.nan, 1.5]], dtype=np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    answer = client.infer("default", [inp], outputs=[triton.InferRequestedOutput("OUTPUT0", binary_data=False)])
    got = answer.as_numpy("OUTPUT0")  # a lone input is passed as itself, and its echo named as any lone answer
    assert got.dtype == np.float32 and np.array_equal(got, x, equal_nan=True), got
    infer = "/v2/models/default/infer"
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}
    status, body = raw_http(pool.address, post(infer, json.dumps(
        {"inputs": [tensor], "parameters": {"note": {"k": 1}}}).encode()))  # the echo answers the map too
    assert status == 500 and b"'parameters' is a dict, which is not a tensor" in body, body
    for binary in (False, True):
        status, body = raw_http(pool.address, post(infer, json.dumps(
            {"inputs": [tensor], "parameters": {"note": {"k": 1}, "binary_data_output": binary},
             "outputs": [{"name": "x"}]}).encode()))
        assert status == 200 and (binary or json.loads(body)["outputs"][0]["data"] == [1.0]), body[:300]
    status, body = raw_http(pool.address, post(infer, json.dumps(
        {"inputs": [tensor, {**tensor, "name": "parameters"}], "parameters": {"p": 1}}).encode()))
    assert status == 400 and b"an input is named \\\"parameters\\\"" in body, body
