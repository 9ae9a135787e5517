"""The pool's phase and the moves between them (control.py makes the moves).

    STARTING ──all workers ready──► SERVING ──SIGTERM, stop──► DRAINING ──drained, timeout──► STOPPING ──► STOPPED
        │                                                          │ second signal                ▲
        └──── load failure, signal ────────────────────────────────┴──────────────────────────────┘
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"

    __hash__ = object.__hash__

    @property
    def runs_workers(self) -> bool:
        """Workers are started and replaced."""
        return self is not Phase.STOPPING and self is not Phase.STOPPED


ACCEPTING = frozenset({Phase.STARTING, Phase.SERVING})  # new requests are taken (queued while starting)

PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.SERVING, Phase.STOPPING}),
    Phase.SERVING: frozenset({Phase.DRAINING, Phase.STOPPING}),
    Phase.DRAINING: frozenset({Phase.STOPPING}),
    Phase.STOPPING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}
