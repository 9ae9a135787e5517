"""The shell's processes: a template per model and one process (with its board) per worker slot.

The core says what to start, signal and sample (actions.Spawn, Kill, Sample, StartTemplate,
StopTemplate); this carries it out and reports back as events. Each process's pidfd and
output pipe are registered in the loop's poller, so an exit is seen at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import psutil
import zmq

from isopool.logs import worth_a_line
from isopool.protocol import board
from isopool.protocol.contract import WorkerConfig
from isopool.protocol.exits import exit_fields

from . import spawner
from . import sandbox
from .actions import Spawned, SpawnFailed, TemplateExited, TemplateFailed, TemplateReady, WorkerExited
from .config import PoolConfig
from .listener import Listeners
from .output import Output

log = logging.getLogger("isopool.supervisor")
worker_log = logging.getLogger("isopool.worker")
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


class Processes:
    def __init__(self, config: PoolConfig, poller: zmq.Poller, backend_endpoint: str, private_dir: str):
        self.config = config
        self.poller = poller
        self.backend_endpoint = backend_endpoint
        self.private_dir = private_dir
        self.procs: dict[int, spawner.Process] = {}  # slot -> its current process
        self.outputs: dict[int, Output] = {}  # slot -> its current process's stdout and stderr
        self.dropped: dict[int, int] = {}  # slot -> bytes of output dropped (over --log-rate), all processes
        self.spawn_bugs = 0  # spawns that raised what no spawn should (logged, then tried again)
        self.told_at = 0.0  # when dropped output was last reported
        self.boards: dict[int, str] = {}  # slot -> its current process's board file
        self.worker_ids: dict[int, int] = {}  # slot -> the worker id it serves as (what logs and status say)
        self.model_of: dict[int, str] = {}  # slot -> its model's name, kept with `dropped` (a counter per slot)
        self.templates: dict[str, spawner.Template] = {}  # model name -> its template, while running
        self.also_known = lambda: ()  # pids of our other children (the HTTP gateways): never strays
        self.connected: set[int] = set()  # pids of the workers connected to the backend (admit)
        self.cut_off: list[int] = []  # slots of workers that lost their connection (admit): to replace
        self.spares_left: set[int] = set()  # the spares of stopped templates: strays, but ours
        self.listeners = Listeners(poller)  # sandboxed workers' seccomp filters ask these
        self.strays: dict[int, float] = {}  # pid of an orphan we are ending -> when to KILL it
        # the template's forked workers become our children, and so does every process a worker
        # leaves behind (even one that called setsid()), to be ended (end_strays)
        spawner.become_subreaper()

    # ------------------------------------------------------------ workers

    def spawn(self, slot: int, generation: int, device: str, worker_id: int, cfg: PoolConfig,
              token: str = "") -> object:
        """Start a worker of the model `cfg` describes, from its template or afresh."""
        path = os.path.join(self.private_dir, f"board.{slot}.{generation}")
        wc = WorkerConfig(
            backend=self.backend_endpoint, slot=slot, generation=generation, model=cfg.model,
            parent_pid=os.getpid(), device=device, worker_id=worker_id, threads=cfg.worker_threads(),
            heartbeat_interval=cfg.heartbeat_interval, arrays=cfg.arrays, integrity_interval=cfg.integrity_interval,
            integrity_every_request=cfg.integrity_every_request, prefetch=cfg.prefetch,
            max_batch_size=cfg.max_batch_size, max_batch_wait_ms=cfg.max_batch_wait_ms, spin_us=cfg.spin_us,
            shm_threshold=cfg.shm_threshold, user_config=cfg.user_config, limits=cfg.limits.__dict__, board=path, token=token,
        )
        ours = theirs = None
        try:
            board.create(path)  # only for a process about to exist
            wc.sandbox = sandbox.for_worker(cfg, slot, self.private_dir, path)
            keep: tuple[int, ...] = ()
            if wc.sandbox is not None:  # the channel its seccomp filter's listener fd comes back on
                ours, theirs = socket.socketpair()
                wc.sandbox["channel"] = theirs.fileno()
                keep = (theirs.fileno(),)
            if cfg.preload == "none":
                proc = spawner.spawn_fresh(wc, keep)
            elif cfg.model_name not in self.templates:
                raise spawner.TemplateError("the template is not running")
            else:
                proc = self.templates[cfg.model_name].spawn(wc, keep)
        except Exception as exc:  # the core hears of every failure, or it waits for this worker for ever
            _unlink(path)
            if ours is not None:
                ours.close()
            if not isinstance(exc, (spawner.TemplateError, OSError)):  # a bug of ours
                self.spawn_bugs += 1
                if worth_a_line(self.spawn_bugs):
                    log.exception("internal error starting worker slot %d (%d so far); it is started again after "
                                  "backoff", slot, self.spawn_bugs)
                return SpawnFailed(slot, f"internal error: {type(exc).__name__}: {exc}", template=False)
            return SpawnFailed(slot, spawner.broke_protocol(str(exc)) if isinstance(exc, spawner.TemplateBroke) else str(exc),
                               template=isinstance(exc, spawner.TemplateError),
                               broken=isinstance(exc, spawner.TemplateBroke))
        finally:
            if theirs is not None:
                theirs.close()
        if ours is not None:
            self.listeners.add(slot, proc.pid, ours)
        self.procs[slot] = proc
        self.boards[slot] = path
        self.worker_ids[slot] = worker_id
        self.model_of[slot] = cfg.model_name
        self.poller.register(proc.pidfd, zmq.POLLIN)
        if proc.output >= 0:
            self.poller.register(proc.output, zmq.POLLIN)
            self.outputs[slot] = Output(proc.output, cfg.log_rate, time.monotonic())
        return Spawned(slot, proc.pid)

    def admit(self, pid: int) -> str | None:
        """May process `pid` connect to the backend? Only a live worker's, and once (auth.Zap)."""
        slot = next((s for s, p in self.procs.items() if p.pid == pid and p.returncode is None), None)
        if slot is None:
            return "it is no worker of ours"
        if pid in self.connected:  # its first is gone (ZeroMQ reconnects): it can be heard no more
            self.cut_off.append(slot)
            return f"worker {self.worker_ids.get(slot, slot)} (pid {pid}) is connected already: a second connection"
        self.connected.add(pid)
        return None

    def dropped_of(self, name: str) -> dict[int, int]:
        """Output bytes dropped, by slot, for the workers of model `name`."""
        return {slot: n for slot, n in self.dropped.items() if self.model_of.get(slot) == name}

    def marks(self, slot: int) -> tuple[int, int] | None:
        path = self.boards.get(slot)
        return board.marks(path) if path is not None else None

    def kill(self, slot: int, sig: str) -> None:
        proc = self.procs.get(slot)
        if proc is not None:
            proc.signal(SIGNALS[sig])

    def sample(self, slot: int) -> tuple[int, int, float] | None:
        proc = self.procs.get(slot)
        return proc.resources() if proc is not None else None

    def ready(self, ready: dict, now: float) -> list:
        """Exits, refused calls and output among the ready fds: WorkerExited and SandboxRefused
        events (output is logged here)."""
        exits: list = self.listeners.ready(ready) if self.listeners.by_slot else []
        for slot, proc in list(self.procs.items()):
            if proc.output in ready:
                self.forward_output(slot, proc, now)
            if proc.pidfd in ready and proc.poll() is not None:
                self.poller.unregister(proc.pidfd)  # poll() closed it: its number may come back
                exits.append(WorkerExited(slot, exit_fields(proc.returncode)))
        return exits

    def forget(self, slot: int) -> None:
        """The core has read the exit of `slot`'s process: drop its fds and board."""
        proc = self.procs.pop(slot, None)
        self.listeners.drop(slot)
        if proc is not None:
            self.connected.discard(proc.pid)
            if proc.returncode is None and not proc.released:  # its exit was never seen: given up on
                self.poller.unregister(proc.pidfd)
                proc.release()  # still ours to reap: as a stray (end_strays), or by kill_strays at the end
            if proc.output >= 0:
                self.poller.unregister(proc.output)
                self.forward_output(slot, proc, time.monotonic(), final=True)
                self.outputs.pop(slot).close()
                proc.output = -1
        _unlink(self.boards.pop(slot, None))
        self.worker_ids.pop(slot, None)
        if proc is not None and proc.returncode is not None:
            self.end_strays(time.monotonic())  # its children are ours now

    def forward_output(self, slot: int, proc: spawner.Process, now: float, final: bool = False) -> None:
        """A worker's stdout/stderr, one log record per line, tagged with the worker; what is
        over --log-rate is dropped, counted and said once a second at most."""
        out = self.outputs[slot]
        dropped = out.dropped
        wid = self.worker_ids.get(slot, slot)
        for line in out.read(now, final):
            worker_log.info("worker %d [%s] %s", wid, proc.pid, line, extra={"worker": wid, "pid": proc.pid})
        if out.dropped > dropped:
            self.dropped[slot] = self.dropped.get(slot, 0) + out.dropped - dropped
            if now - self.told_at >= 1.0 or final:
                self.told_at = now
                log.warning("worker %d (pid %s) writes more output than --log-rate %d bytes/s; %d bytes of "
                            "it dropped so far", wid, proc.pid, self.config.log_rate, self.dropped[slot])

    def end_strays(self, now: float) -> int:
        """End the processes workers left behind: every child of ours that is neither a worker
        nor the template is an orphan (its parent, a worker or one of its children, is gone).
        TERM it and what it started, then KILL what is left after --kill-grace. Returns how
        many are being ended.

        Children first, then what we know: a template tells a spare's pid before the spare can
        become our child, so every child listed is known by the time we look. The other way
        round, a spare reparented while the children were listed (a /proc scan, a millisecond
        or more) was taken for a stray and ended, and the worker it was about to become died
        at its start: the chaos test caught it, one extra crash in about ten loaded runs."""
        try:
            children = spawner.children(psutil.Process())
        except psutil.Error:
            return len(self.strays)
        known = self.known_pids()
        alive = set()
        for child in children:
            if child.pid in known:
                continue
            alive.add(child.pid)
            due = self.strays.get(child.pid)
            if due is None:
                if child.pid in self.spares_left:
                    log.debug("ending process %d, the spare of a template that stopped", child.pid)
                else:
                    log.warning("process %d was left behind by a worker; ending it (SIGTERM, then SIGKILL after "
                                "--kill-grace)", child.pid)
                self.strays[child.pid] = now + self.config.kill_grace
                _signal_tree(child, signal.SIGTERM)
            elif now >= due:
                _signal_tree(child, signal.SIGKILL)
        for pid in set(self.strays) - alive:
            del self.strays[pid]
        if self.spares_left:  # a spare gone before it was seen here must not excuse a later process of its pid
            self.spares_left = {pid for pid in self.spares_left if psutil.pid_exists(pid)}
        spawner.reap_strays(known)
        return len(self.strays)

    def read_ahead(self) -> bool:
        """Whether a template's messages were read off its socket (learning its spare) and wait
        for template_events: its socket no longer wakes the loop for them."""
        return any(t.read_ahead() for t in self.templates.values())

    def known_pids(self) -> set[int]:
        known = {p.pid for p in self.procs.values()}
        known.update(t.proc.pid for t in self.templates.values())
        # a template says which pid its spare has before the spare can become our child
        known.update(pid for t in self.templates.values() if (pid := t.learn_spare()) is not None)
        known.update(self.also_known())
        return known

    # ------------------------------------------------------------ the template

    def start_template(self, cfg: PoolConfig) -> None:
        cpu = cfg.devices.strip().lower() == "cpu"
        self.templates[cfg.model_name] = t = spawner.Template(cfg.model, cfg.preload, cfg.user_config, cfg.sandbox, cpu)
        self.poller.register(t.fileno(), zmq.POLLIN)
        self.poller.register(t.proc.pidfd, zmq.POLLIN)

    def stop_template(self, name: str) -> None:
        t = self.templates.pop(name, None)
        if t is None:
            return
        spare = t.learn_spare()  # what it said last: its newest spare is already our child
        if spare is not None:  # ours, not a worker's leftover: ended as a stray, but not reported as one
            self.spares_left.add(spare)
        self.poller.unregister(t.fileno())
        if t.proc.returncode is None:
            self.poller.unregister(t.proc.pidfd)
        t.close()

    def template_events(self) -> list[tuple[str, object]]:
        """(model name, event) for what each template said or did since last asked."""
        out: list = []
        for name, t in list(self.templates.items()):
            for msg in t.read():
                if msg.get("ready"):
                    log.info("template of %s (pid %d) is ready", name, t.proc.pid)
                    out.append((name, TemplateReady(msg.get("preload", "imports"))))
                elif "error" in msg:
                    out.append((name, TemplateFailed(msg["error"], msg.get("traceback", ""))))
            if t.proc.poll() is not None:
                self.poller.unregister(t.proc.pidfd)
                self.poller.unregister(t.fileno())
                del self.templates[name]
                t.sock.close()
                out.append((name, TemplateExited(t.proc.pid, exit_fields(t.proc.returncode))))
        return out

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        for slot, proc in list(self.procs.items()):
            if proc.returncode is None:
                self.poller.unregister(proc.pidfd)
                spawner.kill_now(proc)
                if proc.wait(5) is None:  # still there (stuck in the kernel): kill_strays() tries again
                    proc.release()
            self.forget(slot)
        for name in list(self.templates):
            self.stop_template(name)
        self.kill_strays()

    def kill_strays(self) -> None:
        """At the end: nothing a worker started outlives the pool."""
        known = self.known_pids()
        try:
            strays = [c for c in spawner.children(psutil.Process()) if c.pid not in known]
        except psutil.Error:
            return
        for child in strays:
            _signal_tree(child, signal.SIGKILL)
        psutil.wait_procs(strays, timeout=5)  # reaps them too


def _signal_tree(proc: psutil.Process, sig: int) -> None:
    """`sig` to a process and everything below it."""
    try:
        tree = [proc, *spawner.children(proc, recursive=True)]
    except psutil.Error:
        tree = [proc]
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _unlink(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
