"""What operators see: metrics, events, status and health agree with what really happened."""

from __future__ import annotations

import http.client
import os
import signal
import time
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from isopool.errors import WorkerCrashed
from tests.helpers import assert_replaced, free_port

FAULTY = "isopool.examples.faulty:Faulty"


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_requests_and_the_crash_exactly(start_pool):
    pool = start_pool("--workers", "2", "--model", FAULTY, "--metrics-port", str(free_port()))
    url = pool.status()["pool"]["metrics_url"]
    with pool.client() as c:
        for i in range(25):
            c.infer({"do": "ok", "i": i})
        with pytest.raises(WorkerCrashed):
            c.infer({"do": "exit", "code": 3}, retry=False)
    pool.all_ready()
    m = scrape(url)

    def of(**labels: str) -> tuple:  # every series has its model's label
        return tuple(sorted({"model": "default", **labels}.items()))

    assert m[("isopool_requests_total", of(outcome="ok"))] == 25
    assert m[("isopool_requests_total", of(outcome="crashed"))] == 1
    assert m[("isopool_worker_restarts_total", of(reason="crash"))] == 1
    assert m[("isopool_request_duration_seconds_count", of())] == 25
    assert m[("isopool_workers", of(state="idle"))] == 2
    assert m[("isopool_queue_depth", of())] == 0 and m[("isopool_in_flight", of())] == 0
    assert all(m[("isopool_worker_rss_bytes", of(worker=str(w)))] > 0 for w in (0, 1))


def test_idle_connections_to_metrics_hold_no_thread_or_descriptor_of_the_supervisor(start_pool):
    """Found by a hostile pass: prometheus-client's server kept a thread and an fd for each
    connection, for as long as the connection stayed (a half-sent request had no deadline):
    1,000 of them took every fd the supervisor had, its doors to clients and workers closed,
    and no worker could be restarted. Now at most MAX_SCRAPES are served at once, each within
    SCRAPE_TIMEOUT_S; the rest are closed as they come."""
    import socket

    from isopool.supervisor.metrics import MAX_SCRAPES

    pool = start_pool("--metrics-port", str(free_port()))
    url = pool.status()["pool"]["metrics_url"]
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    supervisor = psutil.Process(pool.proc.pid)
    threads, fds = supervisor.num_threads(), supervisor.num_fds()
    held = []
    try:
        for _ in range(200):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            held.append(sock)
        assert pool.status()["pool"]["workers_ready"] >= 1  # the supervisor answers meanwhile
        assert supervisor.num_threads() <= threads + MAX_SCRAPES
        assert supervisor.num_fds() <= fds + MAX_SCRAPES + 2
        assert sum(s.recv(1) == b"" for s in held[:MAX_SCRAPES]) == MAX_SCRAPES  # timed out and closed
    finally:
        for sock in held:
            sock.close()
    for _ in range(50):  # and it serves on, once the threads that served those have seen them go (bounded)
        try:
            assert scrape(url)[("isopool_queue_depth", (("model", "default"),))] == 0
            break
        except (ConnectionError, http.client.RemoteDisconnected):
            time.sleep(0.1)
    else:
        raise AssertionError("no scrape was served after the idle connections closed")


def test_events_crash_restart_ready_in_order_with_pids(faulty):
    victim = faulty.workers()[0]
    os.kill(victim["pid"], signal.SIGKILL)
    crashed = faulty.wait_event("crashed", worker=victim["id"])
    restarted = faulty.wait_event("restarted", worker=victim["id"])
    ready = faulty.wait_event("ready", worker=victim["id"])
    assert crashed["pid"] == victim["pid"] and crashed["signal"] == "SIGKILL"
    assert "OOM" in crashed["reason"]
    assert restarted["pid"] == ready["pid"] != victim["pid"]
    assert crashed["ts"] <= restarted["ts"] <= ready["ts"]
    assert restarted["generation"] == ready["generation"] == crashed["generation"] + 1


def test_a_subscription_longer_than_any_event_kind_drops_its_connection(faulty):
    """libzmq keeps every subscription a subscriber sends, a trie node per byte: one of 8 MiB
    once cost the supervisor 400 MiB, kept after the subscriber left. The event socket now
    takes topics of at most 64 bytes and drops a connection that sends a longer one. (4 KiB
    here: the subscriber's own XSUB keeps what it sends the same way, and frees it by
    recursion, which 8 MiB overflows in the test process.)"""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    subscribers = faulty.status()["pool"]["event_subscribers"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XSUB)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(faulty.endpoint + ".events")
        seen = []
        for _ in range(10):  # bounded: the handshake, then the drop
            assert monitor.poll(20_000), f"no connection event within 20 s; saw {seen}"
            seen.append(recv_monitor_message(monitor)["event"])
            if seen == [zmq.EVENT_HANDSHAKE_SUCCEEDED]:
                sock.send(b"\x01" + b"z" * 4096)
            if seen[-1] == zmq.EVENT_DISCONNECTED:
                break
        assert seen[-1] == zmq.EVENT_DISCONNECTED, seen
    finally:
        sock.close()
        monitor.close()
        ctx.term()
    assert faulty.status()["pool"]["event_subscribers"] == subscribers  # it was never counted
    victim = faulty.workers()[0]  # and events flow to a subscriber that asks for what exists
    os.kill(victim["pid"], signal.SIGKILL)
    assert faulty.wait_event("crashed", worker=victim["id"])["pid"] == victim["pid"]


def test_status_json_agrees_with_reality(faulty):
    victim = faulty.workers()[1]
    with faulty.client() as c:
        for i in range(40):
            c.infer({"do": "ok", "i": i})
        os.kill(victim["pid"], signal.SIGKILL)
        faulty.wait_event("ready", worker=victim["id"])
        for i in range(10):
            c.infer({"do": "ok", "i": i})
    status = faulty.all_ready()
    pool, workers = status["pool"], status["workers"]
    for key in ("workers_target", "workers_ready", "queue_depth", "in_flight", "requests_total",
                "restarts_total", "healthy"):
        assert key in pool
    for w in workers:
        for key in ("id", "pid", "state", "uptime_s", "requests", "errors", "restarts", "rss_bytes"):
            assert key in w
        assert psutil.pid_exists(w["pid"]) and psutil.Process(w["pid"]).ppid() == faulty.pid
    assert sum(w["requests"] for w in workers) == 50 == pool["outcomes"]["ok"] == pool["requests_total"]
    killed = next(w for w in workers if w["id"] == victim["id"])
    assert killed["restarts"] == 1 and killed["pid"] != victim["pid"]
    assert killed["last_exit"]["signal"] == "SIGKILL" and killed["last_exit"]["pid"] == victim["pid"]
    assert pool["healthy"]
    assert_replaced(status, {"crash": 1})


def test_worker_output_is_captured_and_tagged(start_pool):
    pool = start_pool("--workers", "1", "--model", FAULTY)
    with pool.client() as c:
        pid = c.infer({"do": "ok"})["pid"]
        with pytest.raises(Exception):
            c.infer({"do": "segv"}, retry=False)
    pool.all_ready()
    out = pool.output()
    # the segfault's own report (faulthandler) comes from the dying worker through its pipe
    assert f"worker 0 [{pid}] Fatal Python error: Segmentation fault" in out, out[-3000:]
    assert f"worker 0 [{pid}] " in out and "faulty.py" in out
