"""What the pool tells about itself: the status map (`isopool status --json`, Client.status())
and the metrics snapshot (Prometheus). Both are read from the core, never written to it,
and both count restarts from the one counter (core.replacements), so they agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from isopool.protocol import encode_payload, ops, pack_header

from .blame import progress
from .metrics import Snapshot
from .slots import State, ready_count
from .stats import merged_window
from .phase import Phase

if TYPE_CHECKING:
    from .core import Core


def build_status(core: "Core", facts: dict, now: float) -> dict[str, Any]:
    """`facts`: what only the shell knows (pid, start time, wall-clock time, endpoints, subscribers, auth)."""
    cfg = core.config
    dropped = facts.get("output_dropped", {})
    workers = [{**worker_status(core, w, now), "output_dropped_bytes": dropped.get(w.slot, 0)}
               for w in sorted(core.workers.values(), key=lambda w: (w.id, w.slot))]
    ready = ready_count(core)
    healthy, reason = health(core, ready, now, facts.get("connections_degraded"))
    uptime = now - facts["started_at"]
    pool = {
        "workers_target": core.target,
        "workers_ready": ready,
        "queue_depth": core.ledger.queued,
        "in_flight": core.ledger.busy,  # held by workers, those already answered but still running included
        "in_flight_answered": len(core.ledger.orphans),  # cancelled or timed out, their worker not yet free
        "requests_total": core.stats.total,
        "held_bytes": core.ledger.held_bytes,  # the open requests' bodies, held for retries (--max-queue-bytes)
        "shm_bytes": core.ledger.shm_bytes,  # clients' shared memory the open requests name (--max-shm-bytes)
        "restarts_total": core.restarts_total,
        "sandbox_refused": core.sandbox_refused,  # sandboxed workers' calls their filter held back, refused
        "intruders": core.intruders,  # backend messages under a worker's identity without its token
        "healthy": healthy,
        "health_reason": reason,
        "phase": core.phase.value,
        "pid": facts["pid"],
        "uptime_s": round(uptime, 3),
        "started_at": facts["started_wall"],
        "model": cfg.model,
        "kind": core.kind,  # what the model says it is ("embedding": served at /v1/embeddings), or None
        "signature": core.signature,  # the tensors it declares (protocol/signature.py), or None
        "endpoint": facts["endpoint"],
        "events_endpoint": facts["events_endpoint"],
        "event_subscribers": facts["event_subscribers"],
        "metrics_url": facts["metrics_url"],
        "http": facts.get("http"),  # HOST:PORT of the Open Inference Protocol, when served
        "gateways": facts.get("gateways", []),  # its gateway processes: id, pid, restarts, last_exit
        "auth_denied": facts["auth_denied"],  # CURVE handshakes refused
        "backend_strangers": facts.get("backend_strangers", 0),  # backend messages under no identity we gave
        "backend_refused": facts.get("backend_refused", 0),  # backend connections from no worker, or a second one
        "restarts_by_reason": dict(core.replacements),
        "output_dropped_bytes": sum(dropped.values()),  # workers' output over --log-rate
        "clients_stalled": len(core.stalled),  # clients not reading their replies: new requests refused
        "replies_waiting": facts.get("replies_waiting", 0),  # for those clients, held by us
        "replies_dropped": facts.get("replies_dropped", 0),  # for those clients, over the bound
        "connections": facts.get("connections", 0),  # client connections open on the frontend
        "connections_shed": facts.get("connections_shed", 0),  # shut down to keep descriptors for restarts
        "connections_refused_at": facts.get("connections_refused_at", []),  # listeners taking none now (connections.py)
        "fd_limit": facts.get("fd_limit"),
        "max_queue": cfg.max_queue,
        "restarts_in_window": len(core.restarts.recent),
        "restart_window_s": cfg.restart_window,
        "template": core.template.state.value,
        "template_preload": core.template.preload or None,  # "model": workers fork with the model built
        "outcomes": dict(core.stats.outcomes),
        **core.stats.window(now, uptime),
    }
    return {"pool": pool, "workers": workers, "time": facts["time"]}


SUMMED = ("workers_target", "workers_ready", "queue_depth", "in_flight", "in_flight_answered", "requests_total",
          "restarts_total", "max_queue", "restarts_in_window", "intruders", "sandbox_refused", "held_bytes")
MODEL_KEYS = ("kind", "signature", "workers_target", "workers_ready", "queue_depth", "in_flight",
              "in_flight_answered", "requests_total", "restarts_total", "healthy", "health_reason", "phase", "template", "template_preload", "max_queue", "outcomes",
              "throughput_rps", "latency_p50_ms", "latency_p99_ms", "restarts_by_reason")


def daemon_status(models, facts: dict, dropped_of, now: float) -> dict[str, Any]:
    """The status of every model (models.Models), merged; `dropped_of(name)` is a model's dropped output."""
    per = {s.name: build_status(s.core, {**facts, "output_dropped": dropped_of(s.name)}, now) for s in models}
    return merge_status(per, {s.name: s.core for s in models}, facts, now)


def merge_status(per: dict[str, dict], cores: dict[str, "Core"], facts: dict, now: float) -> dict[str, Any]:
    """The daemon's status from each model's (build_status): `pool` adds them up, `models` has
    each model's summary, and every worker says its model."""
    names = list(per)
    pools = [per[n]["pool"] for n in names]
    pool = dict(pools[0])
    for key in SUMMED:
        pool[key] = sum(p[key] for p in pools)
    sick = [(n, p["health_reason"]) for n, p in zip(names, pools) if not p["healthy"]]
    pool["healthy"] = not sick
    if len(names) > 1:
        pool["health_reason"] = ("; ".join(f"{n}: {why}" for n, why in sick) if sick
                                 else f"serving {len(names)} models: " + ", ".join(
                                     f"{n} {p['workers_ready']}/{p['workers_target']}" for n, p in zip(names, pools)))
        phases = {p["phase"] for p in pools}
        pool["phase"] = pools[0]["phase"] if len(phases) == 1 else "serving" if "serving" in phases else pools[0]["phase"]
        pool["model"] = ", ".join(p["model"] for p in pools)
        outcomes: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        for p in pools:
            for k, v in p["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
            for k, v in p["restarts_by_reason"].items():
                by_reason[k] = by_reason.get(k, 0) + v
        pool["outcomes"], pool["restarts_by_reason"] = outcomes, by_reason
        pool["clients_stalled"] = max(p["clients_stalled"] for p in pools)
        pool.update(merged_window([c.stats for c in cores.values()], now, now - facts["started_at"]))
    models = {n: {"model": p["model"], **{k: p[k] for k in MODEL_KEYS}} for n, p in zip(names, pools)}
    workers = [{**w, "model": n} for n in names for w in per[n]["workers"]]
    return {"pool": pool, "models": models, "workers": workers, "time": facts["time"]}


def health(core: "Core", ready: int, now: float, shedding: str | None = None) -> tuple[bool, str]:
    cfg = core.config
    if core.phase is not Phase.SERVING:
        return False, f"pool is {core.phase.value}"
    if core.restarts.degraded(now):  # first: it says why no worker may be ready
        return False, (f"degraded: {len(core.restarts.recent)} restarts in the last "
                       f"{cfg.restart_window:g}s (--max-restarts {cfg.max_restarts})"
                       + ("; no worker is ready" if ready == 0 else ""))
    if ready == 0:
        return False, "no worker is ready"
    if shedding:
        return False, f"degraded: {shedding}"
    return True, f"serving with {ready}/{core.target} workers ready"


def worker_status(core: "Core", w, now: float) -> dict[str, Any]:
    load = core.ledger.load(w.slot)
    key = progress(core, w)[0] if load else None
    running = core.ledger.get(key) if key is not None else None
    return {
        "id": w.id,  # 0..N-1, stable across restarts and reload (the model's context.worker_id)
        "slot": w.slot,  # the supervisor's own handle, never reused
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
        "in_flight": load,
        "current_request_age_s": round(now - running.started_at, 3) if running else None,
        "last_heartbeat_s": round(now - w.last_seen, 3) if w.last_seen and w.state is not State.BACKOFF else None,
        "retiring": w.leaving,
        "last_exit": w.last_exit,
        "last_error": w.last_error,
    }


def snapshot(core: "Core", output_dropped: dict | None = None, connections: int = 0, shed: int = 0) -> Snapshot:
    """The figures Prometheus reads (metrics.py)."""
    states: dict[str, int] = {}
    for w in core.workers.values():
        states[w.state.value] = states.get(w.state.value, 0) + 1
    stats = core.stats
    return Snapshot(
        outcomes=dict(stats.outcomes), latency_buckets=tuple(stats.buckets), latency_sum=stats.latency_sum,
        queue_depth=core.ledger.queued, in_flight=core.ledger.busy, workers=states,
        restarts=dict(core.replacements),
        rss={w.id: w.rss for w in sorted(core.workers.values(), key=lambda w: w.generation) if w.pid is not None},
        output_dropped=dict(output_dropped or {}), connections=connections, connections_shed=shed,
    )



class StatusAnswer:
    """The status answer's payload, built once a loop pass however many ask in it (a bundle
    carries 64 asks and a pass reads 512 bundles: a flood built one for each, 128,000 of them
    kept every other client waiting 6 s). Each ask gets it under its own id."""

    def __init__(self) -> None:
        self.made_at = -1.0  # the pass (its `now`) the payload is of
        self.payload: list = []

    def frames(self, rid: Any, now: float, build: Callable[[], dict]) -> list:
        if self.made_at != now:
            self.payload = encode_payload(build())
            self.made_at = now
        return [pack_header(ops.RESULT, rid), *self.payload]
