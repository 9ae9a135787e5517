"""The Open Inference Protocol over HTTP, called by real clients: tritonclient.http and curl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.http as triton

from isopool.models.default import DefaultModel
from tests.helpers import ROOT, Background, http_pool, need

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


def test_a_gateway_killed_under_load_is_restarted_and_the_models_never_notice(start_pool):
    pool = http_pool(start_pool, "--model", FAULTY)
    client = triton.InferenceServerClient(pool.address)
    victim = pool.status()["pool"]["gateways"][0]["pid"]
    with pool.client() as native, Background(native) as bg:
        os.kill(victim, signal.SIGKILL)
        pool.wait_event("gateway_exited", pid=victim, timeout=60)
        pool.wait_event("gateway_started", gateway=0, timeout=60)
        inp = triton.InferInput("do", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"ok"], dtype=object), binary_data=False)
        for _ in range(20):  # every request served, by whichever gateway accepts it
            assert client.infer("default", [inp]).get_response()["outputs"]
    assert bg.failed == [] and bg.ok > 0
    status = pool.status()
    assert status["pool"]["restarts_total"] == 0 and status["pool"]["gateways"][0]["restarts"] == 1


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
