"""The worker process: build the model once, then answer RUN messages one at a time.

    supervisor --RUN [header, payload, *buffers]--> worker
    worker --RESULT | CHUNK* RESULT | ERROR--> supervisor
    worker --READY once, HEARTBEAT when idle--> supervisor

A handler exception is an ERROR reply (RemoteError) and the worker keeps serving.
Anything that kills the process is the supervisor's business: it sees the exit at once.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import zmq

from isopool.protocol import decode_payload, encode_payload, ops, pack_header
from isopool.protocol.codec import encode_error
from isopool.protocol.errors import BadRequest, RemoteError, RequestTimeout
from isopool.protocol.exits import EXIT_LOAD_FAILED
from isopool.protocol.signature import valid_signature
from isopool.protocol.board import Board
from isopool.protocol.contract import WorkerConfig
from isopool.protocol.iothread import io_context
from isopool.protocol.limits import Limits
from isopool.protocol.pacing import Pacing
from isopool.protocol.transport import EVENTS, POLLIN, Outbox, body_bytes, drain, messages

from . import batching
from .environment import die_with_parent, share_threads
from .handler import NotAStream, WorkerContext, build_model
from .integrity import fingerprint
from .segments import Mappings, Place, encode_answer

log = logging.getLogger("isopool.worker")

# The longest a finished result waits to leave with others. Under load on a small machine
# every process is preempted often, so wall-clock holds run long: at 0.5 ms results left in
# groups of ~4, at 2 ms in groups of ~8 (the half-capacity cap), which cut CPU per request
# by ~15% and, with it, latency at 4, 16 and 64 in flight (python -m isopool.bench.latency).
HOLD_S = 0.002
# results that are certainly not a stream, told without the (slower) iterator ABC check
PLAIN = frozenset((np.ndarray, dict, list, tuple, str, bytes, int, float, bool, type(None)))


class Worker:
    def __init__(self, config: WorkerConfig, model: Any):
        self.config = config
        self.model = model
        self.limits = Limits(**config.limits)
        self.ident = config.ident
        self.ctx, self.io_threads = io_context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(config.backend)
        self.out = Outbox(self.sock, routed=False, on_error=self._send_failed)
        self.board = Board(config.board)
        self.sent = False
        self.running = True
        self.checks_weights = config.integrity_interval > 0 or config.integrity_every_request
        self.fingerprint = fingerprint(model) if self.checks_weights else None
        self.next_check = time.monotonic() + config.integrity_interval
        self.corrupt = False
        self.backlog: deque = deque()
        self.batching = callable(getattr(model, "batch", None)) and config.max_batch_size > 1
        self.batch: list = []  # RUN messages waiting to be run together
        # requests we may hold at once: the prefetch, or enough for a full batch
        self.capacity = max(config.prefetch, config.max_batch_size if self.batching else 1)
        # results leave in groups: one wake-up of the supervisor per group, and its credit
        # back by the time half of what we may hold is done. The board, not the order of
        # replies, tells the supervisor what a dead worker was running.
        self.flush_at = max(1, self.capacity // 2)
        self.waiting = 0  # requests already here behind the current one (capacity: more on the socket)
        # how long the previous request (or batch) ran decides how we wait and pace (protocol/pacing.py)
        self.pacing = Pacing(self.io_threads, config.spin_us)
        self.maps = Mappings()  # of clients' shared memory: requests', and out segments for answers
        self.next_sweep = 0.0
        import torch

        self.inference_mode = torch.inference_mode

    def send(self, frames: list) -> None:
        """Results wait to leave together while more work is already here, until they are half
        of what we may hold (prefetch 16: a burst of 16 leaves as 8 and 8; a burst of 3 as one
        message of 3), so the supervisor refills us while the other half runs."""
        self.out.post(frames)
        self.sent = True
        held = len(self.out)
        if not self.waiting or held >= self.flush_at:
            self.out.flush()

    def pace(self, holding: int) -> None:
        """Let ZeroMQ's I/O thread wait for us while quick requests queue here; never behind a
        model run that is not quick (protocol/pacing.py)."""
        self.pacing.observe(holding)

    def before_run(self) -> None:
        """Results wait for company only while requests are quick: none waits for another
        request once it has waited HOLD_S (so at most HOLD_S and one run), and none waits at
        all behind a model that takes longer than that."""
        out = self.out
        if len(out) and (not self.pacing.quick or time.monotonic() - out.since > HOLD_S):
            out.flush()

    def receive(self, limit: int) -> Iterator[tuple[dict, list]]:
        """Up to `limit` waiting ZeroMQ messages, bundles opened, without blocking. Sets
        `waiting`: how much other work is already here while this message is handled."""
        for bundle in drain(self.sock, limit):
            opened = messages(bundle, self.limits)
            last = len(opened) - 1
            for i, (header, body, err) in enumerate(opened):
                if err is not None:  # only the supervisor talks to us; never die of its mistakes
                    log.error("ignoring an undecodable message from the supervisor: %s", err)
                    continue
                left = last - i
                self.waiting = left or (self.capacity if self.sock.get(EVENTS) & POLLIN else 0)
                yield header, body
        self.waiting = 0

    @staticmethod
    def _send_failed(peer: Any, exc: zmq.ZMQError) -> None:
        log.error("could not send to the supervisor (%s); it will notice our silence", exc)

    def serve(self) -> None:
        kind = getattr(self.model, "kind", None)  # what the model says it is ("embedding": /v1/embeddings)
        signature = valid_signature(getattr(self.model, "signature", None))  # checked at load (handler.py)
        self.send([pack_header(ops.READY, None, pid=os.getpid(), device=self.config.device, capacity=self.capacity,
                               **({"kind": kind} if isinstance(kind, str) else {}),
                               **({"signature": signature} if signature else {}))])
        interval_ms = int(self.config.heartbeat_interval * 1000)
        with self.inference_mode():  # once for every request: entering it per call costs µs each
            self.loop(interval_ms)
        self.out.flush()
        self.sock.close(linger=2000)
        self.ctx.term()

    def loop(self, interval_ms: int) -> None:
        worked = False
        while self.running:
            self.sent = False
            while self.backlog and self.running:  # what arrived while a stream was being sent
                self.handle(*self.backlog.popleft())
            self.out.flush()
            if self.running and self.wait(interval_ms, worked):
                for header, body in self.receive(64):
                    self.handle(header, body)
                    if not self.running:
                        break
            while self.batch and self.running:
                self.fill_and_run_batch()
            worked = self.sent  # before a heartbeat: a heartbeat is no reason to stay awake
            if not self.sent:  # a quiet interval: tell the supervisor we are alive
                self.pacing.idle()
                self.send([pack_header(ops.HEARTBEAT, None)])
            self.chores()

    def chores(self) -> None:
        """What is due between requests: the scheduled weight check, letting go of the out
        segments that clients no longer hold, and unmapping what answered requests mapped."""
        self.maps.tidy()
        now = time.monotonic()
        if self.config.integrity_interval and now >= self.next_check:
            self.check_weights("scheduled")
            self.next_check = time.monotonic() + self.config.integrity_interval
        if (self.maps.kept or self.maps.inputs) and now >= self.next_sweep:
            self.maps.sweep()
            self.next_sweep = now + self.config.heartbeat_interval

    def wait(self, timeout_ms: int, worked: bool) -> bool:
        """True once a message is here, False after timeout_ms. Just after quick work the next
        request is likely within a round trip: look for it for up to spin_us first, awake,
        rather than pay the wake-ups of a sleep (protocol/pacing.py)."""
        return bool(self.pacing.wait(worked, self._has_message, lambda: self.sock.poll(timeout_ms, zmq.POLLIN)))

    def _has_message(self) -> bool:
        return bool(self.sock.get(EVENTS) & POLLIN)

    def handle(self, header: dict, body: list) -> None:
        op = header["op"]
        if op == ops.STOP:
            self.running = False
        elif op == ops.RUN and not self.corrupt:
            if self.batching and not header.get("stream"):  # a stream runs alone: model(x), in parts
                self.batch.append((header, body))
            else:
                self.run(header, body)

    def accept(self, header: dict, body: list) -> tuple[Any, int, Any, int, Any] | None:
        """(id, attempt, inputs, seq, its Place or None) of a RUN, or None after answering it
        (expired, undecodable)."""
        rid, attempt = header["id"], header.get("attempt", 0)
        deadline = header.get("deadline")
        if deadline is not None and time.monotonic() >= deadline:
            self.send(encode_error(rid, RequestTimeout(
                "the request's deadline passed before a worker could start it",
                setting="timeout"), attempt=attempt))
            return None
        try:
            place = Place(header, self.maps) if "shm" in header else None
            inputs = decode_payload(body, arrays=self.config.arrays, limits=self.limits,
                                    segment=place.take() if place is not None else None)
            return rid, attempt, inputs, header.get("seq", 0), place
        except BadRequest as err:
            self.send(encode_error(rid, err, attempt=attempt))
            return None

    def fill_and_run_batch(self) -> None:
        batching.fill_and_run(self)

    def run(self, header: dict, body: list) -> None:
        accepted = self.accept(header, body)
        if accepted is None:
            return
        rid, attempt, inputs, seq, place = accepted
        accepted = None  # the inputs are referred to from `inputs` alone, for place.released()
        self.pace(1 + self.waiting)
        self.before_run()
        started = time.monotonic()
        self.board.start(seq)
        try:
            output = self.model(inputs)
            if type(output) not in PLAIN and isinstance(output, (Iterator, AsyncIterator)):
                if not header.get("stream"):
                    raise NotAStream(output)
                frames = self.stream(rid, attempt, output)
            elif header.get("stream"):  # a stream of a plain model: its answer is the one part
                self.send([pack_header(ops.CHUNK, rid, attempt=attempt), *self.fits(encode_payload(output))])
                frames = encode_payload(None)
            else:
                frames = self.encode(output, place)
        except NotAStream as refused:
            refused.close()
            self.send(encode_error(rid, BadRequest(
                f"model {self.config.model} streams its answers (it returns a generator); call "
                "Client.stream() (AsyncClient.stream(), `isopool infer --stream`) instead of infer()",
                setting="stream"), attempt=attempt))
        except BadRequest as err:  # the client's shared memory, or the backend, would not take the answer
            self.send(encode_error(rid, err, attempt=attempt))
        except Exception as exc:
            self.send(encode_error(rid, self.remote_error(exc), attempt=attempt))
        else:
            inputs = output = None
            self.send([self.result_header(rid, attempt, place), *frames])
        self.board.finish(seq)
        self.pacing.did(time.monotonic() - started)
        if self.config.integrity_every_request:
            self.check_weights("after request", rid)

    def encode(self, output: Any, place: Place | None) -> list:
        return self.fits(encode_answer(output, place.out if place is not None else None, self.config.shm_threshold,
                                       self.maps))

    def fits(self, frames: list) -> list:
        """`frames`, if a message of them may pass the backend; else BadRequest naming the limit.
        Sent anyway, ZeroMQ would drop our connection (MAXMSGSIZE) without a word to anyone,
        and every request we hold would wait out its deadline."""
        size = body_bytes(frames)
        limit = self.limits.max_message_bytes
        if size > limit:
            raise BadRequest(f"the model's answer is {size} bytes, over max_message_bytes={limit}. Return less, or "
                             f"raise {self.limits.flag('max_message_bytes')}; a client on this host can take large "
                             "arrays through shared memory (--shm-threshold)", setting="max_message_bytes",
                             limit=limit)
        return frames

    @staticmethod
    def result_header(rid: Any, attempt: int, place: Place | None) -> bytes:
        """A RESULT's header; "reuse" when the request's shared memory is referred to no more."""
        if place is not None and place.released():
            return pack_header(ops.RESULT, rid, attempt=attempt, reuse=True)
        return pack_header(ops.RESULT, rid, attempt=attempt)

    def stream(self, rid: Any, attempt: int, parts: Iterator) -> list:
        """Send each part as a CHUNK; stop early if the request is cancelled. Returns the end frames."""
        if isinstance(parts, AsyncIterator):
            raise TypeError("async generators are not supported; make the model a plain generator")
        try:
            for part in parts:
                self.send([pack_header(ops.CHUNK, rid, attempt=attempt), *self.fits(encode_payload(part))])
                self.out.flush()  # a part goes out as soon as it exists
                if self.cancelled(rid):
                    log.info("stream %r cancelled by its client; generator closed", rid)
                    break
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # runs the generator's finally blocks, also when stopped early
        return encode_payload(None)  # the end of the stream

    def cancelled(self, rid: Any) -> bool:
        """Between parts: read what has arrived; a CANCEL of `rid` ends the stream, the rest waits."""
        stop = False
        for header, body in self.receive(64):  # read all of it: a bundle may hold more after the CANCEL
            if header["op"] == ops.CANCEL:
                stop = stop or header["id"] == rid
            elif header["op"] == ops.STOP:
                self.running = False
                stop = True
            else:
                self.backlog.append((header, body))
        return stop

    def check_weights(self, when: str, rid: Any = None) -> None:
        """Compare the weights with their fingerprint at load; report a mismatch and stop serving."""
        if self.fingerprint is None or self.corrupt:
            return
        now = fingerprint(self.model)
        if now != self.fingerprint:
            log.error("model weights changed since load (%s); asking to be replaced", when)
            self.send([pack_header(ops.INTEGRITY_FAILED, None, when=when, request=rid,
                                   expected=self.fingerprint, actual=now)])
            self.corrupt = True  # run nothing more; the supervisor requeues what we hold and stops us

    def remote_error(self, exc: BaseException) -> RemoteError:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RemoteError(f"{type(exc).__name__}: {exc}", remote_type=type(exc).__name__, traceback=tb,
                           worker=self.config.worker_id, pid=os.getpid())


def report_load_failure(config: WorkerConfig, exc: BaseException) -> None:
    """Tell the supervisor why the model would not load, so `serve` can show it plainly."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    err = RemoteError(f"model {config.model} failed to load: {type(exc).__name__}: {exc}",
                      remote_type=type(exc).__name__, traceback=tb, worker=config.worker_id, pid=os.getpid())
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, config.ident)
    sock.connect(config.backend)
    sock.send_multipart([pack_header(ops.LOAD_FAILED, None), *encode_error(None, err)[1:]])
    sock.close(linger=2000)
    ctx.term()


def run(config: WorkerConfig, model: Any = None) -> None:
    """Build the model (unless the template preloaded it) and serve until told to stop."""
    # Ctrl-C in the supervisor's terminal is the supervisor's to handle; it stops us cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    faulthandler.enable()  # a segfault prints the Python stack; the supervisor logs it, tagged
    # the supervisor tags each line of our output with the worker id and pid
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    share_threads(config.threads)
    if config.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(config.device)  # after fork: no CUDA state ever crossed it
    try:  # anything here means "failed to load"; and a model never runs outside its sandbox
        if config.sandbox:  # before any of the model's code runs (the template never imported it)
            from .sandbox import enter

            enter(config.sandbox)
        if model is None:
            model = build_model(config.model, WorkerContext(
                worker_id=config.worker_id, generation=config.generation, device=config.device,
                threads=config.threads, config=config.user_config))
    except BaseException as exc:  # noqa: BLE001
        traceback.print_exc()
        report_load_failure(config, exc)
        sys.stderr.flush()
        os._exit(EXIT_LOAD_FAILED)
    Worker(config, model).serve()


def main() -> None:
    """A worker started from a clean interpreter (`--preload none`)."""
    config = WorkerConfig.from_env()
    die_with_parent(config.parent_pid)
    run(config)
