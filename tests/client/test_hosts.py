"""A client of several hosts, across real network boundaries (tests/hosts.py): requests spread,
and fail over when a daemon is killed, a link is cut or a daemon drains. Nothing lost, nothing
answered twice, nothing crossed: every answer echoes its own request."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter

import pytest

from isopool import AsyncClient, Client
from tests.hosts import Hosts

ECHO = "isopool.examples.faulty:Echo"
IN_FLIGHT = 32


@pytest.fixture
def hosts(short_tmp):
    made: list[Hosts] = []

    def make(count: int) -> Hosts:
        h = Hosts(short_tmp, count)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class Load:
    """`total` requests through one client, IN_FLIGHT at a time; each answer is checked to be its
    own request's echo. `at(n, act)` runs act() once n answers have arrived (on the loop's thread)."""

    def __init__(self, client, total: int, timeout: float = 30.0):
        self.client, self.total, self.timeout = client, total, timeout
        self.answered: dict[int, int] = {}  # request -> pid that answered it
        self.failed: list[BaseException] = []
        self.crossed = 0
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(IN_FLIGHT)
        self.actions: list[tuple[int, object]] = []

    def at(self, n: int, act) -> None:
        self.actions.append((n, act))

    def run(self) -> None:
        for i in range(self.total):
            self.slots.acquire()
            while self.actions and len(self.answered) >= self.actions[0][0]:
                self.actions.pop(0)[1]()
            self.client.submit({"n": i}, timeout=self.timeout).add_done_callback(lambda f, i=i: self.done(i, f))
        for _ in range(IN_FLIGHT):  # bounded: every call ends by its deadline
            self.slots.acquire()

    def done(self, i: int, f) -> None:
        with self.lock:
            if f.exception() is not None:
                self.failed.append(f.exception())
            else:
                answer = f.result()
                if answer["echo"] != {"n": i}:
                    self.crossed += 1
                assert i not in self.answered, f"request {i} answered twice"
                self.answered[i] = answer["pid"]
        self.slots.release()

    def check(self) -> None:
        assert self.failed == [] and self.crossed == 0, (self.failed[:3], self.crossed)
        assert sorted(self.answered) == list(range(self.total))  # every one, once


def host_of(pools) -> dict[int, int]:
    """worker pid -> host number."""
    return {w["pid"]: i for i, p in enumerate(pools, 1) for w in p.workers() if w["pid"]}


def test_load_spreads_over_every_host_and_survives_a_daemon_killed_mid_load(hosts):
    h = hosts(3)
    pools = h.start("--model", ECHO, "--workers", "1")
    before = host_of(pools)
    with Client([h.endpoint(i) for i in (1, 2, 3)], timeout=30, **h.client_kw()) as client:
        load = Load(client, 3000)
        load.at(1000, lambda: os.kill(pools[0].pid, signal.SIGKILL))  # the supervisor; its workers follow it
        load.run()
        load.check()
        spread = client.status()["spread"]
    served = Counter(before.get(pid, 0) for pid in load.answered.values())
    # all three took load: spread by outstanding count, a host slowed by a busy machine takes
    # less (CI once saw 164 of the first 1,000 on host 1), but never none
    assert set(served) == {1, 2, 3} and all(n >= 50 for n in served.values()), served
    assert h.endpoint(1) in spread["avoided"]
    print(f"hosts: 3 ({'namespaces' if h.fallback is None else h.fallback}); requests {load.total}, "
          f"by host {dict(served)}; killed 1; failovers {spread['failovers']}; lost 0, crossed 0")


def test_a_cut_link_fails_over_within_the_deadline_and_the_host_is_taken_back(hosts):
    h = hosts(2)
    if h.fallback is not None:
        pytest.skip(f"no link to cut: {h.fallback}")
    pools = h.start("--model", ECHO, "--workers", "1")
    with Client([h.endpoint(1), h.endpoint(2)], timeout=30, **h.client_kw()) as client:
        load = Load(client, 2000)
        load.at(500, lambda: h.link(1, up=False))
        load.run()
        load.check()
        assert h.endpoint(1) in client.status(timeout=2)["spread"]["avoided"]
        h.link(1, up=True)
        end = time.monotonic() + 30
        while h.endpoint(1) in client.spread.facts()["avoided"] and time.monotonic() < end:
            time.sleep(0.1)  # the prober takes it back: polled, bounded
        assert h.endpoint(1) not in client.spread.facts()["avoided"]
        again = Load(client, 400)
        again.run()
        again.check()
    hosts_after = Counter(host_of(pools).get(pid, 0) for pid in again.answered.values())
    assert hosts_after[1] > 0 and hosts_after[2] > 0, hosts_after


def test_a_daemon_drained_with_sigterm_fails_no_request(hosts):
    h = hosts(2)
    pools = h.start("--model", ECHO, "--workers", "1")
    with Client([h.endpoint(1), h.endpoint(2)], timeout=30, **h.client_kw()) as client:
        load = Load(client, 2000)
        load.at(500, lambda: os.kill(pools[0].pid, signal.SIGTERM))
        load.run()
        load.check()
    assert pools[0].proc.wait(30) == 0  # it drained and stopped cleanly


def test_async_client_spreads_fails_over_and_reports_each_endpoint(hosts):
    h = hosts(2)
    pools = h.start("--model", ECHO, "--workers", "1")

    async def main() -> tuple[dict, dict]:
        answers: dict[int, dict] = {}
        async with AsyncClient([h.endpoint(1), h.endpoint(2)], timeout=30, **h.client_kw()) as client:
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def one(i: int) -> None:
                async with slots:
                    if i == 300:
                        os.kill(pools[0].pid, signal.SIGKILL)
                    answers[i] = await client.infer({"n": i})

            await asyncio.gather(*(one(i) for i in range(1000)))
            return answers, await client.status(timeout=2)

    answers, status = asyncio.run(main())
    assert sorted(answers) == list(range(1000)) and all(a["echo"] == {"n": i} for i, a in answers.items())
    assert set(status["endpoints"]) == {h.endpoint(1), h.endpoint(2)}
    assert "error" in status["endpoints"][h.endpoint(1)] and status["endpoints"][h.endpoint(2)]["pool"]["healthy"]
    assert status["pool"]["endpoints_up"] == 1
