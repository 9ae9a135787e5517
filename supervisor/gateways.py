"""HTTP gateway processes: started, watched (a pidfd each) and restarted by the shell.

    listening socket (bound here, once) ──inherited──► gateway 0..N-1 (python -m isopool.gateway)
                                                          │ AsyncClient over the ipc frontend
    a gateway exits ──pidfd──► gateway_exited event ──► restarted after a backoff

A gateway is a client of the supervisor like any other, so none of this touches the cores:
a crashed gateway costs only the HTTP requests it had open, and the models never notice.
Its output goes to the supervisor's stderr.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass

import zmq
import zmq.auth

from isopool.protocol.exits import exit_fields

log = logging.getLogger("isopool.supervisor")

BACKOFF_S = (0.1, 0.5, 2.0, 5.0)  # restart delays after quick successive deaths
STABLE_S = 10.0  # a gateway that lived this long starts its backoff over
STOP_S = 5.0  # TERM, then KILL after this long, at the end


@dataclass
class Gateway:
    index: int
    proc: subprocess.Popen | None = None
    pidfd: int = -1
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    due: float | None = None  # when to start it (again)
    last_exit: dict | None = None


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {address!r} should be HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gateways:
    def __init__(self, address: str, count: int, env: dict[str, str], poller: zmq.Poller, tls: bool = False):
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=1024)
        self.sock.set_inheritable(True)
        self.address = "%s:%d" % self.sock.getsockname()[:2]
        self.url = f"{'https' if tls else 'http'}://{self.address}"
        self.env, self.poller = env, poller  # what every gateway is told (gateway/__main__.py)
        self.gateways = [Gateway(i, due=0.0) for i in range(count)]

    def tick(self, now: float) -> list[tuple[str, dict]]:
        """Start the gateways that are due; (event kind, fields) of what happened."""
        out = []
        for g in self.gateways:
            if g.proc is None and g.due is not None and now >= g.due:
                out.append(self.start(g, now))
        return out

    def next_due(self) -> float:
        return min((g.due for g in self.gateways if g.proc is None and g.due is not None), default=float("inf"))

    def start(self, g: Gateway, now: float) -> tuple[str, dict]:
        env = {**os.environ, **self.env, "ISOPOOL_GATEWAY_FD": str(self.sock.fileno())}
        try:
            g.proc = subprocess.Popen([sys.executable, "-m", "isopool.gateway"], env=env, stdin=subprocess.DEVNULL,
                                      pass_fds=(self.sock.fileno(),))
            g.pidfd = os.pidfd_open(g.proc.pid)
        except OSError as exc:  # EMFILE, EAGAIN: try again later
            g.proc, g.due = None, now + BACKOFF_S[-1]
            return "gateway_failed", {"gateway": g.index, "error": str(exc)}
        self.poller.register(g.pidfd, zmq.POLLIN)
        g.started_at, g.due = now, None
        return "gateway_started", {"gateway": g.index, "pid": g.proc.pid, "address": self.address}

    def ready(self, ready: dict, now: float) -> list[tuple[str, dict]]:
        out = []
        for g in self.gateways:
            if g.proc is not None and g.pidfd in ready and g.proc.poll() is not None:
                self.poller.unregister(g.pidfd)
                os.close(g.pidfd)
                g.last_exit = {"pid": g.proc.pid, **exit_fields(g.proc.returncode)}
                g.quick_deaths = g.quick_deaths + 1 if now - g.started_at < STABLE_S else 0
                g.due = now + BACKOFF_S[min(g.quick_deaths, len(BACKOFF_S) - 1)]
                g.restarts += 1
                g.proc, g.pidfd = None, -1
                log.warning("HTTP gateway %d (pid %s) exited: %s; restarting it", g.index, g.last_exit["pid"],
                            g.last_exit["reason"])
                out.append(("gateway_exited", {"gateway": g.index, **g.last_exit}))
        return out

    def pids(self) -> list[int]:
        return [g.proc.pid for g in self.gateways if g.proc is not None]

    def facts(self) -> dict:
        return {"http": self.address, "http_url": self.url, "gateways": [
            {"id": g.index, "pid": g.proc.pid if g.proc is not None else None, "restarts": g.restarts,
             "last_exit": g.last_exit} for g in self.gateways]}

    def close(self) -> None:
        running = [g for g in self.gateways if g.proc is not None]
        for g in running:
            g.proc.terminate()
        end = time.monotonic() + STOP_S
        for g in running:
            try:
                g.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                g.proc.kill()
                g.proc.wait(5)
            try:
                self.poller.unregister(g.pidfd)
            except KeyError:
                pass
            os.close(g.pidfd)
        self.sock.close()


def open_gateways(cfg, io, poller: zmq.Poller) -> Gateways | None:
    """The HTTP gateways `cfg.http` asks for (None without it); StartupError saying why not.

    `io` is the daemon's Sockets: its endpoint (the gateways connect to it as clients; for
    tcp:// with CURVE, with a key of their own made here and let in as an admin's), its
    private directory and where the gateways' metrics go."""
    from .sockets import StartupError

    if not cfg.http:
        return None
    try:
        host, _ = parse_address(cfg.http)
    except ValueError as exc:
        raise StartupError(str(exc), exit_code=2) from None
    secured = bool(cfg.http_cert and cfg.http_key and cfg.http_tokens)
    if not is_loopback(host) and not secured and not cfg.insecure:
        raise StartupError(f"refusing to serve HTTP on {cfg.http} in the clear: anyone who can reach it could call "
                           "the models. Give --http-cert, --http-key and --http-tokens, bind 127.0.0.1, or pass "
                           "--insecure on a trusted network", exit_code=2)
    env = {"ISOPOOL_GATEWAY_ENDPOINT": _connect_endpoint(io.endpoint),
           "ISOPOOL_GATEWAY_MAX_BODY": str(cfg.max_message_bytes + (64 << 10)),
           "ISOPOOL_GATEWAY_LOG": f"{logging.getLevelName(logging.getLogger().level).lower()}:{_log_format()}",
           "ISOPOOL_GATEWAY_ACCESS_LOG": "1" if cfg.http_access_log else "0",
           "ISOPOOL_GATEWAY_CLIENT_TIMEOUT": str(cfg.http_client_timeout),
           **_tls_env(cfg), **_tokens_env(cfg), **_curve_env(io)}
    if io.http_metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = io.http_metrics_dir
    try:
        gateways = Gateways(cfg.http, cfg.gateway_count(), env, poller, tls=bool(cfg.http_cert))
    except OSError as exc:
        raise StartupError(f"cannot serve HTTP on {cfg.http}: {exc}; choose another --http", exit_code=1) from None
    log.info("HTTP (Open Inference Protocol) on %s with %d gateway(s)%s", gateways.url, len(gateways.gateways),
             ", bearer tokens required" if cfg.http_tokens else "")
    return gateways


def _tls_env(cfg) -> dict[str, str]:
    from .sockets import StartupError

    if bool(cfg.http_cert) != bool(cfg.http_key):
        raise StartupError("TLS needs both --http-cert and --http-key (PEM files)", exit_code=2)
    if not cfg.http_cert:
        return {}
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.http_cert, cfg.http_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot use --http-cert {cfg.http_cert} with --http-key {cfg.http_key}: {exc}",
                           exit_code=2) from None
    return {"ISOPOOL_GATEWAY_CERT": os.path.abspath(cfg.http_cert), "ISOPOOL_GATEWAY_KEY": os.path.abspath(cfg.http_key)}


def _tokens_env(cfg) -> dict[str, str]:
    from isopool.gateway.auth import TokenFileError, read_tokens

    from .sockets import StartupError

    if not cfg.http_tokens:
        return {}
    try:
        read_tokens(cfg.http_tokens)  # each gateway reads it again, and when it changes
    except TokenFileError as exc:
        raise StartupError(str(exc), exit_code=2) from None
    return {"ISOPOOL_GATEWAY_TOKENS": os.path.abspath(cfg.http_tokens)}


def _curve_env(io) -> dict[str, str]:
    """For a CURVE frontend: a key pair for the gateways, written to the private directory
    and let in as an admin's (the gateways check HTTP roles themselves)."""
    if io.auth is None:
        return {}
    public, secret = zmq.auth.create_certificates(io.private_dir, "gateway")
    server = os.path.join(io.private_dir, "server.key")
    with open(server, "w") as f:
        f.write(f'curve\n    public-key = "{io.auth.public.decode()}"\n')
    public_key, _ = zmq.auth.load_certificate(public)
    io.auth.admins.add(public_key)
    io.auth.clients.add(public_key)
    return {"ISOPOOL_CURVE_SECRET_KEY": secret, "ISOPOOL_CURVE_SERVER_KEY": server}


def _connect_endpoint(endpoint: str) -> str:
    """Where a gateway on this host reaches a frontend bound at `endpoint`."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if host in ("*", "0.0.0.0", ""):
            return f"tcp://127.0.0.1:{port}"
        if host in ("[::]", "::"):
            return f"tcp://[::1]:{port}"
    return endpoint


def _log_format() -> str:
    from isopool.logs import JsonFormatter

    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers) else "text"
