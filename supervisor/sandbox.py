"""The supervisor's side of `--sandbox` (worker/sandbox.py is the worker's).

    check()               at start: root, libseccomp, user switching; else one line naming what is missing
    prepare(private_dir)  the supervisor not dumpable; the private dir reachable by the workers'
                          group only (r-x: they may connect to the backend socket, and write nothing)
    for_worker(...)       a worker's uid (UID_BASE + slot), group, home and board, made its own

Workers run as uids UID_BASE + slot with group GID: one uid per slot, so no worker can signal,
trace or read another, and none can reach the supervisor (root). Keep that range free of
real users on a host that runs --sandbox. With --sandbox-user NAME every worker runs as that
user instead (with GID as a supplementary group): they share its files, and what the kernel
would let one do to another of the same uid is closed by the seccomp filter (signals and the
like go to the supervisor, supervisor/listener.py) and by their being not dumpable (a uid
change makes a process so: no /proc/PID/mem or ptrace between them).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import stat

UID_BASE = 1_500_000_000  # a worker's uid is UID_BASE + its slot
GID = 1_500_000_000  # the workers' group: may connect to the backend socket, nothing else of ours
PR_SET_DUMPABLE = 4


class SandboxUnavailable(RuntimeError):
    pass


def check(user: str | None = None) -> None:
    """SandboxUnavailable naming what is missing, if workers cannot be sandboxed here (as
    `user`, if one is given)."""
    if os.geteuid() != 0:
        raise SandboxUnavailable("--sandbox needs root: it runs each worker under a uid of its own "
                                 f"({UID_BASE} + slot) and switches to it; this is uid {os.geteuid()}")
    try:
        import pyseccomp

        pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
        api = pyseccomp.get_api()
    except (ImportError, OSError, RuntimeError) as exc:
        raise SandboxUnavailable(f"--sandbox needs libseccomp and its Python binding (pip install pyseccomp; "
                                 f"apt-get install libseccomp2): {exc}") from None
    try:
        with open("/proc/self/status") as f:
            has_seccomp = "Seccomp:" in f.read()
    except OSError:
        has_seccomp = False
    if not has_seccomp:
        raise SandboxUnavailable("--sandbox needs a kernel with seccomp filters (CONFIG_SECCOMP_FILTER)")
    if user is not None:
        worker_user(user)
    if api < 5:  # 5: user notification, which the supervisor answers the held-back calls through
        raise SandboxUnavailable(f"--sandbox needs seccomp user notification (libseccomp 2.5 or newer on Linux 5.5 "
                                 f"or newer: API level 5); here it is level {api}")


def unreadable_python() -> str | None:
    """The first directory of the interpreter's library that other users cannot enter, if any:
    sandboxed workers could import nothing more from there than the template already had."""
    path = os.path.realpath(os.path.dirname(os.__file__))
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        here = os.sep.join(parts[:i])
        if not os.stat(here).st_mode & stat.S_IXOTH:
            return here
    return None


def prepare(private_dir: str, backend_path: str) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SandboxUnavailable("prctl(PR_SET_DUMPABLE, 0) failed: the supervisor would stay readable")
    os.chown(private_dir, 0, GID)
    os.chmod(private_dir, 0o750)  # the workers' group may enter (to connect) but not write
    os.chown(backend_path, 0, GID)
    os.chmod(backend_path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP)


def worker_user(name: str) -> tuple[int, int]:
    """(uid, gid) of --sandbox-user `name`; SandboxUnavailable if it cannot be one."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise SandboxUnavailable(f"--sandbox-user {name}: no such user on this host; create it "
                                 "(useradd --system --no-create-home NAME) or leave the option out") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise SandboxUnavailable(f"--sandbox-user {name}: uid {pw.pw_uid}, gid {pw.pw_gid} is root's, which is no "
                                 "sandbox; choose an unprivileged user")
    return pw.pw_uid, pw.pw_gid


def for_worker(cfg, slot: int, private_dir: str, board_path: str) -> dict | None:
    """The WorkerConfig.sandbox of the worker in `slot` (None without --sandbox); its home
    and board become its own. With --sandbox-user, the user's uid and group, and the workers'
    group beside it (for the backend socket); else UID_BASE + slot and the workers' group."""
    if not cfg.sandbox:
        return None
    uid, gid, groups = UID_BASE + slot, GID, []
    if cfg.sandbox_user:
        (uid, gid), groups = worker_user(cfg.sandbox_user), [GID]
    home = os.path.join(private_dir, f"home.{slot}")
    os.makedirs(home, mode=0o700, exist_ok=True)
    os.chown(home, uid, gid)
    os.chown(board_path, uid, gid)
    return {"uid": uid, "gid": gid, "groups": groups, "home": home, "network": cfg.sandbox_network,
            "supervisor": os.getpid()}
