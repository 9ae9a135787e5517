"""TLS and bearer tokens on the HTTP front: curl and tritonclient over https, roles as CURVE's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.http as triton

from isopool.gateway.auth import new_token
from tests.helpers import ROOT, http_pool, need

CLIENT = new_token()


@pytest.fixture
def secured(start_pool, short_tmp):
    """A pool on https with a client and an admin token; pool.curl(path, ...) -> (status, JSON, headers)."""
    openssl, curl = need("openssl"), need("curl")
    cert, key = short_tmp / "cert.pem", short_tmp / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    tokens = short_tmp / "tokens"
    tokens.write_text(f"# test tokens\nclient {CLIENT}\n")
    tokens.chmod(0o600)
    made = subprocess.run([sys.executable, "-m", "isopool.cli", "keygen", "root", "--http-tokens", str(tokens), "--admin"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    admin = made.stdout.strip()
    assert tokens.stat().st_mode & 0o777 == 0o600 and f"admin {admin}  # root" in tokens.read_text()
    pool = http_pool(start_pool, "--http-cert", str(cert), "--http-key", str(key), "--http-tokens", str(tokens))
    pool.subscribe()
    pool.cert, pool.tokens, pool.admin = cert, tokens, admin

    def call(path: str, token: str | None = None, method: str = "GET", body: str | None = None):
        args = [curl, "-s", "--cacert", str(cert), "-X", method, f"https://{pool.address}{path}",
                "-D", "-", "-w", "\n%{http_code}"]
        if token is not None:
            args += ["-H", f"Authorization: Bearer {token}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "-d", body]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        text, code = out.stdout.rsplit("\n", 1)
        head, _, payload = text.partition("\n\n")  # text mode reads \r\n as \n
        return int(code), json.loads(payload) if payload else None, head.lower()

    pool.curl = call
    return pool


def test_tokens_and_roles_over_tls(secured):
    infer = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]})
    assert secured.curl("/v2/health/ready")[0] == 200  # probes need no token
    code, body, head = secured.curl("/v2/models/default/infer", method="POST", body=infer)
    assert code == 401 and "bearer token" in body["error"] and 'www-authenticate: bearer realm="isopool"' in head
    assert secured.curl("/v2/models/default/infer", "not-a-token-of-ours", "POST", infer)[0] == 401
    assert secured.curl("/v1/models", "wrong")[1]["error"]["type"] == "invalid_request_error"  # OpenAI's shape
    code, body, _ = secured.curl("/v2/models/default/infer", CLIENT, "POST", infer)
    assert code == 200 and body["outputs"][0]["shape"] == [1, 4]
    code, body, _ = secured.curl("/v2/repository/models/twice/load", CLIENT, "POST",
                                 '{"parameters": {"model": "isopool.examples.batched:Doubler"}}')
    assert code == 403 and "admin token" in body["error"]
    code, body, _ = secured.curl("/v2/repository/models/twice/load", secured.admin, "POST",
                                 '{"parameters": {"model": "isopool.examples.batched:Doubler", "workers": 1}}')
    assert code == 200, body
    secured.wait_until(lambda s: s["models"].get("twice", {}).get("workers_ready", 0) >= 1, "ready", timeout=60)
    index = secured.curl("/v2/repository/index", CLIENT, "POST", '{"ready": true}')[1]
    assert {m["name"] for m in index} == {"default", "twice"}
    assert secured.curl("/v2/repository/models/twice/unload", secured.admin, "POST")[0] == 200
    secured.wait_until(lambda s: "twice" not in s["models"], "unloaded", timeout=60)
    assert secured.curl("/v2/models/twice", CLIENT)[0] == 404


def test_tritonclient_over_https_with_a_token_and_a_new_token_without_restart(secured):
    client = triton.InferenceServerClient(secured.address, ssl=True, ssl_options={"ca_certs": str(secured.cert)})
    x = np.ones((2, 16), dtype=np.float32)
    inp = triton.InferInput("INPUT0", [2, 16], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(triton.InferenceServerException, match="bearer token"):
        client.infer("default", [inp])
    assert client.infer("default", [inp], headers={"Authorization": f"Bearer {CLIENT}"}).as_numpy("OUTPUT0").shape == (2, 4)
    added = new_token()
    secured.tokens.write_text(secured.tokens.read_text() + f"client {added}\n")  # a gateway rereads it on change
    for _ in range(100):  # bounded: each gateway checks the file at most once a second
        codes = {secured.curl("/v2", added)[0] for _ in range(4)}
        if codes == {200}:
            break
        time.sleep(0.1)  # no event says a file was reread: a bounded poll
    assert codes == {200}


def test_http_admin_routes_are_off_without_tokens_and_bad_tls_or_tokens_stop_the_start(start_pool, short_tmp):
    pool = http_pool(start_pool)
    code = subprocess.run([need("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                           f"http://{pool.address}/v2/repository/models/x/load"],
                          capture_output=True, text=True, timeout=60).stdout
    assert code == "403"
    loose = short_tmp / "loose-tokens"
    loose.write_text(f"client {CLIENT}\n")
    loose.chmod(0o644)
    missing_key = short_tmp / "cert-only.pem"
    missing_key.write_text("")
    for args, words in [(["--http-tokens", str(loose)], "chmod 600"),
                        (["--http-cert", str(missing_key)], "both --http-cert and --http-key"),
                        (["--http-cert", str(missing_key), "--http-key", str(missing_key)], "cannot use --http-cert")]:
        out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--http", "127.0.0.1:0", "--endpoint",
                              f"ipc://{short_tmp}/refused.sock", *args], capture_output=True, text=True, timeout=60,
                             cwd=ROOT, env={**os.environ, "ISOPOOL_ENDPOINT": ""})
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
