"""The template process (a zygote): imports torch and the handler once, then forks workers.

    template ──fork──► intermediate ──fork──► spare (waits for work)
                       (exits at once)          │
                       the supervisor is told its pid ({"spare"}), then the intermediate
                       exits and the spare is reparented to the supervisor (a child
                       subreaper), which later reaps and watches it
    supervisor ──spawn {config}──► template ──{config, fds}──► spare: now the worker
    supervisor ◄──{pid}─────────── template, then it forks the next spare

A spare is forked ahead of need, because forking a process that holds torch and a model
twice, and the intermediate's exit, take tens of milliseconds (page tables): a replacement
starts at once instead. It costs one more process, whose pages are the template's until it
runs (copy-on-write), so next to no memory.

The template is started from a clean interpreter and never creates a ZeroMQ context or
touches CUDA, so nothing that cannot survive fork exists when it forks. With preload
"model" (CPU only) it builds the model once, so the workers share its weight pages
copy-on-write and a replacement serves at once; "auto" (the default) does so where it is
safe: on CPU, not sandboxed, for a model that takes no context or says `fork_safe = True`. Commands and replies are JSON lines on a socketpair.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

from .handler import WorkerContext, build_model, resolve, wants_context
from isopool.protocol.contract import ENV_TEMPLATE, ENV_TEMPLATE_FD, WorkerConfig, read_spawn_request, template_line
from isopool.protocol.exits import EXIT_LOAD_FAILED, EXIT_ORPHANED

from .environment import die_with_parent, set_threads
from .process import run
REPARENT_TIMEOUT_S = 5.0
# a load error's words, cut so that its line fits the supervisor's bound (MAX_TEMPLATE_LINE,
# 256 KiB) even where JSON writes every character as a 12-byte escape (a pair of surrogates)
ERROR_CHARS, TRACEBACK_CHARS = 4 << 10, 16 << 10


def fork_safe(factory: Any) -> bool:
    """May --preload auto build this model once, before the fork, for every worker? If it says
    so (`fork_safe = True` or False on the class or factory); else if it takes no context,
    which is all a worker's build could differ by (its id, its device)."""
    said = getattr(factory, "fork_safe", None)
    return bool(said) if said is not None else not wants_context(factory)


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(template_line(message))


class Spare:
    """A worker forked ahead of need: already the supervisor's child, with the template's
    imports (and model) in shared pages, waiting on `sock` for its config and fds."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock

    def take(self, request: bytes, fds: list[int]) -> int:
        """Hand it a spawn request; its pid. OSError if it is gone (killed from outside)."""
        try:
            socket.send_fds(self.sock, [request], fds)
        finally:
            self.sock.close()
        return self.pid


def fork_spare(cmd: socket.socket, model: Any, parent_pid: int) -> Spare:
    """Double-fork a Spare so its parent becomes the supervisor (a subreaper). The forks of a
    large process and the intermediate's exit take tens of milliseconds (page tables): done
    ahead, they are off a replacement's way. The supervisor is told the spare's pid before
    the intermediate may exit, so the spare is never, not even for a moment, a child of the
    supervisor it does not know (one it would end as left behind)."""
    theirs, ours = socket.socketpair()
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        try:
            os.close(r)
            os.close(go_w)
            ours.close()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                os.close(go_r)
                become_worker(cmd, theirs, model, parent_pid)
            os.write(w, str(pid).encode())
            os.close(w)
            os.read(go_r, 1)  # the template has told the supervisor (or is gone)
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    theirs.close()
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    spare = Spare(int(data), ours)
    try:
        send(cmd, {"spare": spare.pid})
    finally:
        os.close(go_w)  # let the intermediate exit: the spare becomes the supervisor's child
        os.waitpid(intermediate, 0)
    return spare


def become_worker(cmd: socket.socket, work: socket.socket, model: Any, parent_pid: int) -> None:
    """A spare: wait to be reparented and for work, then serve as the worker it is told to be."""
    code = 0
    try:
        cmd.close()
        os.setsid()  # its own process group, so a kill reaches whatever the handler starts
        end = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != parent_pid:  # the intermediate is exiting right now
            if time.monotonic() > end:
                os._exit(EXIT_ORPHANED)
            time.sleep(0.0002)
        die_with_parent(parent_pid)
        data, fds, _, _ = socket.recv_fds(work, 1 << 20, 2)  # its output pipe, and its sandbox channel
        work.close()
        if not data:
            os._exit(0)  # the template is gone: never needed
        config = read_spawn_request(data)
        if config.sandbox and len(fds) > 1:
            config.sandbox["channel"] = fds[1]  # the number it has here
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(fds[0])
        run(config, model)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    spec = json.loads(os.environ[ENV_TEMPLATE])
    cmd = socket.socket(fileno=int(os.environ[ENV_TEMPLATE_FD]))
    die_with_parent(spec["parent_pid"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = None
    try:
        set_threads(1)  # no intra-op thread pool may exist when we fork
        import isopool.worker.process  # noqa: F401 - imported once, shared by every worker

        preload = spec["preload"]
        if not spec.get("sandbox"):  # sandboxed, the model's module is first imported in the worker
            factory = resolve(spec["model"])
            if preload == "auto":
                preload = "model" if spec.get("cpu") and fork_safe(factory) else "imports"
        if preload == "model":
            model = build_model(spec["model"], WorkerContext(worker_id=-1, generation=0, device="cpu",
                                                             config=spec.get("user_config") or {}))
    except BaseException as exc:  # noqa: BLE001 - the model cannot load: say so, plainly
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        send(cmd, {"error": f"model {spec['model']} failed to load: {type(exc).__name__}: {exc}"[:ERROR_CHARS],
                   "traceback": tb[-TRACEBACK_CHARS:]})  # its end says most
        os._exit(EXIT_LOAD_FAILED)
    gc.collect()
    gc.freeze()  # keep the collector from writing to (and so copying) the shared pages
    parent = spec["parent_pid"]
    spare = None
    try:
        spare = fork_spare(cmd, model, parent)
    except OSError as exc:
        send(cmd, {"error": f"fork failed: {exc}", "traceback": ""})
        os._exit(EXIT_LOAD_FAILED)
    send(cmd, {"ready": True, "pid": os.getpid(), "preload": "model" if model is not None else "imports"})
    while True:  # one command per message: the supervisor waits for each reply
        data, fds, _, _ = socket.recv_fds(cmd, 1 << 20, 2)  # the worker's output pipe, and its sandbox channel
        if not data:
            os._exit(0)  # the supervisor is gone (and with it, by their parent-death signal, the spare)
        config = read_spawn_request(data)
        try:
            try:
                pid = spare.take(data, fds)  # at once: the forks were done ahead
            except OSError:  # the spare is gone (killed from outside): fork one now, the slow way
                pid = fork_spare(cmd, model, parent).take(data, fds)
            send(cmd, {"pid": pid, "slot": config.slot})
        except OSError as exc:
            send(cmd, {"error": f"fork failed: {exc}", "slot": config.slot})
        finally:
            for fd in fds:
                os.close(fd)
        try:  # the next one, after the reply: the supervisor does not wait for it
            spare = fork_spare(cmd, model, parent)
        except OSError as exc:
            send(cmd, {"error": f"fork failed: {exc}", "traceback": ""})
            os._exit(EXIT_LOAD_FAILED)


if __name__ == "__main__":
    main()
