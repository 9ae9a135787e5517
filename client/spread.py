"""A client of several daemons (hosts): requests spread by outstanding count, failed over on a host's death.

    Client([e1, e2, e3])  ──►  one Client per endpoint (each its own connection and I/O thread)
                          pick: the healthy endpoint with the fewest requests outstanding
                          a request that fails with
                              ShuttingDown, Overloaded   (the daemon never ran it)  → sent to another, always
                              Unavailable                (its host died or is cut off) → sent to another, if retry
                          within the request's own deadline; anything else is its answer

An endpoint that failed is avoided; a prober (a thread, or a task for AsyncClient) asks it
for its status every PROBE_S and takes it back when it is healthy and serving again. A
request is answered once: an attempt is only made after the one before it has failed, and
a late reply to a failed attempt finds no call waiting for it (core.Session drops it).
Control calls (scale, reload, load, unload, stop) go to every endpoint; status() says
what each endpoint said.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

from isopool.protocol import IsopoolError, Overloaded, ShuttingDown, Unavailable

PROBE_S = 0.5  # how often an avoided endpoint is asked whether it is healthy again
ROUND_PAUSE_S = (0.05, 0.1, 0.2, 0.5)  # when every endpoint failed once: wait, then try them again
NEVER_RAN = (ShuttingDown, Overloaded)


def endpoints_of(endpoint: Any) -> list[str] | None:
    """The endpoints of a list (or tuple) of several; None for one endpoint (or None)."""
    if isinstance(endpoint, (list, tuple)):
        given = [str(e) for e in endpoint]
        if not given:
            raise ValueError("give at least one endpoint")
        if len(set(given)) != len(given):
            raise ValueError(f"the endpoints repeat: {given}")
        return given if len(given) > 1 else None
    return None


def one_of(endpoint: Any) -> Any:
    """A one-element list's endpoint, else the endpoint as given."""
    return endpoint[0] if isinstance(endpoint, (list, tuple)) and len(endpoint) == 1 else endpoint


class Spread:
    """Which endpoint a request goes to next; no I/O. Thread-safe (the sync client's I/O
    threads report outcomes while callers pick)."""

    def __init__(self, endpoints: list[str]):
        self.endpoints = endpoints
        self.outstanding = {e: 0 for e in endpoints}
        self.avoided: dict[str, str] = {}  # endpoint -> why
        self.failovers = 0
        self.lock = threading.Lock()
        self.last: str | None = None

    def pick(self, tried: set[str]) -> str | None:
        """The endpoint for an attempt: healthy, not tried yet, fewest outstanding; of those
        tied, the one used last (a daemon that just answered is awake: one call at a time
        keeps to one host, load spreads as soon as calls overlap); an avoided one if no
        healthy one is left; None when all were tried."""
        with self.lock:
            left = [e for e in self.endpoints if e not in tried]
            if not left:
                return None
            healthy = [e for e in left if e not in self.avoided] or left
            chosen = min(healthy, key=lambda e: (self.outstanding[e], e != self.last))
            self.outstanding[chosen] += 1
            self.last = chosen
            return chosen

    def done(self, endpoint: str) -> None:
        with self.lock:
            self.outstanding[endpoint] -= 1

    def failed(self, endpoint: str, err: BaseException, retry: bool) -> bool:
        """Note an attempt's failure; True if the request should go to another endpoint."""
        movable = isinstance(err, NEVER_RAN) or (retry and isinstance(err, Unavailable))
        if isinstance(err, (ShuttingDown, Unavailable)):
            with self.lock:
                self.avoided[endpoint] = f"{type(err).__name__}: {err}"
        if movable:
            with self.lock:
                self.failovers += 1
        return movable

    def recovered(self, endpoint: str) -> None:
        with self.lock:
            self.avoided.pop(endpoint, None)

    def facts(self) -> dict:
        with self.lock:
            return {"endpoints": list(self.endpoints), "avoided": dict(self.avoided),
                    "outstanding": dict(self.outstanding), "failovers": self.failovers}


def serving(status: dict) -> bool:
    pool = status.get("pool", {})
    return bool(pool.get("healthy")) and pool.get("phase") == "serving" and pool.get("workers_ready", 0) > 0


def merged_status(spread: Spread, answers: dict[str, Any]) -> dict:
    """status() of a client of several endpoints: each endpoint's own answer (or its error),
    and a `pool` that adds up the ones that answered."""
    per = {e: (a if isinstance(a, dict) else {"error": f"{type(a).__name__}: {a}"}) for e, a in answers.items()}
    up = [a["pool"] for a in per.values() if "pool" in a]
    pool = {key: sum(p.get(key, 0) for p in up) for key in ("workers_target", "workers_ready", "queue_depth",
                                                           "in_flight", "requests_total", "restarts_total")}
    pool["healthy"] = any(serving(a) for a in per.values() if "pool" in a)
    pool["endpoints_up"] = len(up)
    return {"pool": pool, "endpoints": per, "spread": spread.facts()}


class Attempts:
    """One request's tries: where to send it next, and when to give up.

        while True:
            step = attempts.next()            # (endpoint, seconds left), or a pause in seconds
            ...call it; on an IsopoolError: attempts.failed(endpoint, err)   (raises it if final)
            attempts.finished(endpoint)       # after every call, whatever its outcome

    Each endpoint is tried once a round; after a round in which all failed, a short pause
    and another, until the deadline passes: then the last failure is raised."""

    def __init__(self, spread: Spread, deadline: float, retry: bool):
        self.spread, self.deadline, self.retry = spread, deadline, retry
        self.tried: set[str] = set()
        self.last: BaseException | None = None
        self.rounds = 0

    def next(self) -> tuple[str, float] | float:
        endpoint = self.spread.pick(self.tried)
        left = self.deadline - time.monotonic()
        if endpoint is None:
            pause = ROUND_PAUSE_S[min(self.rounds, len(ROUND_PAUSE_S) - 1)]
            if left <= pause:
                raise self.last or Unavailable("no endpoint took the request within its deadline")
            self.rounds += 1
            self.tried.clear()  # another round: hosts come back
            return pause
        if left <= 0:
            self.spread.done(endpoint)
            raise self.last or Unavailable("the request's deadline passed before any endpoint took it")
        self.tried.add(endpoint)
        return endpoint, left

    def take(self) -> tuple[str, float]:
        """next(), after any pause it asks for (on this thread)."""
        while isinstance(step := self.next(), float):
            time.sleep(step)
        return step

    async def atake(self) -> tuple[str, float]:
        """next(), after any pause it asks for (in the event loop)."""
        while isinstance(step := self.next(), float):
            await asyncio.sleep(step)
        return step

    def failed(self, endpoint: str, err: BaseException) -> None:
        if not isinstance(err, IsopoolError) or not self.spread.failed(endpoint, err, self.retry):
            raise err
        self.last = err

    def finished(self, endpoint: str) -> None:
        self.spread.done(endpoint)


def attempt_loop(spread: Spread, deadline: float, retry: bool, call: Callable[[str, float], Any]) -> Any:
    """call(endpoint, seconds left) on one endpoint after another until one answers (Attempts)."""
    attempts = Attempts(spread, deadline, retry)
    while True:
        endpoint, left = attempts.take()
        try:
            return call(endpoint, left)
        except IsopoolError as err:
            attempts.failed(endpoint, err)
        finally:
            attempts.finished(endpoint)
