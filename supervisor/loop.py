"""The supervisor: one thread, one poll loop, all pool state. No locks.

    clients ─DEALER─► frontend ROUTER ─┐                    ┌─ a pidfd per worker: exits seen at once
                                       ├─ poll ─► steps ────┤─ signal wake-up fd: handlers only record
    workers ─DEALER─► backend ROUTER ──┘                    └─ timers: deadlines, heartbeats, backoff
                      events PUB ──► `isopool events`

Each pass runs short steps that are safe to repeat, each only when it has work:
    read_frontend  accept / refuse requests, answer status and control ops
    read_backend   worker READY, HEARTBEAT, RESULT, CHUNK, ERROR
    read_other     when their fd fired: signals (handlers only record), event subscriptions,
                   ZAP requests, worker output pipes, pidfds (reap: settle an exited
                   worker's requests, schedule its restart), the template's socket
    expire         when a deadline is due: never started, or its worker is killed
    maintain       when the pool changed (every event marks it) or a timer is due:
                   check_workers (start timeouts, silent workers, kills, RSS sampling),
                   reconcile (start / retire workers), advance_phase (serving -> draining
                   -> stopping -> stopped), publish metrics
    dispatch       oldest queued request to the least-loaded worker with free credit

Requests are keyed (client routing id, client's request id) in one table; the same key
travels to the worker and back, so a late reply from a replaced worker is recognised
(wrong slot or attempt) and dropped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections import OrderedDict
from typing import Any

import zmq

from isopool.protocol import (
    BadRequest,
    Cancelled,
    IsopoolError,
    NotAllowed,
    Overloaded,
    PoisonRequest,
    RequestTimeout,
    ShuttingDown,
    WorkerCrashed,
    decode_error,
    encode,
    encode_error,
    ops,
    pack_header,
    peek_id,
    unpack_header,
    validate_payload,
)
from isopool.protocol import board
from isopool.protocol.endpoints import default_endpoint, ensure_private_dir, ipc_path, is_tcp, runtime_dir
from isopool.protocol.exits import EXIT_LOAD_FAILED, exit_fields
from isopool.protocol.iothread import io_context
from isopool.protocol.transport import QUICK_RUN_S, Outbox, Spinner, data, drain, unbundle
from isopool.worker.process import WorkerConfig

from . import spawner
from .config import PoolConfig
from .credits import Credits
from .auth import AuthError, CurveAuth, is_admin
from .devices import parse_devices
from .events import EventLog
from .metrics import PoolCollector, Snapshot, serve_metrics
from .notify import sd_notify
from .policy import PoisonRegistry, RestartPolicy
from .requests import Request
from .stats import Stats
from .status import build_status
from .workers import ALIVE, SERVING, State, Worker, parse_ident

log = logging.getLogger("isopool.supervisor")
worker_log = logging.getLogger("isopool.worker")

RECYCLE_REASONS = frozenset({"max_requests", "max_rss", "reload", "integrity", "tenant", "isolation"})
DRAIN_NOW_REASONS = frozenset({"tenant", "isolation"})  # bound to another tenant: no use keeping them
LOOKAHEAD = 64  # with isolation: queued requests considered per dispatch, oldest first
SURGE = 1  # extra workers allowed while replacing (recycle, reload): capacity never dips
LAST_WORDS_S = 0.005  # how long a crash waits for the dead worker's already-sent replies
TICK_S = 0.25  # longest gap between maintenance passes (heartbeats, kills, sampling)
MAX_BATCH = 512  # messages read from one socket per pass, so no source starves another
QUICK_S = 0.010  # answers this soon after dispatch: a quick model, whose bursts can wait for a busy loop
COMPACT_ABOVE = 4096  # stale deadline entries tolerated before the heap is rebuilt
EXIT_OK = 0


class StartupError(RuntimeError):
    """The pool could not start (a model that will not load, an endpoint in use)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Supervisor:
    def __init__(self, config: PoolConfig):
        self.config = config
        self.limits = config.limits
        self.endpoint = config.endpoint or default_endpoint()
        self.target = config.workers
        try:
            self.devices = parse_devices(config.devices)
        except ValueError as exc:
            raise StartupError(str(exc), exit_code=2) from None
        self.workers: dict[int, Worker] = {}
        self.requests: dict[tuple, Request] = {}
        self.queue: OrderedDict[tuple, Request] = OrderedDict()
        self.credits = Credits()  # least-loaded worker first
        self.deadlines: list[tuple[float, int, tuple]] = []  # heap; stale entries skipped, compacted
        self.seq = itertools.count()
        self.slots = itertools.count()
        self.rng = random.Random()
        self.restarts = RestartPolicy(config.backoff_base, config.backoff_max, config.max_restarts,
                                      config.restart_window, self.rng)
        self.poison = PoisonRegistry(config.poison_threshold)
        self.stats = Stats()
        self.phase = "starting"
        self.exit_code = EXIT_OK
        self.startup_error: str | None = None
        self.drain_deadline = 0.0
        self.pending_signals: list[int] = []
        self.next_stats = 0.0
        self.was_degraded = False
        self.reloading = False
        self.dirty = True  # the pool changed: run the maintenance steps on this pass
        self.next_tick = 0.0  # ...or when this time comes (timers, backoff, kills)
        self.restarts_total = 0
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.private_dir: str | None = None
        self.events: EventLog | None = None
        self.template: spawner.Template | None = None
        self.auth: CurveAuth | None = None
        self.metrics: PoolCollector | None = None
        self.metrics_url: str | None = None
        self.restart_reasons: dict[str, int] = {}
        self.template_due = 0.0  # when to (re)start the template
        self.template_started = 0.0
        self.answer_s = float("inf")  # how soon after its dispatch the last answer came
        self.worked = False  # the last pass read a client's or a worker's message
        self.spinner = Spinner(config.spin_us / 1e6) if config.spin_us else None

    # ------------------------------------------------------------ setup

    def open(self) -> None:
        self.ctx, self.io_threads = io_context()
        self.frontend = self._bind_frontend()
        self.private_dir = tempfile.mkdtemp(prefix="isopool-", dir=self._private_parent())
        self.backend_endpoint = f"ipc://{self.private_dir}/backend.sock"
        self.backend = self.ctx.socket(zmq.ROUTER)
        for opt, val in ((zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 0)):
            self.backend.setsockopt(opt, val)
        self.backend.bind(self.backend_endpoint)
        # everything for a peer leaves at the end of the pass, a burst as one bundle
        self.to_clients = Outbox(self.frontend, routed=True, on_error=self._reply_dropped)
        self.to_workers = Outbox(self.backend, routed=True, on_error=self._reply_dropped)
        self.events = EventLog(self.ctx, self.events_endpoint())
        if self.config.metrics_port:
            try:
                self.metrics, port = serve_metrics(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {self.config.metrics_host}:"
                                   f"{self.config.metrics_port}: {exc}; choose another --metrics-port") from None
            self.metrics_url = f"http://{self.config.metrics_host}:{port}/metrics"
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self.wake_r.fileno(), zmq.POLLIN)
        if self.auth is not None:
            self.poller.register(self.auth.zap, zmq.POLLIN)
        if self.config.preload != "none":
            spawner.become_subreaper()
            self.start_template(time.monotonic())
        if self.events.pub is not None:
            self.poller.register(self.events.pub, zmq.POLLIN)

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
                self.auth = CurveAuth(self.ctx, cfg.curve_secret_key, cfg.curve_clients, cfg.curve_admins)
            except AuthError as exc:
                raise StartupError(str(exc)) from None
        path = ipc_path(self.endpoint)
        if path is not None:
            if self.config.endpoint is None:
                ensure_private_dir(path.parent)
            if _ipc_in_use(path):
                raise StartupError(f"another process is already serving {self.endpoint}; stop it first "
                                   "or choose another --endpoint")
        sock = self.ctx.socket(zmq.ROUTER)
        for opt, val in ((zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 0),
                         (zmq.MAXMSGSIZE, self.limits.max_message_bytes)):
            sock.setsockopt(opt, val)
        if self.auth is not None:
            self.auth.secure(sock)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise StartupError(f"cannot bind {self.endpoint}: {exc}") from None
        if path is not None:
            os.chmod(path, 0o600)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.endpoint
        return sock

    def events_endpoint(self) -> str | None:
        path = ipc_path(self.endpoint)
        return f"ipc://{path}.events" if path is not None else None

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for w in self.workers.values():
            if w.proc is not None and w.proc.poll() is None:
                spawner.kill_now(w.proc)
                w.proc.wait(5)
            if w.proc is not None:
                self.forward_output(w, w.proc.read_output(final=True))
        if self.template is not None:
            self.template.close()
        if self.events is not None:
            self.events.close()
        self.frontend.close(linger=0)
        if self.auth is not None:
            self.auth.close()
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

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        self.open()
        try:
            log.info("isopool %s: %d worker(s) of %s, frontend %s", os.getpid(), self.target,
                     self.config.model, self.endpoint)
            self.reconcile(time.monotonic())
            while self.phase != "stopped":
                self.step(self.poll_timeout())
        finally:
            self.close()
        if self.startup_error:
            raise StartupError(self.startup_error, self.exit_code)
        return self.exit_code

    def step(self, timeout_ms: int) -> None:
        ready = dict(self.wait(timeout_ms))
        now = time.monotonic()
        front, back = self.frontend in ready, self.backend in ready
        self.worked = front or back
        if front:
            self.read_frontend(now)
        if back:
            self.read_backend(now)
            self.to_clients.flush()  # answers leave first: nothing below is for their clients
        if len(ready) > front + back:
            self.read_other(ready, len(ready) - front - back, now)
        if self.deadlines and self.deadlines[0][0] <= now:
            self.expire(now)
        if self.dirty or now >= self.next_tick or self.phase != "serving":
            self.maintain(now)
        if self.queue:
            self.dispatch(now)
        # before the sends that wake it (protocol/iothread.py)
        self.io_threads.observe(len(self.requests) if self.answer_s <= QUICK_S else 0)
        self.to_workers.flush()
        self.to_clients.flush()

    def wait(self, timeout_ms: int) -> list:
        """What is ready to read, waiting at most timeout_ms. While answers come quickly, a pass
        that relayed messages is likely followed by more within a round trip (the worker's
        answer, the client's next request): look for them for up to --spin-us first, awake,
        rather than pay the wake-ups of a sleep (protocol/transport.py: Spinner)."""
        if timeout_ms and self.worked and self.answer_s <= QUICK_RUN_S and self.spinner is not None:
            # a timer is due after timeout_ms: a spin never delays it
            return self.spinner.wait(self._poll_now, lambda: self.poller.poll(timeout_ms), cap_s=timeout_ms / 1000)
        return self.poller.poll(timeout_ms)

    def _poll_now(self) -> list:
        return self.poller.poll(0)

    def read_other(self, ready: dict, count: int, now: float) -> None:
        """The rare sources: signals, event subscriptions, pidfds and the template's socket."""
        if self.wake_r.fileno() in ready:
            self.handle_signals()
            count -= 1
        if self.events.pub in ready:
            self.events.read_subscriptions()
            count -= 1
        if self.auth is not None and self.auth.zap in ready:
            self.auth.handle()
            count -= 1
        if count:
            self.reap(ready, now)  # a pidfd, a worker's output or the template's socket fired

    def maintain(self, now: float) -> None:
        """The steps that only matter when something changed or a timer is due."""
        self.dirty = False
        if self.template is None and self.config.preload != "none":
            self.check_template(now)  # restart it when due
        self.check_workers(now)
        self.reconcile(now)
        self.advance_phase(now)
        self.next_tick = self.next_due(now)
        if self.metrics is not None:
            self.publish_metrics()

    def publish_metrics(self) -> None:
        states: dict[str, int] = {}
        for w in self.workers.values():
            states[w.state.value] = states.get(w.state.value, 0) + 1
        self.metrics.snapshot = Snapshot(
            outcomes=dict(self.stats.outcomes), latency_buckets=tuple(self.stats.buckets),
            latency_sum=self.stats.latency_sum, queue_depth=len(self.queue),
            in_flight=len(self.requests) - len(self.queue), workers=states, restarts=dict(self.restart_reasons),
            rss={w.slot: w.rss for w in self.workers.values() if w.proc is not None},
        )

    def next_due(self, now: float) -> float:
        due = now + TICK_S
        if self.template is None and self.config.preload != "none":
            due = min(due, self.template_due)
        can_spawn = self.template is None or self.template.ready
        for w in self.workers.values():
            if w.state is State.BACKOFF and can_spawn:
                due = min(due, w.spawn_at)
            elif w.kill_at is not None:
                due = min(due, w.kill_at)
        return due

    def poll_timeout(self) -> int:
        """Sleep until the next timer is due: a deadline or the next maintenance tick."""
        if self.dirty:
            return 0
        due = self.next_tick
        if self.deadlines:
            due = min(due, self.deadlines[0][0])
        return max(0, int((due - time.monotonic()) * 1000) + 1)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)  # the loop acts; a handler only records

    # ------------------------------------------------------------ frontend

    def read_frontend(self, now: float) -> None:
        for bundle in drain(self.frontend, MAX_BATCH):
            try:
                messages = unbundle(bundle, at=1)
            except ValueError as exc:
                self.stats.count("bad_request")
                self.reply(bundle[0].bytes, encode_error(None, BadRequest(
                    f"a bundle of requests was refused: {exc}; is the sender an isopool client?")))
                continue
            for frames in messages:
                self.on_client(frames, now, carrier=bundle[1] if len(bundle) > 1 else bundle[0])

    def on_client(self, frames: list, now: float, carrier: zmq.Frame) -> None:
        """One client message; `carrier` is the ZeroMQ frame it came in (its own, or its bundle's),
        which holds the connection's CURVE identity."""
        ident = frames[0].bytes
        if len(frames) < 2:
            return  # an empty message carries no id to answer
        raw = data(frames[1])
        try:
            header = unpack_header(raw, self.limits)
            op = header["op"]
            if op == ops.INFER:
                self.accept(ident, header, frames[2:], now)
            elif op == ops.STATUS:
                if self.queue:
                    self.dispatch(now)  # report what the pool is doing, not what this batch left undone
                self.reply(ident, encode(ops.RESULT, header["id"], build_status(self, now)))
            elif op == ops.CONTROL:
                if self.auth is not None and not is_admin(carrier):
                    raise NotAllowed("control ops (scale, reload, stop) need an admin key; this client's key "
                                     "is not in --curve-admins")
                result = self.control(header.get("action"), header.get("args") or {})
                self.reply(ident, encode(ops.RESULT, header["id"], result))
            elif op == ops.CANCEL:
                self.cancel((ident, header["id"]))
            else:
                raise BadRequest(f"op {op!r} is not a client op; clients send infer, cancel, status or control")
        except IsopoolError as err:
            self.stats.count(outcome_of(err))
            self.reply(ident, encode_error(peek_id(raw), err))

    def accept(self, ident: bytes, header: dict, body: list, now: float) -> None:
        cid = header["id"]
        if not isinstance(cid, (int, str, bytes)) or isinstance(cid, bool):
            raise BadRequest("request id must be an int, str or bytes")
        key = (ident, cid)
        if self.phase in ("draining", "stopping", "stopped"):
            raise ShuttingDown("the pool is shutting down and accepts no new requests; retry on another instance")
        if key in self.requests:
            raise BadRequest(f"request id {cid!r} is already in flight on this connection; ids must be unique")
        validate_payload(body, self.limits)
        timeout, setting = self._timeout_of(header)
        if len(self.queue) >= self.config.max_queue:
            self.dispatch(now)  # requests read in this same batch may still have workers waiting
        if len(self.queue) >= self.config.max_queue:
            raise Overloaded(f"the queue is full ({len(self.queue)} waiting, --max-queue {self.config.max_queue}); "
                             "retry later, add workers or raise --max-queue",
                             queue_depth=len(self.queue), max_queue=self.config.max_queue)
        if self.poison.is_poison(body):
            raise PoisonRequest(f"this input has killed {self.config.poison_threshold} workers and is refused; "
                                "fix the input or the handler", threshold=self.config.poison_threshold)
        req = Request(key=key, body=body, deadline=now + timeout, timeout=timeout, timeout_setting=setting,
                      accepted_at=now, retry=bool(header.get("retry", True)), stream=bool(header.get("stream")),
                      bundles=header.get("bundles") is True,
                      tenant=self._isolation_key(key, header))
        self.requests[key] = req
        self.queue[key] = req
        heapq.heappush(self.deadlines, (req.deadline, next(self.seq), key))
        if len(self.deadlines) > 2 * len(self.requests) + COMPACT_ABOVE:
            self.compact_deadlines()

    def compact_deadlines(self) -> None:
        """Drop the entries of answered requests. Each stays in the heap until its deadline
        otherwise: at 8,000 req/s and a 30 s timeout, a quarter of a million entries."""
        self.deadlines = [(r.deadline, next(self.seq), r.key) for r in self.requests.values()]
        heapq.heapify(self.deadlines)

    def _isolation_key(self, key: tuple, header: dict) -> object:
        mode = self.config.isolation
        if mode == "none":
            return None
        if mode == "request":
            return key
        tenant = header.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise BadRequest(f"tenant must be a string, got {type(tenant).__name__}")
        return "" if tenant is None else tenant  # requests without a tenant share the default one

    def _timeout_of(self, header: dict) -> tuple[float, str]:
        cap = self.config.request_timeout
        timeout = header.get("timeout")
        if timeout is None:
            return cap, "request_timeout"
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise BadRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
        return (float(timeout), "timeout") if timeout < cap else (cap, "request_timeout")

    def reply(self, ident: bytes, frames: list, bundles: bool = False) -> None:
        """Queue a message for a client; it leaves at the end of this pass. A client whose requests
        say it reads bundles (`bundles: true`) gets a burst of answers as one message."""
        self.to_clients.post([ident, *frames], bundles)

    @staticmethod
    def _reply_dropped(peer: bytes | None, exc: zmq.ZMQError) -> None:
        log.debug("messages to a departed peer %r dropped: %s", peer, exc)  # nothing to tell it

    def cancel(self, key: tuple) -> None:
        req = self.requests.get(key)
        if req is None:
            return
        self.queue.pop(key, None)
        if req.worker is not None:  # tell its worker: a stream stops at its next part
            w = self.workers[req.worker]
            self.to_workers.post([w.ident, pack_header(ops.CANCEL, list(key))])
        # a dispatched request stays in its worker's inflight until the worker answers
        self.fail(req, Cancelled("cancelled by the client"))

    # ------------------------------------------------------------ answers

    def finish(self, req: Request, op: str, body: list, outcome: str, now: float) -> None:
        del self.requests[req.key]
        self.reply(req.client, [pack_header(op, req.client_id), *body], req.bundles)
        self.stats.done(outcome, now - req.accepted_at, now)
        self.answer_s = now - req.started_at

    def fail(self, req: Request, err: IsopoolError) -> None:
        self.requests.pop(req.key, None)
        self.queue.pop(req.key, None)
        self.reply(req.client, encode_error(req.client_id, err), req.bundles)
        self.stats.count(outcome_of(err))
        log.info("request %r: %s: %s", req.client_id, type(err).__name__, err, extra={"request": req.client_id})

    # ------------------------------------------------------------ backend

    def read_backend(self, now: float) -> None:
        for bundle in drain(self.backend, MAX_BATCH):
            try:
                messages = unbundle(bundle, at=1)
            except ValueError as exc:
                messages = [bundle[:1]]  # on_worker finds no header and replaces the worker
                log.warning("worker %r sent a malformed bundle: %s", bundle[0].bytes, exc)
            for frames in messages:
                self.on_worker(frames, now)

    def on_worker(self, frames: list, now: float) -> None:
        parsed = parse_ident(frames[0].bytes)
        w = self.workers.get(parsed[0]) if parsed else None
        if w is None or w.generation != parsed[1] or w.proc is None:
            return  # a stale message from a process already given up on
        w.last_seen = now
        try:
            if len(frames) < 2:
                raise BadRequest("no header")
            header = unpack_header(data(frames[1]), self.limits)
        except BadRequest as err:
            log.warning("worker %d sent an undecodable header (%s); replacing it", w.slot, err)
            self.kill(w, "protocol", now)
            return
        op = header["op"]
        if op == ops.READY:
            self.on_ready(w, header, now)
        elif op in (ops.RESULT, ops.ERROR, ops.CHUNK):
            if header.get("stage") == "load":
                self.on_load_failure(w, frames[2:])
            elif header.get("stage") == "integrity":
                self.on_integrity_failure(w, header)
            else:
                self.on_reply(w, op, header, frames[2:], now)

    def on_ready(self, w: Worker, header: dict, now: float) -> None:
        if w.state is not State.STARTING:
            return
        w.transition(State.IDLE, "ready")
        w.ready_at = now
        self.sample(w)  # status and metrics show a new worker's memory at once
        capacity = header.get("capacity")
        w.capacity = capacity if isinstance(capacity, int) and 1 <= capacity <= 1024 else self.config.prefetch
        self.credits.offer(w.slot, w.generation, w.capacity)
        self.emit("ready", w, startup_s=round(now - w.started_at, 4), device=w.device)
        if self.phase == "starting" and self._all_ready():
            self.phase = "serving"
            self.dirty = True
            log.info("serving on %s with %d worker(s)", self.endpoint, self.target)
            sd_notify("READY=1\nSTATUS=serving")

    def _all_ready(self) -> bool:
        ready = sum(1 for w in self.workers.values() if w.state in SERVING)
        return ready >= self.target

    def on_load_failure(self, w: Worker, body: list) -> None:
        err = decode_error(body)
        tb = getattr(err, "details", {}).get("traceback", "")
        w.last_error = str(err)
        log.error("worker %d: %s\n%s", w.slot, err, tb)
        if self.phase == "starting":
            self.startup_error = f"{err}\n\n{tb}".rstrip()
            self.exit_code = EXIT_LOAD_FAILED
            self.begin_stop("the model failed to load")

    def on_integrity_failure(self, w: Worker, header: dict) -> None:
        """Its weights changed: no more work for it; what it holds finishes elsewhere."""
        log.error("worker %d (pid %s): model weights changed (%s); recycling it", w.slot, w.pid, header.get("when"))
        self.emit("integrity", w, when=header.get("when"), expected=header.get("expected"),
                  actual=header.get("actual"))
        if w.retire is None:
            self.retire(w, "integrity")
        if w.state in SERVING:
            self.stop_worker(w, time.monotonic())  # it runs nothing more; what it holds is requeued

    def on_reply(self, w: Worker, op: str, header: dict, body: list, now: float) -> None:
        rid = header.get("id")
        key = (rid[0], rid[1]) if isinstance(rid, list) and len(rid) == 2 else None
        req = self.requests.get(key) if key is not None else None
        current = req is not None and req.worker == w.slot and req.attempt == header.get("attempt")
        if op == ops.CHUNK:
            if current:
                req.chunks_sent += 1
                self.reply(req.client, [pack_header(op, req.client_id), *body], req.bundles)
            return
        self.release(w, key, now)
        if current:
            self.count_request(w, op, body)
            outcome = "ok" if op == ops.RESULT else "error"
            self.finish(req, op, body, outcome, now)
        self.after_request(w, now)

    def count_request(self, w: Worker, op: str, body: list) -> None:
        w.requests += 1
        w.requests_this_process += 1
        if op == ops.ERROR:
            w.errors += 1
        else:
            w.crashes_in_row = 0

    def release(self, w: Worker, key: tuple | None, now: float) -> None:
        """A worker answered: take the request off its books and give back the credit."""
        try:
            w.inflight.remove(key)
        except ValueError:
            return
        if w.state in SERVING:
            self.credits.offer(w.slot, w.generation, w.capacity - len(w.inflight))
            if not w.inflight:
                w.transition(State.IDLE, "all answered")

    def after_request(self, w: Worker, now: float) -> None:
        if w.max_requests and w.requests_this_process >= w.max_requests and w.retire is None:
            self.retire(w, "max_requests")
        elif self.config.isolation == "request" and w.retire is None:
            self.retire(w, "isolation")  # its one request is done: start its fresh replacement now
        if w.state is State.DRAINING and not w.inflight:
            self.stop_worker(w, now)

    # ------------------------------------------------------------ exits

    def reap(self, ready: dict, now: float) -> None:
        self.check_template(now)
        for w in list(self.workers.values()):
            proc = w.proc
            if proc is None or proc.returncode is not None:
                continue
            if proc.output in ready:
                self.forward_output(w, proc.read_output())
            if proc.pidfd in ready and proc.poll() is not None:
                self.poller.unregister(proc.pidfd)
                if proc.output >= 0:
                    self.poller.unregister(proc.output)
                    self.forward_output(w, proc.read_output(final=True))
                self.on_exit(w, now)

    def forward_output(self, w: Worker, lines: list[str]) -> None:
        """A worker's stdout/stderr, one log record per line, tagged with the worker."""
        for line in lines:
            worker_log.info("worker %d [%s] %s", w.slot, w.pid, line, extra={"worker": w.slot, "pid": w.pid})

    def collect_last_words(self, w: Worker, now: float) -> None:
        """Read what a dead worker sent before it died, so the right request takes the blame.

        Its last result can still be on its way through ZeroMQ when the pidfd fires; without
        this, the request it had finished would be blamed for the one it was running.
        """
        end = time.monotonic() + LAST_WORDS_S
        while w.inflight and self.backend.poll(max(0, int((end - time.monotonic()) * 1000)), zmq.POLLIN):
            self.read_backend(now)

    def on_exit(self, w: Worker, now: float) -> None:
        expected = w.stop_reason is not None
        if w.inflight and not expected:
            self.collect_last_words(w, now)
        info = {"pid": w.pid, "worker": w.slot, **exit_fields(w.proc.returncode), "at": time.time()}
        w.last_exit = info
        culprit = None if expected else self.progress(w)[0]
        w.drop_board()  # read; whatever happens to the slot next, the file is done with
        for key in w.inflight:
            req = self.requests.get(key)
            if req is None or req.worker != w.slot:
                continue
            if key == culprit:
                self.on_crash(req, info)
            else:  # it was not running this one (finished but unsent, or not begun), or we stopped it
                self.requeue(req)
        was_ready = w.state is not State.STARTING
        w.transition(State.EXITED, info["reason"])
        if expected:
            kind = "recycled" if w.stop_reason in RECYCLE_REASONS else "exited"
            self.emit(kind, w, stopped_for=w.stop_reason, **_exit_event(info))
        else:
            self.emit("crashed", w, during="start" if not was_ready else "serve", **_exit_event(info))
            log.warning("worker %d (pid %s) died: %s", w.slot, info["pid"], info["reason"])
        self.after_exit(w, expected, now)

    def progress(self, w: Worker) -> tuple[tuple | None, int]:
        """(key of the request `w` is running, or was when it died, or None between requests;
        the sequence number of the last it finished), from its board. Without a board: the
        oldest request it holds, and nothing known to be finished."""
        seen = board.marks(w.board) if w.board else None
        if seen is None:
            return (w.inflight[0] if w.inflight else None), 0
        started, finished = seen
        if started > finished:
            for key in w.inflight:
                req = self.requests.get(key)
                if req is not None and req.seq == started:
                    return key, finished
        return None, finished

    def after_exit(self, w: Worker, expected: bool, now: float) -> None:
        reason = "crash" if not expected else w.retire or w.stop_reason
        if reason == "crash" or reason in RECYCLE_REASONS or reason in ("timeout", "heartbeat", "start_timeout"):
            self.restart_reasons[reason] = self.restart_reasons.get(reason, 0) + 1
        if w.retire is not None or self.phase in ("stopping", "stopped"):
            del self.workers[w.slot]
            return
        if not expected:
            w.crashes_in_row += 1
            if self.phase == "starting" and w.crashes_in_row >= 2 and not self.startup_error:
                self.startup_error = f"worker {w.slot} died twice before it was ready: {w.last_exit['reason']}"
                self.exit_code = EXIT_LOAD_FAILED
                self.begin_stop("workers die during start-up")
                del self.workers[w.slot]
                return
        delay = self.restarts.delay(w.crashes_in_row) if not expected else 0.0
        w.reset_process()
        w.transition(State.BACKOFF, f"restart in {delay:.2f}s")
        w.spawn_at = now + delay
        w.restarts += 1
        self.restarts_total += 1
        self.restarts.record(now)
        if delay:
            self.emit("backoff", w, delay_s=round(delay, 3))

    def on_crash(self, req: Request, info: dict) -> None:
        req.crashes.append({k: info[k] for k in ("worker", "pid", "exit_code", "signal", "reason")})
        kills = self.poison.add_kill(req.body)
        if kills >= self.config.poison_threshold:
            self.fail(req, PoisonRequest(
                f"this input has killed {kills} workers (--poison-threshold {self.config.poison_threshold}); "
                "it is refused from now on. Last death: " + info["reason"], attempts=req.crashes))
        elif req.retry and not req.chunks_sent and len(req.crashes) < self.config.max_attempts:
            self.requeue(req)
        else:
            why = ("streamed parts cannot be retried" if req.chunks_sent else "retry=False" if not req.retry
                   else f"--max-attempts {self.config.max_attempts} reached")
            after = f" after {req.chunks_sent} streamed part(s)" if req.stream else ""
            self.fail(req, WorkerCrashed(
                f"worker {info['worker']} (pid {info['pid']}) died running this request{after}: {info['reason']} "
                f"[attempt {len(req.crashes)}; not retried: {why}]", attempts=req.crashes,
                exit_code=info["exit_code"], signal=info["signal"], parts_delivered=req.chunks_sent))

    def requeue(self, req: Request) -> None:
        """Back to the head of the queue: it has waited longest."""
        req.worker = None
        self.queue[req.key] = req
        self.queue.move_to_end(req.key, last=False)

    # ------------------------------------------------------------ timers

    def expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, _, key = heapq.heappop(self.deadlines)
            req = self.requests.get(key)
            if req is None or req.deadline != deadline:
                continue
            w = self.workers[req.worker] if req.worker is not None else None
            running, finished = self.progress(w) if w is not None else (None, 0)
            if running != key and req.seq and req.seq <= finished:
                self.fail(req, RequestTimeout(
                    f"the handler finished, but after {req.timeout:g}s its answer had not left worker "
                    f"{w.slot}, which holds finished answers to send them with those of the requests it "
                    f"runs next and was still running one; lower --prefetch so quick requests do not wait "
                    f"behind slow ones, or {_raise_hint(req.timeout_setting)}", setting=req.timeout_setting,
                    started=True))
                continue  # the request it waits behind keeps its own deadline
            if running != key:  # queued, or held behind another
                self.fail(req, RequestTimeout(
                    f"no worker was free within {req.timeout:g}s, so the request was never started; "
                    f"{_raise_hint(req.timeout_setting)} or add workers", setting=req.timeout_setting,
                    started=False))
                continue  # a worker holding it refuses it unstarted and gives back the credit
            self.fail(req, RequestTimeout(
                f"the handler was still running after {req.timeout:g}s; its worker {w.slot} (pid {w.pid}) was "
                f"killed and replaced. {_raise_hint(req.timeout_setting)} if it needs longer",
                setting=req.timeout_setting, started=True))
            self.kill(w, "timeout", now)

    def check_workers(self, now: float) -> None:
        sample = now >= self.next_stats
        if sample:
            self.next_stats = now + self.config.stats_interval
        for w in list(self.workers.values()):
            if w.kill_at is not None and now >= w.kill_at and w.proc is not None:
                log.warning("worker %d (pid %s) did not exit within %gs; sending SIGKILL", w.slot, w.pid,
                            self.config.kill_grace)
                w.proc.signal(signal.SIGKILL)
                w.kill_at = None
            elif w.state is State.STARTING and now - w.started_at > self.config.start_timeout:
                self.kill(w, "start_timeout", now)
            elif w.state is State.IDLE and now - w.last_seen > self.config.heartbeat_timeout:
                log.warning("worker %d (pid %s) sent no heartbeat for %.1fs; replacing it", w.slot, w.pid,
                            now - w.last_seen)
                self.kill(w, "heartbeat", now)
            elif sample and w.state in SERVING:
                self.sample(w)
        if sample:
            self.check_degraded(now)
            known = {w.pid for w in self.workers.values() if w.pid}
            if self.template is not None:
                known.add(self.template.proc.pid)
            spawner.reap_strays(known)

    def sample(self, w: Worker) -> None:
        w.rss, w.uss, w.cpu_percent = w.proc.resources()
        if self.config.max_rss and w.rss > self.config.max_rss and w.retire is None:
            log.warning("worker %d (pid %s) RSS %d MiB is over --max-rss %d MiB; recycling it", w.slot, w.pid,
                        w.rss >> 20, self.config.max_rss >> 20)
            self.retire(w, "max_rss")

    def check_degraded(self, now: float) -> None:
        degraded = self.restarts.degraded(now)
        if degraded != self.was_degraded:
            self.was_degraded = degraded
            self.emit("degraded" if degraded else "recovered", None,
                      restarts_in_window=len(self.restarts.recent), window_s=self.config.restart_window)

    # ------------------------------------------------------------ worker lifecycle

    def reconcile(self, now: float) -> None:
        """Start workers until `target` are kept; retire the surplus once replacements serve."""
        if self.phase in ("stopping", "stopped"):
            return
        # a worker being killed or in backoff comes back in its own slot: it is kept
        kept = [w for w in self.workers.values() if w.retire is None]
        for w in sorted(kept, key=_retire_order)[: max(0, len(kept) - self.target)]:
            self.retire(w, "scale")
        short = self.target - len(kept)
        surge = self.target if self.config.isolation == "request" else SURGE  # every request needs a fresh one
        room = self.target + surge - len(self.workers)
        for _ in range(max(0, min(short, room))):
            slot = next(self.slots)
            self.workers[slot] = Worker(slot=slot, device=self.devices[slot % len(self.devices)], spawn_at=now)
        for w in list(self.workers.values()):
            if w.state is State.BACKOFF and now >= w.spawn_at:
                if w.retire is not None:
                    w.transition(State.EXITED, "retired before start")
                    del self.workers[w.slot]
                else:
                    self.start(w, now)
        self.drain_surplus(now)

    def drain_surplus(self, now: float) -> None:
        """Retiring workers keep serving until enough replacements are ready, then drain."""
        if self.reloading and not any(w.retire == "reload" for w in self.workers.values()):
            self.reloading = False
            self.emit("reload_finished", None, workers=len(self.workers))
        retiring = [w for w in self.workers.values() if w.retire is not None and w.state in SERVING]
        for w in [w for w in retiring if w.retire in DRAIN_NOW_REASONS]:
            self.drain(w, now)
            retiring.remove(w)
        if not retiring:
            return
        ready_kept = sum(1 for w in self.workers.values() if w.retire is None and w.state in SERVING)
        surplus = ready_kept + len(retiring) - self.target
        for w in sorted(retiring, key=_retire_order)[: max(0, surplus)]:
            self.drain(w, now)

    def start(self, w: Worker, now: float) -> None:
        if self.config.preload != "none" and (self.template is None or not self.template.ready):
            return  # stays in BACKOFF; the template's "ready" wakes the loop
        cfg = WorkerConfig(
            backend=self.backend_endpoint, slot=w.slot, generation=w.generation, model=self.config.model,
            parent_pid=os.getpid(), device=w.device, threads=self.config.worker_threads(),
            heartbeat_interval=self.config.heartbeat_interval, arrays=self.config.arrays,
            integrity_interval=self.config.integrity_interval,
            integrity_every_request=self.config.integrity_every_request, prefetch=self.config.prefetch,
            max_batch_size=self.config.max_batch_size, max_batch_wait_ms=self.config.max_batch_wait_ms,
            spin_us=self.config.spin_us, user_config=self.config.user_config, limits=self.limits.__dict__,
        )
        cfg.generation += 1
        cfg.board = w.board = os.path.join(self.private_dir, f"board.{w.slot}.{cfg.generation}")
        board.create(cfg.board)  # only for a process about to exist
        if self.config.preload == "none":
            w.proc = spawner.spawn_fresh(cfg)
        else:
            try:
                w.proc = self.template.spawn(cfg)
            except spawner.TemplateError as exc:
                log.error("the template failed to fork worker %d: %s; restarting the template", w.slot, exc)
                self.stop_template(now, delay=0.0)
                return
        w.generation = cfg.generation
        w.transition(State.STARTING, f"pid {w.pid}")
        w.started_at = w.last_seen = now
        jitter = self.config.max_requests_jitter
        w.max_requests = self.config.max_requests + (self.rng.randint(0, jitter) if jitter else 0) \
            if self.config.max_requests else 0
        self.poller.register(w.proc.pidfd, zmq.POLLIN)
        if w.proc.output >= 0:
            self.poller.register(w.proc.output, zmq.POLLIN)
        if w.generation > 1 and w.last_exit is not None:
            self.emit("restarted", w, after=w.last_exit["reason"], restarts=w.restarts)
        else:
            self.emit("started", w)

    def retire(self, w: Worker, reason: str) -> None:
        """Mark for replacement; reconcile starts the replacement first, then drains this one."""
        w.retire = reason
        self.emit("recycling", w, reason=reason)

    def drain(self, w: Worker, now: float) -> None:
        w.transition(State.DRAINING, w.retire or "drain")
        if not w.inflight:
            self.stop_worker(w, now)

    def stop_worker(self, w: Worker, now: float) -> None:
        """Ask politely (STOP); KILL if it has not exited after the grace period."""
        if w.state is State.STARTING:  # not listening yet
            self.kill(w, w.retire or "stop", now)
            return
        w.stop_reason = w.retire or "stop"
        w.transition(State.STOPPING, w.stop_reason)
        self.to_workers.post([w.ident, pack_header(ops.STOP, None)])
        w.kill_at = now + self.config.kill_grace

    def kill(self, w: Worker, reason: str, now: float) -> None:
        """TERM the worker's process group now; KILL after the grace period."""
        if w.state is not State.STOPPING:
            w.transition(State.STOPPING, reason)
        w.stop_reason = reason
        w.proc.signal(signal.SIGTERM)
        if w.kill_at is None or w.kill_at > now + self.config.kill_grace:
            w.kill_at = now + self.config.kill_grace
        self.emit("timed_out" if reason == "timeout" else "killed", w, reason=reason)

    # ------------------------------------------------------------ the template

    def start_template(self, now: float) -> None:
        self.template = spawner.Template(self.config.model, self.config.preload, self.config.user_config)
        self.template_started = now
        self.poller.register(self.template.fileno(), zmq.POLLIN)
        self.poller.register(self.template.proc.pidfd, zmq.POLLIN)

    def stop_template(self, now: float, delay: float) -> None:
        t, self.template = self.template, None
        if t is None:
            return
        self.poller.unregister(t.fileno())
        if t.proc.returncode is None:
            self.poller.unregister(t.proc.pidfd)
        t.close()
        self.template_due = now + delay

    def check_template(self, now: float) -> None:
        t = self.template
        if t is None:
            if self.config.preload != "none" and now >= self.template_due and self.phase not in ("stopping", "stopped"):
                self.start_template(now)
            return
        for msg in t.read():
            if msg.get("ready"):
                log.info("template (pid %d) ready in %.2fs: workers now start by fork", t.proc.pid,
                         now - self.template_started)
            elif "error" in msg:
                self.on_template_error(msg, now)
                return
        pidfd = t.proc.pidfd
        if t.proc.poll() is not None:
            self.poller.unregister(pidfd)
            if self.phase not in ("stopping", "stopped"):
                log.warning("the template (pid %d) died: %s; restarting it", t.proc.pid,
                            exit_fields(t.proc.returncode)["reason"])
                self.emit("template_restarted", None, pid=t.proc.pid, **_exit_event(exit_fields(t.proc.returncode)))
            self.stop_template(now, delay=self.config.backoff_base)

    def on_template_error(self, msg: dict, now: float) -> None:
        log.error("%s\n%s", msg["error"], msg.get("traceback", ""))
        if self.phase == "starting":
            self.startup_error = f"{msg['error']}\n\n{msg.get('traceback', '')}".rstrip()
            self.exit_code = EXIT_LOAD_FAILED
            self.begin_stop("the model failed to load")
        else:  # e.g. a reload picked up broken code: keep serving with the workers we have
            self.restarts.record(now)
        self.stop_template(now, delay=self.config.backoff_max)

    # ------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> None:
        if self.config.isolation != "none":
            self.dispatch_isolated(now)
            return
        queue, credits = self.queue, self.credits
        while queue:
            taken = credits.take(self.free_credit)
            if taken is None:
                return
            w = self.workers[taken[0]]
            key, req = queue.popitem(last=False)
            self.send_run(w, req, now)
            credits.offer(w.slot, w.generation, w.capacity - len(w.inflight))

    def free_credit(self, slot: int, generation: int) -> int:
        """Requests (slot, generation) may still take now; -1 if it is gone or not serving."""
        w = self.workers.get(slot)
        if w is None or w.generation != generation or w.state not in SERVING:
            return -1
        return w.capacity - len(w.inflight)

    def dispatch_isolated(self, now: float) -> None:
        """Each request to a worker of its own tenant, or a fresh one; never across tenants.

        FIFO with a bounded look-ahead. When the oldest waiting request has no worker it may
        use, one idle worker bound to another tenant is recycled (its replacement starts
        first), so capacity is shared by arrival order and no tenant is starved.
        """
        self.credits.clear()  # credits are the shared-pool fast path; here every slot is checked
        one_each = self.config.isolation == "request"
        free = [w for w in self.workers.values()
                if w.state in SERVING and w.retire is None and len(w.inflight) < (1 if one_each else w.capacity)]
        placed = []
        held = {w.slot: len(w.inflight) for w in free}
        for req in itertools.islice(self.queue.values(), LOOKAHEAD):
            w = next((w for w in free if w.tenant == req.tenant), None) or \
                next((w for w in free if w.tenant is None), None)
            if w is None:
                continue
            w.tenant = req.tenant
            placed.append((w, req))
            held[w.slot] += 1
            if held[w.slot] >= (1 if one_each else w.capacity):
                free.remove(w)
        for w, req in placed:
            del self.queue[req.key]
            self.send_run(w, req, now)
        if self.queue and not placed:
            self.recycle_for(next(iter(self.queue.values())))

    def recycle_for(self, req: Request) -> None:
        """Make room for a request whose tenant has no worker: recycle an idle foreign one."""
        if any(w.retire == "tenant" and w.state in SERVING for w in self.workers.values()):
            return  # one recycle at a time; its replacement will take this request
        idle = [w for w in self.workers.values() if w.state is State.IDLE and w.retire is None
                and w.tenant is not None and w.tenant != req.tenant]
        if idle:
            self.retire(min(idle, key=lambda w: w.ready_at), "tenant")

    def send_run(self, w: Worker, req: Request, now: float) -> None:
        req.attempt += 1
        req.worker = w.slot
        req.started_at = now
        w.dispatched += 1
        req.seq = w.dispatched  # what the worker marks on its board when it starts this one
        # workers share this machine's monotonic clock, so the deadline travels as is
        header = pack_header(ops.RUN, list(req.key), attempt=req.attempt, deadline=req.deadline, seq=req.seq)
        self.to_workers.post([w.ident, header, *req.body])
        w.inflight.append(req.key)
        if w.state is State.IDLE:
            w.transition(State.BUSY, "dispatch")

    # ------------------------------------------------------------ control and phases

    def control(self, action: Any, args: dict) -> dict:
        if action == ops.SCALE:
            n = args.get("workers")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise BadRequest(f"scale needs a worker count of at least 1, got {n!r}")
            old, self.target = self.target, n
            self.emit("scaled", None, old=old, new=n)
            return {"workers_target": n, "previous": old}
        if action == ops.RELOAD:
            return {"reloading": self.reload()}
        if action in (ops.SHUTDOWN, ops.DRAIN):
            self.begin_drain("stop requested by a client")
            return {"stopping": True, "drain_timeout_s": self.config.drain_timeout}
        raise BadRequest(f"unknown control action {action!r}; use scale, reload or stop")

    def reload(self) -> int:
        """Replace every worker, one at a time, with no failed request (new code and weights load)."""
        if self.template is not None:  # a new template imports the new code
            self.stop_template(time.monotonic(), delay=0.0)
        count = 0
        for w in self.workers.values():
            if w.retire is None and w.state not in (State.DRAINING, State.STOPPING):
                self.retire(w, "reload")
                count += 1
        self.reloading = count > 0
        self.emit("reload_started", None, workers=count)
        return count

    def handle_signals(self) -> None:
        try:
            while self.wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self.dirty = bool(self.pending_signals) or self.dirty
        while self.pending_signals:
            sig = self.pending_signals.pop(0)
            name = signal.Signals(sig).name
            if sig == signal.SIGHUP:
                log.info("%s: reloading workers", name)
                self.reload()
            elif self.phase == "draining":
                log.info("%s again: stopping now", name)
                self.begin_stop(f"second {name}")
            else:
                self.begin_drain(name)

    def begin_drain(self, why: str) -> None:
        if self.phase in ("draining", "stopping", "stopped"):
            return
        if self.phase == "starting":
            self.begin_stop(why)
            return
        log.info("draining (%s): finishing %d request(s), at most %gs", why, len(self.requests),
                 self.config.drain_timeout)
        self.phase = "draining"
        self.drain_deadline = time.monotonic() + self.config.drain_timeout
        sd_notify("STOPPING=1")
        self.emit("draining", None, reason=why, requests=len(self.requests))

    def begin_stop(self, why: str) -> None:
        if self.phase in ("stopping", "stopped"):
            return
        self.dirty = True
        self.phase = "stopping"
        now = time.monotonic()
        for req in list(self.requests.values()):
            self.fail(req, ShuttingDown(f"the pool stopped before this request finished ({why})"))
        for w in list(self.workers.values()):
            if w.state is State.BACKOFF:
                w.transition(State.EXITED, "stopping")
                del self.workers[w.slot]
            elif w.state in (State.STARTING, State.IDLE, State.BUSY, State.DRAINING):
                w.retire = w.retire or "shutdown"
                self.stop_worker(w, now)

    def advance_phase(self, now: float) -> None:
        if self.phase == "draining" and (not self.requests or now >= self.drain_deadline):
            self.begin_stop("drained" if not self.requests else "--drain-timeout passed")
        if self.phase == "stopping" and not any(w.state in ALIVE for w in self.workers.values()):
            self.phase = "stopped"
            log.info("stopped")

    # ------------------------------------------------------------ events

    def emit(self, kind: str, w: Worker | None, **fields: Any) -> None:
        """Every change worth an event is one the maintenance steps must look at."""
        self.dirty = True
        if w is not None:
            fields = {"worker": w.slot, "pid": w.pid, "generation": w.generation, **fields}
        if self.events is not None:
            self.events.emit(kind, fields)


OUTCOMES = {RequestTimeout: "timeout", PoisonRequest: "poison", WorkerCrashed: "crashed",
            ShuttingDown: "shutting_down", Cancelled: "cancelled", BadRequest: "bad_request",
            Overloaded: "overloaded", NotAllowed: "not_allowed"}


def outcome_of(err: IsopoolError) -> str:
    """The `outcome` label of a request that ended in `err` (status, metrics)."""
    return OUTCOMES.get(type(err), "error")


def _retire_order(w: Worker) -> tuple:
    """Which worker to give up first: not yet serving, then idle, then the least loaded."""
    rank = {State.BACKOFF: 0, State.STARTING: 1, State.IDLE: 2, State.BUSY: 3}
    return rank.get(w.state, 4), len(w.inflight), -w.slot


def _raise_hint(setting: str) -> str:
    return "raise the client's timeout=" if setting == "timeout" else "raise --request-timeout"


def _exit_event(info: dict) -> dict:
    return {k: info[k] for k in ("exit_code", "signal", "reason")}


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
