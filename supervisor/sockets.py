"""The shell's sockets and descriptors: opened once at start, closed once at the end.

    frontend  ROUTER, the user's endpoint (ipc:// in a 0700 dir, or tcp:// with CURVE)
    backend   ROUTER, ipc:// in the supervisor's private directory: workers only, one connection each (auth.Zap)
    events    XPUB beside an ipc frontend (`isopool events`)
    metrics   Prometheus over HTTP, when --metrics-port is given
    wake      the wake-up fd: signal handlers and the connection guard only write a byte there
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil
import signal
import stat
import socket
import tempfile

import zmq

from isopool.protocol.endpoints import closed_path, default_endpoint, ensure_private_dir, ipc_path, is_tcp, runtime_dir
from isopool.protocol.iothread import io_context
from isopool.protocol.transport import bounds

from .auth import AuthError, CurveAuth, Zap
from .config import PoolConfig
from .connections import LISTEN_BACKLOG, Connections, Listener, reserve_for
from .events import EventLog
from . import sandbox
from .metrics import serve_metrics
from .replies import SNDHWM

log = logging.getLogger("isopool.supervisor")


HANDSHAKE_S = 5  # a connection that has not finished its ZeroMQ (and CURVE) handshake by then is dropped
BACKEND_RCVHWM = 256  # ZeroMQ messages (a bundle is one) read ahead from one worker
FRONTEND_RCVHWM = 64  # and from one client connection: past it libzmq stops reading that connection,
# so a client that sends faster than the supervisor reads waits in its own pipe, not in our memory
FINAL_LINGER_MS = 1000  # at close: how long the last answers may take to leave (a client that reads none: no longer)


class StartupError(RuntimeError):
    """The pool could not start (a model that will not load, an endpoint in use)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one: every client connection and every
    worker costs descriptors, and the common soft limit of 1,024 is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def unpredictable_routing_ids() -> None:
    """Seed the C library's rand() from the kernel's random source. A ROUTER names each
    connection that names itself not (a plain ZeroMQ client: isopool's own clients name
    themselves at random, client/connection.py) 0x00 and a counter starting at rand(), which
    libzmq never seeds: the same names in every run. A client could then connect under the
    name the next client will be given, and libzmq, which does not check the names it makes
    up, aborts the supervisor (an assertion); or under a departed client's, and be sent its
    answers. Seeded, the counter starts at one of 2**32 values nobody can see."""
    try:
        ctypes.CDLL(None).srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "little")))
    except (OSError, AttributeError) as exc:  # no C library to call: libzmq's names stay as they are
        log.warning("could not seed the C library's rand() (%s): ZeroMQ's names for plain clients are "
                    "predictable; use isopool's clients, which name themselves at random", exc)


class Sockets:
    def __init__(self, config: PoolConfig):
        self.config = config
        if config.sandbox:
            try:
                sandbox.check(config.sandbox_user)
            except sandbox.SandboxUnavailable as exc:
                raise StartupError(str(exc), exit_code=2) from None
            if (closed := sandbox.unreadable_python()) is not None:
                log.warning("--sandbox: %s is closed to other users, so sandboxed workers can import only what "
                            "the template imported before the sandbox; install Python where every user may "
                            "read it (e.g. /usr or /opt)", closed)
        self.fd_limit = raise_fd_limit()
        self.endpoint = config.endpoint or default_endpoint()
        self.auth: CurveAuth | None = None
        self.metrics = None
        self.metrics_url: str | None = None
        self.private_dir: str | None = None
        self.ctx, self.io_threads = io_context()
        self.frontend = self._bind_frontend()
        # sandboxed workers must reach the backend, never the frontend: then the private dir is
        # not inside the frontend's 0700 directory but in the system's temp dir, itself 0750 to them
        self.private_dir = tempfile.mkdtemp(prefix="isopool-", dir=None if config.sandbox else self._private_parent())
        self.backend_endpoint = f"ipc://{self.private_dir}/backend.sock"
        self.backend = self.ctx.socket(zmq.ROUTER)
        largest = bounds(config.limits)[0]  # one frame over it: ZeroMQ drops the connection
        # a worker's messages wait in its own pipe (its SNDHWM is 0), not here, past BACKEND_RCVHWM:
        # a model flooding its socket grows its own worker (--max-rss), never the supervisor
        for opt, val in ((zmq.SNDHWM, 0), (zmq.RCVHWM, BACKEND_RCVHWM), (zmq.LINGER, 0), (zmq.MAXMSGSIZE, largest),
                         (zmq.BACKLOG, LISTEN_BACKLOG)):
            self.backend.setsockopt(opt, val)
        self.zap.guard_backend(self.backend)
        self.backend.bind(self.backend_endpoint)
        if config.sandbox:  # the workers' group may reach the backend socket, and nothing else of ours
            sandbox.prepare(self.private_dir, self.backend_endpoint[len("ipc://"):])
        path = ipc_path(self.endpoint)
        self.events = EventLog(self.ctx, f"ipc://{path}.events" if path is not None else None)
        self.http_metrics_dir: str | None = None  # the gateways' metrics files (gateway/metrics.py)
        if config.metrics_port and config.http:
            self.http_metrics_dir = os.path.join(self.private_dir, "http-metrics")
            os.mkdir(self.http_metrics_dir, 0o700)
        if config.metrics_port:
            try:
                self.metrics, port = serve_metrics(config.metrics_host, config.metrics_port, self.http_metrics_dir)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}; "
                                   "choose another --metrics-port") from None
            self.metrics_url = f"http://{config.metrics_host}:{port}/metrics"
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self.connections = Connections(self.ctx, self._listeners(), self.fd_limit, wake=self.wake)

    def _listeners(self) -> list[Listener]:
        """What the connection guard watches: the frontend first, then the event socket (both
        clients': shed, and their doors close at 2 × reserve), then the backend (workers':
        never shed, its door closes only at reserve / 2, so restarts keep connecting while a
        crowd of clients waits)."""
        r = reserve_for(self.fd_limit)
        path = ipc_path(self.endpoint)
        out = [Listener("frontend", self.frontend, _local_address(self.endpoint), path, True, 2 * r, 2 * r + r // 2)]
        if self.events.pub is not None:
            events = ipc_path(self.events.endpoint)
            out.append(Listener("event socket", self.events.pub, str(events), events, True, 2 * r, 2 * r + r // 2))
        backend = ipc_path(self.backend_endpoint)
        out.append(Listener("backend", self.backend, str(backend), backend, False, r // 2, r))
        return out

    def _private_parent(self) -> str:
        path = ipc_path(self.endpoint)
        if path is not None:
            return str(path.parent)
        return str(ensure_private_dir(runtime_dir()))

    def _bind_frontend(self) -> zmq.Socket:
        cfg = self.config
        if is_tcp(self.endpoint) and not cfg.insecure and not cfg.curve_secret_key:
            raise StartupError(
                f"refusing to serve {self.endpoint} without authentication: anyone who can reach the port "
                "could send requests. Give --curve-secret-key and --curve-clients (keys from `isopool keygen`), "
                "use an ipc:// endpoint, or pass --insecure on a trusted network")
        if cfg.curve_secret_key:
            try:
                self.auth = CurveAuth(cfg.curve_secret_key, cfg.curve_clients, cfg.curve_admins)
            except AuthError as exc:
                raise StartupError(str(exc)) from None
        self.zap = Zap(self.ctx, self.auth)  # bound before anything may connect
        path = ipc_path(self.endpoint)
        if path is not None:
            if cfg.endpoint is None:
                ensure_private_dir(path.parent)
            aside = closed_path(path)  # where a supervisor short of descriptors keeps it (connections.py)
            if _ipc_in_use(path) or _ipc_in_use(aside):
                raise StartupError(f"another process is already serving {self.endpoint}; stop it first "
                                   "or choose another --endpoint")
            for stale in (aside, closed_path(path.with_name(path.name + ".events"))):  # a killed supervisor's
                if stale.is_socket():
                    stale.unlink()
            if (path.exists() or path.is_symlink()) and not stat.S_ISSOCK(os.lstat(path).st_mode):
                # binding would unlink it: a stale socket may be replaced, nothing else
                raise StartupError(f"{path} exists and is not a socket; refusing to replace it. Choose another "
                                   "--endpoint, or remove the file if it is yours to remove")
        unpredictable_routing_ids()
        sock = self.ctx.socket(zmq.ROUTER)
        # a full pipe to a client (it does not read) and a departed client both fail a send
        # at once, instead of queueing without bound or dropping in silence (replies.py)
        for opt, val in ((zmq.SNDHWM, SNDHWM), (zmq.ROUTER_MANDATORY, 1), (zmq.RCVHWM, FRONTEND_RCVHWM), (zmq.LINGER, 0),
                         (zmq.MAXMSGSIZE, bounds(cfg.limits)[0]), (zmq.HANDSHAKE_IVL, HANDSHAKE_S * 1000),
                         (zmq.BACKLOG, LISTEN_BACKLOG)):
            sock.setsockopt(opt, val)
        if self.auth is not None:
            self.auth.secure(sock)
        elif path is not None:  # the kernel says which process each connection is: shared memory's pid
            self.zap.guard_local(sock)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise StartupError(f"cannot bind {self.endpoint}: {exc}") from None
        if path is not None:
            os.chmod(path, 0o600)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.endpoint
        return sock

    def wake(self) -> None:
        """Wake the loop from another thread (the connection guard)."""
        try:
            self.wake_w.send(b"c")
        except OSError:
            pass  # full: the loop is awake already

    def drain_wake(self) -> None:
        try:
            while self.wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.events.close()
        self.connections.close()
        # the last answers (a drain's, a SHUTDOWN's own reply) may still be in libzmq's queue, not
        # yet on the wire (CURVE encrypts them there first): a moment to send them, bounded
        self.frontend.close(linger=FINAL_LINGER_MS)
        self.zap.close()
        self.backend.close(linger=0)
        self.wake_r.close()
        self.wake_w.close()
        self.ctx.term()
        path = ipc_path(self.endpoint)
        for p in (path, path and path.with_name(path.name + ".events")):
            if p is not None and p.exists():
                p.unlink()
        if self.private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)


def _local_address(endpoint: str) -> str | int:
    """What getsockname() says on a connection the frontend accepted: its path, or its port."""
    path = ipc_path(endpoint)
    return str(path) if path is not None else int(endpoint.rsplit(":", 1)[1])


def _ipc_in_use(path) -> bool:
    """True if something accepts connections on the unix socket at `path`."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False
