"""The client's bookkeeping of pending calls: timers stay bounded however many calls pass a slow one."""

from __future__ import annotations

from isopool.client.core import COMPACT_ABOVE, Call, Session
from isopool.protocol import encode, ops


class Recorded(Call):
    __slots__ = ("outcome",)

    def __init__(self, cid, deadline):
        super().__init__(cid, deadline)
        self.outcome = None

    def resolve(self, value):
        self.outcome = ("result", value)

    def reject(self, exc):
        self.outcome = ("error", exc)

    def chunk(self, item):
        pass


def test_timers_of_answered_calls_do_not_pile_up_behind_a_slow_one():
    session = Session()
    slow = Recorded(0, deadline=100.0)  # the earliest deadline: the heap's top until it expires
    session.add(slow)
    answered = []
    for cid in range(1, 20_001):
        call = Recorded(cid, deadline=200.0 + cid)
        session.add(call)
        session.on_reply(encode(ops.RESULT, cid, cid))
        answered.append(call)
    assert all(c.outcome == ("result", c.cid) for c in answered)
    assert len(session.timers) <= 2 * len(session.pending) + COMPACT_ABOVE + 1
    assert session.expire(150.0) == [0]  # the slow call still times out at its deadline
    assert slow.outcome[0] == "error" and session.pending == {}
