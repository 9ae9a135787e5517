"""Dynamic batching in the worker: RUN messages wait up to --max-batch-wait-ms for company,
then model.batch(inputs) runs once and the results leave as one bundle.

    RUNs ──fill_and_run──► accepted ──run──► model.batch([x, ...]) ──► one RESULT each
                                               └ raises: each input alone, so only the culprit fails

The results are encoded first, then the batch's references to its inputs are dropped, and
only then are the headers made: a RESULT says "reuse" of a request's shared memory only if
nothing (the model included) still refers to it (protocol/shm.py).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import zmq

from isopool.protocol.codec import encode_error
from isopool.protocol.errors import BadRequest

if TYPE_CHECKING:
    from .process import Worker


def fill_and_run(w: "Worker") -> None:
    """Wait up to max_batch_wait_ms for a full batch, then run what we have."""
    size = w.config.max_batch_size
    end = time.monotonic() + w.config.max_batch_wait_ms / 1000
    while len(w.batch) < size and w.running:
        left_ms = int((end - time.monotonic()) * 1000)
        w.out.flush()  # nothing we have finished waits on a batch still filling
        if left_ms < 0 or not w.sock.poll(left_ms, zmq.POLLIN):
            break
        for header, body in w.receive(size - len(w.batch)):
            w.handle(header, body)
    items, w.batch = w.batch[:size], w.batch[size:]
    run(w, [a for a in (w.accept(h, b) for h, b in items) if a is not None])


def run(w: "Worker", live: list) -> None:
    """model.batch(inputs) once; if it raises, each input alone. `live` is emptied: the batch
    holds no reference to its inputs once their results are encoded."""
    if not live:
        return
    w.pace(len(live) + w.waiting)
    w.before_run()
    started = time.monotonic()
    w.board.start(live[0][3])  # a death now is blamed on the oldest of the batch
    try:
        outputs = w.model.batch([x for _, _, x, _, _ in live])
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(live):
            raise TypeError(f"batch() must return a list with one result per input ({len(live)}), "
                            f"got {type(outputs).__name__}")
    except Exception:  # noqa: BLE001 - find the input that breaks it
        if len(live) > 1:
            for item in live:
                run(w, [item])
            return
        rid, attempt, _, seq, _ = live[0]
        w.send(encode_error(rid, w.remote_error(sys.exc_info()[1]), attempt=attempt))
        w.board.finish(seq)
        w.pacing.did(time.monotonic() - started)
        return
    answers: list[tuple[Any, int, list, Any]] = []  # (id, attempt, payload frames or None, place or error)
    for (rid, attempt, _, _, place), output in zip(live, outputs):
        try:
            answers.append((rid, attempt, w.encode(output, place), place))
        except BadRequest as exc:  # the client's shared memory, or the backend, would not take it
            answers.append((rid, attempt, None, encode_error(rid, exc, attempt=attempt)))
        except Exception as exc:  # noqa: BLE001 - what will not encode is this request's error alone
            answers.append((rid, attempt, None, encode_error(rid, w.remote_error(exc), attempt=attempt)))
    last_seq = live[-1][3]
    live.clear()
    outputs = output = None  # noqa: F841 - the inputs' last references, before the headers say "reuse"
    for rid, attempt, frames, extra in answers:  # the batch's results leave as one bundle
        w.out.post(extra if frames is None else [w.result_header(rid, attempt, extra), *frames])
    w.sent = True
    w.out.flush()
    w.board.finish(last_seq)
    w.pacing.did(time.monotonic() - started)
    if w.config.integrity_every_request:
        w.check_weights("after request", answers[-1][0])
