"""The sandbox a worker enters before it imports or builds its model (`serve --sandbox`).

    (root, as the supervisor started or forked it)
      ├─ --sandbox-network none: an empty network namespace of its own (unshare)
      ├─ its own uid (UID_BASE + slot) and the workers' group, no supplementary groups:
      │     it can no longer signal, trace or read the supervisor (root) or another worker
      │     (another uid), nor open the runtime directory beyond the backend socket
      ├─ no capabilities (gone with root), PR_SET_NO_NEW_PRIVS: no setuid binary gives them back
      ├─ the parent-death signal again (a change of uid clears it)
      └─ a seccomp filter (libseccomp, through pyseccomp):
            ptrace, process_vm_readv/writev, a signal or pidfd_open aimed at the supervisor
                → the process is killed (SIGSYS): the supervisor sees it and says why
            any other signal, pidfd_open, or a call on another process's limits, scheduling or
            memory (prlimit64, sched_set*, setpriority, ioprio_set, migrate/move_pages, kcmp)
                → asks the supervisor (seccomp user notification: the filter's listener fd is
                  handed to it and closed here): within the worker's own tree it goes ahead,
                  anywhere else it fails with EPERM and is reported (supervisor/listener.py)
            mount, unshare, setns, bpf, perf_event_open, keyctl, module and kexec calls, ...
                → EPERM, reported the same way: calls a model never needs

Each step raises if it fails: a worker never runs its model half-sandboxed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket

from isopool.protocol.contract import AT_A_PROCESS, SIGNALS

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
# calls that could reach another process: killing the worker says who tried
FATAL = ("ptrace", "process_vm_readv", "process_vm_writev")
DENIED = ("mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "kexec_load", "kexec_file_load",
          "init_module", "finit_module", "delete_module", "bpf", "perf_event_open", "keyctl", "add_key",
          "request_key", "swapon", "swapoff", "reboot", "settimeofday", "clock_settime", "acct", "quotactl",
          "open_by_handle_at", "name_to_handle_at", "userfaultfd", "iopl", "ioperm", "syslog", "vhangup",
          "fsopen", "fsmount", "move_mount", "open_tree")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: {what} failed: {os.strerror(err)}")


def enter(sandbox: dict) -> None:
    """Enter the sandbox `sandbox` describes; OSError if any part of it cannot be had."""
    import encodings.idna  # noqa: F401 - every socket call with a host name needs it; after the uid
    import pyseccomp       # changes, a Python installed where only root may read cannot import more

    libc = _libc()
    if sandbox.get("network") == "none":
        _check(libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    uid, gid = int(sandbox["uid"]), int(sandbox["gid"])
    os.setgroups([int(g) for g in sandbox.get("groups", [])])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(f"sandbox: still uid {os.geteuid()} after setresuid({uid})")
    os.environ["HOME"] = sandbox["home"]  # libraries that cache under ~ write where this uid may
    os.environ["XDG_CACHE_HOME"] = os.path.join(sandbox["home"], ".cache")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    supervisor = int(sandbox["supervisor"])
    if os.getppid() != supervisor:
        os._exit(1)  # it died meanwhile
    f = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in FATAL:
        f.add_rule(pyseccomp.KILL_PROCESS, name)
    arg = pyseccomp.Arg
    for name in SIGNALS:  # one comparison per argument and rule, and rules that do not overlap
        f.add_rule(pyseccomp.KILL_PROCESS, name, arg(0, pyseccomp.EQ, supervisor))
        f.add_rule(pyseccomp.NOTIFY, name, arg(0, pyseccomp.LT, supervisor))
        f.add_rule(pyseccomp.NOTIFY, name, arg(0, pyseccomp.GT, supervisor))
    for name, at in AT_A_PROCESS.items():
        f.add_rule(pyseccomp.NOTIFY, name, arg(at, pyseccomp.NE, 0))
    for name in DENIED:
        try:
            f.add_rule(pyseccomp.NOTIFY, name)
        except (ValueError, RuntimeError, OSError):
            pass  # a call this kernel or architecture does not have
    f.load()
    hand_over(f, int(sandbox["channel"]))


def hand_over(f, channel: int) -> None:
    """Send the filter's listener fd to the supervisor over `channel`, and keep no copy: a
    model that held it could answer its own calls."""
    import pyseccomp

    fd = pyseccomp._libseccomp.seccomp_notify_fd(f._filter)  # noqa: SLF001 - pyseccomp has no public call for it
    if fd < 0:
        raise OSError(-fd, "sandbox: the seccomp filter has no listener fd")
    try:
        with socket.socket(fileno=channel) as chan:
            socket.send_fds(chan, [b"seccomp"], [fd])
    finally:
        os.close(fd)
