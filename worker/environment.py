"""What a worker process sets up about itself before its model runs: that it dies with the
supervisor, and how many threads its libraries may start."""

from __future__ import annotations

import ctypes
import os
import signal

from isopool.protocol.exits import EXIT_ORPHANED

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies; no orphans, ever."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def share_threads(threads: int) -> None:
    """Hold every thread pool of the model to the worker's share of the cores: torch's
    (set_threads), and Rust libraries' Rayon pools (Hugging Face tokenizers'), which start one
    thread per core. On 2 cores and 2 workers, those threads preempted the workers' torch
    threads 1.1 times per MiniLM request each; with one thread, a tokenizer encodes inline
    (docs/performance.md).
    Set in the worker, before the model's first call starts them; never in the template, whose
    environment every worker inherits (it calls set_threads(1) only). A variable the user set
    (not empty) is kept."""
    threads = max(1, threads)
    set_threads(threads)
    wanted = {"RAYON_NUM_THREADS": str(threads), **({"TOKENIZERS_PARALLELISM": "false"} if threads == 1 else {})}
    for name, value in wanted.items():
        if not os.environ.get(name):
            os.environ[name] = value
