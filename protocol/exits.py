"""Process exit codes are a contract between workers, the supervisor and operators."""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_LOAD_FAILED = 78  # EX_CONFIG: the model could not be imported or built
EXIT_ORPHANED = 79  # the supervisor was gone before the worker finished starting

_SIGNAL_WORDS = {
    signal.SIGKILL: "likely the OOM killer, or killed from outside",
    signal.SIGSEGV: "segmentation fault in native code",
    signal.SIGABRT: "aborted (assertion in native code?)",
    signal.SIGBUS: "bus error in native code",
    signal.SIGFPE: "floating-point exception",
    signal.SIGILL: "illegal instruction",
    signal.SIGTERM: "terminated",
}


def describe_exit(returncode: int | None) -> str:
    """Words for a returncode as Popen/waitpid report it (negative: killed by that signal)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        words = _SIGNAL_WORDS.get(sig)
        return f"{sig.name} — {words}" if words else sig.name
    if returncode == EXIT_LOAD_FAILED:
        return f"exit code {returncode} — the model failed to load"
    if returncode == EXIT_ORPHANED:
        return f"exit code {returncode} — orphaned: the supervisor went away"
    return f"exit code {returncode}"


def exit_fields(returncode: int | None) -> dict:
    """exit_code / signal / reason, for errors, events and status."""
    if returncode is not None and returncode < 0:
        return {"exit_code": None, "signal": signal.Signals(-returncode).name, "reason": describe_exit(returncode)}
    return {"exit_code": returncode, "signal": None, "reason": describe_exit(returncode)}
