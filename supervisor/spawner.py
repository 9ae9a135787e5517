"""Starting worker processes and ending them.

Workers are never forked from the supervisor: its sockets and state must not leak into a
child. With `--preload none` each worker is a fresh interpreter (subprocess). Otherwise a
template process (worker/template.py), itself a fresh interpreter, imports torch and the
handler once and forks workers on request; the supervisor is a child subreaper, so those
workers become its children and are reaped and watched (pidfd) like any other.
Each worker leads its own session, so a kill reaches anything the handler started.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time

import psutil

from isopool.protocol.contract import (ENV_CONFIG_FD, ENV_TEMPLATE, ENV_TEMPLATE_FD, TEMPLATE_MAIN, WORKER_MAIN, WorkerConfig,
                                       spawn_request)

log = logging.getLogger("isopool.supervisor")
PR_SET_CHILD_SUBREAPER = 36
SPAWN_TIMEOUT_S = 5.0
# A template's line: a pid, its spare's, "ready", or a load error with its traceback (cut to
# fit by the template). A template runs the model's code with --preload model: what it says
# is read as strictly as a worker's messages, and a longer line or another shape breaks it.
MAX_TEMPLATE_LINE = 256 << 10
READ_CHUNKS = 16  # of 64 KiB, read from a template in one pass of the loop
READ_LINES = 64  # a template says a line or two a spawn: more in one read is a flood, which breaks it
TEMPLATE_FIELDS = {"pid": int, "slot": int, "spare": int, "ready": bool, "preload": str, "error": str,
                   "traceback": str}
# every line a template says (worker/template.py), by its fields
TEMPLATE_LINES = {frozenset(k) for k in (("spare",), ("ready", "pid", "preload"), ("pid", "slot"),
                                          ("error", "slot"), ("error", "traceback"))}


FULL_EVERY = 10  # samples between looks at a process's children and its USS (Process.resources)
PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")  # CONFIG_PROC_CHILDREN


def children(proc: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
    """The children of `proc` (and theirs, `recursive`), from /proc/PID/task/TID/children:
    one read per thread of each process in the tree. psutil's children() reads the stat of
    every process on the host instead (27 ms with 2,069 processes: the supervisor's loop
    stalled that long each second, for the stray scan alone). Kernels
    without CONFIG_PROC_CHILDREN: psutil's way. Raises psutil.NoSuchProcess if `proc` is
    gone; a child that ended meanwhile is left out."""
    if not PROC_CHILDREN:
        return proc.children(recursive=recursive)
    try:
        return _listed_children(proc, recursive)
    except OSError:  # a /proc that hides other users' processes, or refuses otherwise: psutil's way
        return proc.children(recursive=recursive)


def _listed_children(proc: psutil.Process, recursive: bool) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    seen = {proc.pid}
    parents = [proc.pid]
    while parents:
        listed: list[tuple[int, int]] = []  # (pid, its parent)
        for parent in parents:
            try:
                tids = os.listdir(f"/proc/{parent}/task")
            except (FileNotFoundError, ProcessLookupError):
                if parent == proc.pid:
                    raise psutil.NoSuchProcess(parent) from None
                continue  # it ended meanwhile
            for tid in tids:
                try:
                    with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                        listed.extend((int(pid), parent) for pid in f.read().split())
                except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
                    pass
        parents = []
        for pid, parent in listed:
            if pid in seen:
                continue
            seen.add(pid)
            try:
                child = psutil.Process(pid)
                if child.ppid() != parent:  # it ended and its pid was reused meanwhile: not ours
                    continue
            except psutil.Error:  # it ended meanwhile
                continue
            found.append(child)
            parents.append(pid)
        if not recursive:
            break
    return found


class Process:
    """A started process: pid, pidfd for the poll loop, its output pipe, reaping and signals."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None, output: int = -1):
        self.popen = popen
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.released = False  # the pidfd is closed
        self.output = output  # read end of the worker's stdout+stderr pipe, or -1 (read by output.Output)
        self.returncode: int | None = None
        self._ps: psutil.Process | None = None
        self._samples = 0
        self._tree: list = []  # its children, as last looked for
        self._uss = 0  # as last measured

    def poll(self) -> int | None:
        """Reap if exited. Returns the returncode (negative = killed by that signal)."""
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # not ours to reap (should not happen as a subreaper)
                    pid, status = self.pid, 255 << 8
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            if self.returncode is not None:
                self.release()
        return self.returncode

    def release(self) -> None:
        """Close the pidfd (reaped, or no longer watched: a stray from now on, to end_strays()).
        Its number stays, for the poller's unregister()."""
        if not self.released:
            self.released = True
            os.close(self.pidfd)

    def wait(self, timeout: float) -> int | None:
        if self.returncode is None:
            select.select([self.pidfd], [], [], timeout)
        return self.poll()

    def signal(self, sig: int) -> None:
        """Signal the process's whole group (it leads its own session)."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, sig)

    def resources(self) -> tuple[int, int, float]:
        """(RSS bytes, USS bytes, CPU %) of the process and its children; zeros once it is gone.
        RSS and CPU are read every time (statm, stat: cheap). Its children and its USS only every
        FULL_EVERY-th time: USS walks every page table (smaps_rollup), and finding children
        reads every process on the host; for a 450 MiB worker sampled each second the two took
        a tenth of a core from the supervisor."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
                self._ps.cpu_percent()
            full = self._samples % FULL_EVERY == 0
            self._samples += 1
            if full:
                self._tree = children(self._ps, recursive=True)
            rss = uss = 0
            for p in (self._ps, *self._tree):
                try:
                    if full:
                        mem = p.memory_full_info()
                        rss, uss = rss + mem.rss, uss + mem.uss
                    else:
                        rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    if p is self._ps:
                        raise
            if full:
                self._uss = uss
            return rss, self._uss, self._ps.cpu_percent()
        except (psutil.Error, OSError):
            return 0, 0, 0.0


def output_pipe() -> tuple[int, int]:
    """(read end for the supervisor, non-blocking; write end for the worker's stdout and stderr)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def spawn_fresh(config: WorkerConfig, keep: tuple[int, ...] = ()) -> Process:
    """A worker in a fresh interpreter (`--preload none`): seconds to start, nothing shared.
    It also inherits the fds in `keep` (the sandbox's channel)."""
    # the config (with the identity's secret) goes in a memfd only the child inherits: not in
    # its environment or argv, which /proc shows every process of the user
    memfd = os.memfd_create("isopool-worker-config")
    try:
        os.write(memfd, config.to_env().encode())
        os.lseek(memfd, 0, os.SEEK_SET)
        env = {**os.environ, ENV_CONFIG_FD: str(memfd)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        r, w = output_pipe()
        try:
            popen = subprocess.Popen([sys.executable, "-m", WORKER_MAIN], env=env, stdin=subprocess.DEVNULL,
                                     stdout=w, stderr=w, pass_fds=(memfd, *keep), start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
    finally:
        os.close(memfd)
    return Process(popen.pid, popen, output=r)


class TemplateError(RuntimeError):
    pass


class TemplateBroke(TemplateError):
    """It said what no template says: a malformed or overlong line, or a flood of lines."""


def broke_protocol(why: str) -> str:
    return (f"the template of this model broke its protocol ({why}); the model's code runs in it when preloaded "
            "(--preload): check what it writes to file descriptors it inherited")


def template_message(line: bytes) -> dict:
    """One line from a template: a JSON object of TEMPLATE_FIELDS, each of its type; else TemplateBroke."""
    try:
        msg = json.loads(line)
    except ValueError:  # also a line that is not UTF-8
        msg = None
    if type(msg) is not dict or frozenset(msg) not in TEMPLATE_LINES or \
            any(type(v) is not TEMPLATE_FIELDS[k] for k, v in msg.items()):
        raise TemplateBroke(f"a malformed line: {line[:80]!r}")
    return msg


class Template:
    """The zygote: a fresh interpreter that has imported torch and the handler, forking workers."""

    def __init__(self, model: str, preload: str, user_config: dict, sandbox: bool = False, cpu: bool = True):
        self.ready = False
        self.dead = False  # it broke its protocol: killed, its exit to come
        self.spare: int | None = None  # the pid of its worker forked ahead of need (our child, not a stray)
        self._buf = b""
        self._pending: list[dict] = []  # messages read by learn_spare(), for the next read()
        self.sock, theirs = socket.socketpair()
        spec = {"model": model, "preload": preload, "user_config": user_config, "parent_pid": os.getpid(),
                "sandbox": sandbox, "cpu": cpu}
        env = {**os.environ, ENV_TEMPLATE: json.dumps(spec), ENV_TEMPLATE_FD: str(theirs.fileno())}
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            popen = subprocess.Popen([sys.executable, "-m", TEMPLATE_MAIN], env=env,
                                     stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
        self.proc = Process(popen.pid, popen)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[dict]:
        """Messages that have arrived (non-blocking): {"ready"} or {"error", "traceback"}. A
        template that says something malformed is killed (its exit is then handled as any)."""
        self.sock.setblocking(False)
        messages, self._pending = self._pending, []
        try:
            for _ in range(READ_CHUNKS):  # the rest, if it says more, on the next pass
                if not (chunk := self.sock.recv(65536)):
                    break
                self._buf += chunk
                messages += self._lines()
        except BlockingIOError:
            pass
        except TemplateBroke as exc:
            messages.append(self.broken(str(exc)))
        return messages

    def _lines(self) -> list[dict]:
        """The whole lines in the buffer, checked; what they say of the template is noted."""
        out: list[dict] = []
        if self.dead:  # killed for what it said: nothing more it says is believed
            self._buf = b""
            return out
        *lines, self._buf = self._buf.split(b"\n")
        if len(lines) > READ_LINES:
            raise TemplateBroke(f"{len(lines)} lines at once")
        for line in lines:
            msg = template_message(line)
            self.spare = msg.get("spare", self.spare)
            if msg.get("ready"):
                self.ready = True
            out.append(msg)
        if len(self._buf) > MAX_TEMPLATE_LINE:
            raise TemplateBroke(f"a line longer than {MAX_TEMPLATE_LINE} bytes")
        return out

    def broken(self, why: str) -> dict:
        """It said something no template says: it is killed. Returns its load error (the model
        is failed at start, or the template is restarted after backoff)."""
        if not self.dead:
            self.dead = True
            log.error("the template (pid %d) broke its protocol and is killed: %s", self.proc.pid, why)
        self.ready = False
        self._buf = b""
        self.proc.signal(signal.SIGKILL)
        return {"error": broke_protocol(why), "traceback": ""}

    def read_ahead(self) -> bool:
        return bool(self._pending)

    def learn_spare(self) -> int | None:
        """The pid of its current spare, after reading what it has sent (kept for read())."""
        self._pending = self.read()
        return self.spare

    def spawn(self, config: WorkerConfig, keep: tuple[int, ...] = ()) -> Process:
        """Fork a worker (milliseconds); it is our child by the time its pid arrives. It also
        inherits the fds in `keep` (the sandbox's channel)."""
        if not self.ready:
            raise TemplateError("the template is not ready")
        self.sock.setblocking(True)
        self.sock.settimeout(SPAWN_TIMEOUT_S)
        r, w = output_pipe()
        try:
            socket.send_fds(self.sock, [spawn_request(config)], [w, *keep])
            reply = self._reply(time.monotonic() + SPAWN_TIMEOUT_S)
        except OSError as exc:
            os.close(r)
            raise TemplateError(f"the template did not answer: {exc}") from None
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        if "pid" not in reply:
            os.close(r)
            raise TemplateError(reply.get("error", "the template could not fork"))
        return Process(reply["pid"], output=r)

    def _reply(self, deadline: float) -> dict:
        """The answer to a spawn, by `deadline`: the next line with a pid or an error (a line
        that only tells of a new spare, left from before, is taken in on the way)."""
        try:
            while True:
                lines = self._lines()
                for i, msg in enumerate(lines):
                    if "pid" in msg or "error" in msg:
                        self._pending += lines[i + 1:]  # for read(): it came with the reply
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TemplateError(f"the template did not answer within {SPAWN_TIMEOUT_S:g}s")
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise TemplateError("the template closed its socket")
                self._buf += chunk
        except TemplateBroke as exc:
            self.broken(str(exc))
            raise

    def close(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(5)
        self.sock.close()


def become_subreaper() -> None:
    """Orphans below us (the template's forked workers) become our children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_strays(known: set[int]) -> list[int]:
    """Reap exited children we do not track (a handler's orphans reparented to us): no zombies."""
    reaped = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in known:
            return reaped
        os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)


def kill_now(proc: Process) -> None:
    proc.signal(signal.SIGKILL)
