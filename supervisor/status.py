"""The status map: what `isopool status --json` and Client.status() return."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .workers import SERVING, State

if TYPE_CHECKING:
    from .loop import Supervisor


def build_status(sup: "Supervisor", now: float) -> dict[str, Any]:
    workers = [worker_status(sup, w, now) for w in sorted(sup.workers.values(), key=lambda w: w.slot)]
    ready = sum(1 for w in sup.workers.values() if w.state in SERVING)
    healthy, reason = health(sup, ready, now)
    uptime = now - sup.started_at
    pool = {
        "workers_target": sup.target,
        "workers_ready": ready,
        "queue_depth": len(sup.queue),
        "in_flight": len(sup.requests) - len(sup.queue),
        "requests_total": sup.stats.total,
        "restarts_total": sup.restarts_total,
        "healthy": healthy,
        "health_reason": reason,
        "phase": sup.phase,
        "pid": os.getpid(),
        "uptime_s": round(uptime, 3),
        "started_at": sup.started_wall,
        "model": sup.config.model,
        "endpoint": sup.endpoint,
        "events_endpoint": sup.events.endpoint if sup.events else None,
        "event_subscribers": sup.events.subscribers if sup.events else 0,
        "metrics_url": sup.metrics_url,
        "auth_denied": sup.auth.denied if sup.auth is not None else None,  # CURVE handshakes refused
        "restarts_by_reason": dict(sup.restart_reasons),
        "max_queue": sup.config.max_queue,
        "restarts_in_window": len(sup.restarts.recent),
        "restart_window_s": sup.config.restart_window,
        "outcomes": dict(sup.stats.outcomes),
        **sup.stats.window(now, uptime),
    }
    return {"pool": pool, "workers": workers, "time": time.time()}


def health(sup: "Supervisor", ready: int, now: float) -> tuple[bool, str]:
    if sup.phase != "serving":
        return False, f"pool is {sup.phase}"
    if ready == 0:
        return False, "no worker is ready"
    if sup.restarts.degraded(now):
        return False, (f"degraded: {len(sup.restarts.recent)} restarts in the last "
                       f"{sup.config.restart_window:g}s (--max-restarts {sup.config.max_restarts})")
    return True, f"serving with {ready}/{sup.target} workers ready"


def worker_status(sup: "Supervisor", w, now: float) -> dict[str, Any]:
    key = sup.progress(w)[0] if w.inflight else None
    running = sup.requests.get(key) if key is not None else None
    return {
        "id": w.slot,
        "pid": w.pid,
        "state": w.state.value,
        "generation": w.generation,
        "device": w.device,
        "uptime_s": round(w.age(now), 3),
        "requests": w.requests,
        "errors": w.errors,
        "restarts": w.restarts,
        "rss_bytes": w.rss,
        "uss_bytes": w.uss,
        "cpu_percent": w.cpu_percent,
        "in_flight": len(w.inflight),
        "current_request_age_s": round(now - running.started_at, 3) if running else None,
        "last_heartbeat_s": round(now - w.last_seen, 3) if w.last_seen and w.state is not State.BACKOFF else None,
        "retiring": w.retire,
        "last_exit": w.last_exit,
        "last_error": w.last_error,
    }
