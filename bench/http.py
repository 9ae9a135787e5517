"""The HTTP benchmark: isopool over HTTP (JSON and binary tensors) beside its native client,
LitServe and Ray Serve, all driven by the same load generator (wrk, 64 connections).

    isopool bench --http [--quick] [--out DIR] [--no-embeddings]

Every system serves the same models with 2 workers and the same batching (up to 16
requests, 2 ms: the suite's EMBED_BATCH), behind one HTTP front process each (isopool: one gateway;
LitServe: one API server; Ray Serve: its one proxy). Columns:

    tiny req/s, p50, p99      the tiny model (bench/models.py), 64 connections
    gateway µs/req            CPU time (user + system) of isopool's gateway process per request
    16 MiB binary             one 16 MiB FP32 tensor there and back over the binary tensor
                              extension, one request at a time: MiB/s and gateway CPU per request
    MiniLM sentences/s        all-MiniLM-L6-v2, one sentence per request, 64 connections
                              (isopool: POST /v1/embeddings; the peers: their /predict)
    failed on a kill          tiny, 64 connections: requests that failed when one worker
                              or replica was SIGKILLed a third of the way into the run

Before it is measured, each system's answer is checked against the model in-process.
The native row is isopool's own Client (64 in flight), for what HTTP costs. wrk comes from
Debian (apt-get install wrk); LitServe and Ray Serve from the `bench` extra. Writes
http.md and http.json to --out.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil

from .models import BATCHING, DIM, EMBED_BATCH, POOL_MODELS, build, embeddings_available
from .pool import in_flight_rate, serve

WORKERS = 2
CONNECTIONS = 64
SENTENCE = "the supervisor restarts a crashed worker while the other workers keep serving"
PEERS = ("litserve", "ray")
WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open(os.getenv("BENCH_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local head = os.getenv("BENCH_HEADER_LENGTH")
if head ~= nil and head ~= "" then wrk.headers["Inference-Header-Content-Length"] = head end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\nRESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration, e.connect,
    e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url: str, body: bytes, content_type: str, seconds: float, header_length: int | None = None,
        during=None) -> dict:
    """One wrk run; `during(elapsed_s)` is called once a third of the way in (the kill)."""
    tool = shutil.which("wrk")
    if tool is None:
        raise SystemExit("the HTTP benchmark needs wrk: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "body").write_bytes(body)
        Path(tmp, "bench.lua").write_text(WRK_SCRIPT)
        env = {**os.environ, "BENCH_BODY": f"{tmp}/body", "BENCH_CONTENT_TYPE": content_type,
               "BENCH_HEADER_LENGTH": "" if header_length is None else str(header_length)}
        proc = subprocess.Popen([tool, "-t", "1", "-c", str(CONNECTIONS), "-d", f"{seconds:.0f}s", "--timeout", "30s",
                                 "-s", f"{tmp}/bench.lua", url], stdout=subprocess.PIPE, text=True, env=env)
        if during is not None:
            time.sleep(seconds / 3)  # a point in the run, not a synchronisation
            during()
        out, _ = proc.communicate(timeout=seconds + 120)
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    failed = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {"rps": (r["requests"] - r["status"]) / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "failed": failed, "requests": r["requests"]}


def post(url: str, body: bytes, content_type: str, header_length: int | None = None, answer_headers=None) -> bytes:
    headers = {"Content-Type": content_type}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=120) as r:
        if answer_headers is not None:
            answer_headers.update((k.lower(), v) for k, v in r.headers.items())
        return r.read()


# ---------------------------------------------------------------- request bodies, answers


def oip_json(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "shape": [DIM], "datatype": "FP32",
                                   "data": x.tolist()}]}).encode()


def oip_binary(x: np.ndarray) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [{"name": "INPUT0", "shape": [DIM], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + x.astype("<f4").tobytes(), len(head)


def answer_of_binary(raw: bytes, header_length: int) -> np.ndarray:
    return np.frombuffer(raw[header_length:], dtype="<f4")


# ---------------------------------------------------------------- the systems


@contextlib.contextmanager
def isopool(kind: str) -> Iterator[dict]:
    port = free_port()
    with serve("--model", POOL_MODELS[kind], "--workers", str(WORKERS), *BATCHING.get(kind, ()),
               "--http", f"127.0.0.1:{port}", "--http-workers", "1") as endpoint:
        from isopool import Client

        with Client(endpoint, timeout=120) as c:
            for _ in range(100):  # the gateway starts beside the pool
                if all(g["pid"] for g in c.status()["pool"]["gateways"]):
                    break
                time.sleep(0.05)
            yield {"base": f"http://127.0.0.1:{port}", "endpoint": endpoint,
                   "pids": lambda: [w["pid"] for w in c.status()["workers"] if w["pid"]],
                   "gateways": [psutil.Process(g["pid"]) for g in c.status()["pool"]["gateways"]]}


def cpu_s(procs: list) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def costed(s: dict, run) -> dict:
    """run() (a wrk figure), with the gateway's CPU per request added."""
    before = cpu_s(s["gateways"])
    r = run()
    r["gateway_us"] = (cpu_s(s["gateways"]) - before) / max(1, r["requests"]) * 1e6
    return r


def big_binary(s: dict, n: int) -> dict:
    """A 16 MiB FP32 tensor there and back, one request at a time on one connection."""
    import http.client

    x = np.random.default_rng(3).standard_normal(4 << 20).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "echo", "shape": [x.size], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True, "bench": 1}}).encode()  # a map: the echo
    body = head + x.tobytes()
    conn = http.client.HTTPConnection(s["base"][len("http://"):], timeout=120)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}

    def once() -> bytes:
        conn.request("POST", "/v2/models/default/infer", body, headers)
        r = conn.getresponse()
        return r.read()[int(r.getheader("Inference-Header-Content-Length")):]

    assert np.array_equal(np.frombuffer(once(), dtype="<f4"), x)
    before, began = cpu_s(s["gateways"]), time.perf_counter()
    for _ in range(n):
        once()
    took = time.perf_counter() - began
    conn.close()
    return {"mib_per_s": n * 16 / took, "gateway_ms": (cpu_s(s["gateways"]) - before) / n * 1e3, "requests": n}


@contextlib.contextmanager
def peer(name: str, kind: str) -> Iterator[dict]:
    port, pids = free_port(), tempfile.mkdtemp(prefix="iso-bench-pids-")
    proc = subprocess.Popen([sys.executable, "-m", "isopool.bench.http_peers", name, "--kind", kind, "--port",
                             str(port), "--workers", str(WORKERS), "--pids", pids,
                             "--max-batch-size", str(EMBED_BATCH)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        body, _ = peer_body(kind)
        end = time.monotonic() + 300
        while True:  # a peer says nothing when it is ready: ask it, bounded
            try:
                post(base + "/predict", body, "application/json")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{name} did not start serving within 300 s (exit {proc.poll()})") from None
                time.sleep(0.5)
        yield {"base": base, "pids": lambda: sorted(int(p) for p in os.listdir(pids))}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started in its session
        proc.wait(10)
        shutil.rmtree(pids, ignore_errors=True)


def peer_body(kind: str) -> tuple[bytes, str]:
    x = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    value = x.tolist() if kind == "tiny" else SENTENCE
    return json.dumps({"input": value}).encode(), "application/json"


# ---------------------------------------------------------------- the runs


def kill_one(pids) -> None:
    os.kill(pids()[0], signal.SIGKILL)


def tiny(seconds: float, quick: bool, peers: list[str]) -> dict[str, dict]:
    x = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    expected = build("tiny")(x)
    out: dict[str, dict] = {}
    with isopool("tiny") as s:
        url = s["base"] + "/v2/models/default/infer"
        got = np.asarray(json.loads(post(url, oip_json(x), "application/json"))["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        body, head = oip_binary(x)
        answer: dict = {}
        raw = post(url, body, "application/octet-stream", head, answer)
        np.testing.assert_allclose(answer_of_binary(raw, int(answer["inference-header-content-length"])), expected,
                                   rtol=1e-5, atol=1e-6)
        out["isopool HTTP, JSON"] = costed(s, lambda: wrk(url, oip_json(x), "application/json", seconds))
        out["isopool HTTP, binary"] = costed(s, lambda: wrk(url, body, "application/octet-stream", seconds, head))
        out["isopool HTTP, 16 MiB binary"] = big_binary(s, 10 if quick else 40)
        from isopool import Client

        with Client(s["endpoint"], timeout=120) as c:
            latencies: list[float] = []
            n = 2000 if quick else 20000
            rps = in_flight_rate(c.submit, x, n, CONNECTIONS, latencies)
            latencies.sort()
            out["isopool native Client"] = {"rps": rps, "p50_ms": latencies[len(latencies) // 2] * 1e3,
                                            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}
        out["isopool HTTP, JSON"]["kill"] = wrk(url, oip_json(x), "application/json", seconds,
                                                during=lambda: kill_one(s["pids"]))
    for name in peers:
        with peer(name, "tiny") as p:
            body, kind = peer_body("tiny")
            got = np.asarray(json.loads(post(p["base"] + "/predict", body, kind))["output"], np.float32)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            out[PEER_NAMES[name]] = wrk(p["base"] + "/predict", body, kind, seconds)
            out[PEER_NAMES[name]]["kill"] = wrk(p["base"] + "/predict", body, kind, seconds,
                                                during=lambda: kill_one(p["pids"]))
    return out


def embeddings(seconds: float, peers: list[str]) -> dict[str, dict]:
    model = build("embeddings")
    expected = np.asarray(model(SENTENCE), np.float32).reshape(-1)
    out: dict[str, dict] = {}

    def close(vector) -> None:
        v = np.asarray(vector, np.float32).reshape(-1)
        assert float(v @ expected / (np.linalg.norm(v) * np.linalg.norm(expected))) >= 0.9999

    from .suite import Ceiling

    # the model's own batched throughput, just before and just after isopool's figure (the
    # guest's speed drifts by several % within a minute): the ratio is to their mean
    ceiling = Ceiling("embeddings")
    try:
        before = ceiling.throughput(SENTENCE, 1024)
        with isopool("embeddings") as s:
            body = json.dumps({"model": "default", "input": SENTENCE}).encode()
            close(json.loads(post(s["base"] + "/v1/embeddings", body, "application/json"))["data"][0]["embedding"])
            out["isopool HTTP, JSON"] = costed(s, lambda: wrk(s["base"] + "/v1/embeddings", body,
                                                              "application/json", seconds))
        after = ceiling.throughput(SENTENCE, 1024)
        out["ceiling"] = {"rps": (before + after) / 2, "before": before, "after": after}
    finally:
        ceiling.close()
    for name in peers:
        with peer(name, "embeddings") as p:
            body, kind = peer_body("embeddings")
            close(json.loads(post(p["base"] + "/predict", body, kind))["embedding"])
            out[PEER_NAMES[name]] = wrk(p["base"] + "/predict", body, kind, seconds)
    return out


PEER_NAMES = {"litserve": "LitServe", "ray": "Ray Serve"}
ROWS = ["isopool native Client", "isopool HTTP, JSON", "isopool HTTP, binary", "LitServe", "Ray Serve"]


def table(t: dict, e: dict | None) -> str:
    lines = ["| system | tiny req/s | p50 ms | p99 ms | gateway µs/req | MiniLM sentences/s | gateway µs/req "
             "| failed on a kill |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        r = t.get(row, {})
        kill = r.get("kill")
        cells = [f"{r['rps']:,.0f}" if r else "", f"{r['p50_ms']:.2f}" if r else "", f"{r['p99_ms']:.2f}" if r else "",
                 f"{r['gateway_us']:,.0f}" if "gateway_us" in r else "",
                 f"{e[row]['rps']:,.1f}" if e and row in e else "",
                 f"{e[row]['gateway_us']:,.0f}" if e and "gateway_us" in e.get(row, {}) else "",
                 f"{kill['failed']} of {kill['requests']:,}" if kill else ""]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    big = t.get("isopool HTTP, 16 MiB binary")
    if big:
        lines += ["", f"16 MiB FP32 tensor there and back over HTTP (binary extension, one at a time): "
                      f"{big['mib_per_s']:,.0f} MiB/s, gateway CPU {big['gateway_ms']:.1f} ms per request"]
    mine = t["isopool HTTP, JSON"]
    lines += ["", "isopool over HTTP (JSON) against each peer, in the same run (above 1: isopool is ahead):", ""]
    for name in PEER_NAMES.values():
        if name not in t:
            continue
        p = t[name]
        cells = [f"{mine['rps'] / p['rps']:.2f}x req/s", f"{p['p50_ms'] / mine['p50_ms']:.2f}x p50",
                 f"{p['p99_ms'] / mine['p99_ms']:.2f}x p99"]
        if e and name in e:
            cells.append(f"{e['isopool HTTP, JSON']['rps'] / e[name]['rps']:.2f}x sentences/s")
        lines.append(f"- vs {name}: " + ", ".join(cells))
    if e and "ceiling" in e:
        c = e["ceiling"]
        lines += ["", f"MiniLM over HTTP: {e['isopool HTTP, JSON']['rps'] / c['rps']:.2f}x the in-process "
                      f"batched ceiling ({c['rps']:,.1f} sentences/s: {WORKERS} processes calling batch() on {EMBED_BATCH} "
                      f"sentences back to back; the mean of {c['before']:,.1f} just before isopool's figure and "
                      f"{c['after']:,.1f} just after)"]
    return "\n".join(lines)


def run(quick: bool, out: Path, with_embeddings: bool = True, peers: list[str] | None = None) -> int:
    from .suite import machine

    seconds = 3.0 if quick else 10.0
    peers = list(PEERS) if peers is None else peers
    missing = [m for m in peers if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: pip install -e '.[bench]'")
    t = tiny(seconds, quick, peers)
    why = embeddings_available() if with_embeddings else "skipped (--no-embeddings)"
    e = embeddings(seconds, peers) if why is None else None
    out.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"# HTTP benchmark{' (QUICK: not for comparison)' if quick else ''}\n\n{when}, {machine()}; "
            f"{WORKERS} workers each, wrk -t1 -c{CONNECTIONS} for {seconds:.0f} s a figure\n\n{table(t, e)}\n"
            + ("" if e else f"\nMiniLM: {why}\n"))
    (out / "http.md").write_text(text)
    (out / "http.json").write_text(json.dumps({"tiny": t, "embeddings": e, "quick": quick, "when": when}, indent=1))
    print(text)
    return 0
