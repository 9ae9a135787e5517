"""Rendering `isopool status` with rich: a worker table and a pool summary."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"idle": "green", "busy": "cyan", "starting": "yellow", "backoff": "red", "draining": "magenta",
               "stopping": "magenta", "exited": "red"}


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def status_table(status: dict[str, Any]) -> Group:
    pool = status["pool"]
    table = Table(title="workers", title_justify="left", expand=False)
    several = len(status.get("models", {})) > 1
    for col in (("model",) if several else ()) + ("id", "pid", "state", "device", "uptime", "requests", "errors",
                                                  "restarts", "RSS", "USS", "CPU%", "request age", "heartbeat",
                                                  "last exit"):
        table.add_column(col, justify="right" if col not in ("model", "state", "device", "last exit") else "left")
    for w in status["workers"]:
        exit_reason = (w.get("last_exit") or {}).get("reason", "-")
        state = w["state"] + (f" ({w['retiring']})" if w.get("retiring") else "")
        table.add_row(
            *((w.get("model", "-"),) if several else ()), str(w["id"]), str(w["pid"] or "-"), Text(state, style=STATE_STYLE.get(w["state"], "")),
            w.get("device", "cpu"), _secs(w["uptime_s"]), str(w["requests"]), str(w["errors"]), str(w["restarts"]),
            _mib(w["rss_bytes"]), _mib(w.get("uss_bytes")), f"{w.get('cpu_percent', 0):.0f}",
            _secs(w.get("current_request_age_s")), _secs(w.get("last_heartbeat_s")), exit_reason,
        )
    health = Text(("healthy" if pool["healthy"] else "UNHEALTHY") + f" — {pool['health_reason']}",
                  style="green" if pool["healthy"] else "bold red")
    p50, p99 = pool.get("latency_p50_ms"), pool.get("latency_p99_ms")
    summary = Text(
        f"pool pid {pool['pid']} · {pool['phase']} · workers {pool['workers_ready']}/{pool['workers_target']} ready · "
        f"queue {pool['queue_depth']}/{pool['max_queue']} · in flight {pool['in_flight']} · "
        f"{pool.get('throughput_rps', 0):.1f} req/s · p50 {p50 if p50 is not None else '-'} ms · "
        f"p99 {p99 if p99 is not None else '-'} ms (last minute) · requests {pool['requests_total']} · "
        f"restarts {pool['restarts_total']} · up {_secs(pool['uptime_s'])}\n"
        f"model {pool['model']} · endpoint {pool['endpoint']}"
    )
    return Group(summary, health, table)


def wide_console() -> Console:
    """A terminal keeps its width; a pipe or file gets room for the whole table."""
    console = Console()
    return console if console.is_terminal else Console(width=180)


def render_status(status: dict[str, Any], console: Console | None = None) -> None:
    (console or wide_console()).print(status_table(status))


def watch_status(client: Any, interval: float, count: int, as_json: bool) -> None:
    """Refresh until Ctrl-C (or `count` refreshes). Works on a pipe too: it then prints each frame."""
    console = wide_console()
    shown = 0
    try:
        if as_json or not console.is_terminal:
            while not count or shown < count:
                status = client.status()
                if as_json:
                    console.print_json(json.dumps(status, default=str))
                else:
                    render_status(status, console)
                shown += 1
                if count and shown >= count:
                    break
                time.sleep(interval)
            return
        with Live(status_table(client.status()), console=console, refresh_per_second=4) as live:
            shown = 1
            while not count or shown < count:
                time.sleep(interval)
                live.update(status_table(client.status()))
                shown += 1
    except KeyboardInterrupt:
        pass
