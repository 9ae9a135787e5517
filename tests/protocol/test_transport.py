"""Bundles: several messages for one peer as one ZeroMQ message, strict refusal of bad ones; spinning before a sleep."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

from isopool.protocol.pacing import Spinner, spin_until
from isopool.protocol.transport import (BUNDLE, MAX_BUNDLE, PACK_BELOW, Outbox, bundle, data, drain,
                                        unbundle)


def frames_of(message: list) -> list[zmq.Frame]:
    return [zmq.Frame(f) for f in message]


def as_bytes(messages: list[list]) -> list[list[bytes]]:
    return [[bytes(f) if isinstance(f, (zmq.Frame, memoryview)) else f for f in m] for m in messages]


def test_a_bundle_opens_into_its_messages_in_order_each_with_the_routing_prefix():
    small = [[b"peer", b"h1", b"p1"], [b"peer", b"h2", b"p2", b"buf"], [b"peer", b"h3"]]
    packed = bundle(small, at=1)
    assert packed[0] == b"peer" and bytes(packed[1])[:1] == BUNDLE and len(packed) == 2  # one frame for all
    assert as_bytes(unbundle(frames_of(packed), at=1)) == small


def test_large_messages_ride_as_their_own_frames_beside_packed_small_ones():
    big = np.arange(PACK_BELOW, dtype=np.uint8)
    messages = [[b"h1", b"p1"], [b"h2", b"p2", memoryview(big)], [b"h3", b"p3"]]
    packed = bundle(messages)
    assert len(packed) == 1 + 3 and packed[3] is messages[1][2]  # the array is not copied
    assert as_bytes(unbundle(frames_of(packed))) == [[b"h1", b"p1"], [b"h2", b"p2", big.tobytes()], [b"h3", b"p3"]]


def test_a_lone_message_travels_as_itself():
    message = [b"h", b"p"]
    assert bundle([message]) is message
    assert as_bytes(unbundle(frames_of(message))) == [message]


@pytest.mark.parametrize("index", [
    msgpack.packb([1, 1]),  # claims 2 frames, carries 3
    msgpack.packb([3, 1]),  # claims 4
    msgpack.packb([3, 0]),  # an empty message
    msgpack.packb([3, []]),
    msgpack.packb([3, [b"h", "not bytes"]]),
    msgpack.packb([]),
    msgpack.packb({"n": 3}),
    msgpack.packb(["3"]),
    msgpack.packb([[b"h"]] * (MAX_BUNDLE + 1)),
    b"\xff\xff",  # not msgpack
])
def test_a_malformed_bundle_index_is_refused(index):
    with pytest.raises(ValueError):
        unbundle(frames_of([BUNDLE + index, b"a", b"b", b"c"]))


def test_outbox_keeps_each_peers_order_and_sends_non_bundle_peers_plain_messages():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        dealer.setsockopt(zmq.IDENTITY, b"d")
        router.bind("inproc://outbox")
        dealer.connect("inproc://outbox")
        dealer.send(b"hello")
        assert router.poll(5000)
        router.recv_multipart()
        out = Outbox(router, routed=True, on_error=lambda peer, exc: pytest.fail(f"{peer}: {exc}"))
        for i in range(MAX_BUNDLE + 3):
            out.post([b"d", b"h%d" % i])
        out.post([b"d", b"plain"], bundle=False)
        out.post([b"d", b"last"])
        assert len(out) == MAX_BUNDLE + 5
        out.flush()
        assert len(out) == 0
        received = []
        for _ in range(5):
            assert dealer.poll(5000)
            raw = list(drain(dealer, 10))
            received.extend(raw)
            if len(received) == 4:
                break
        assert [len(unbundle(m)) for m in received] == [MAX_BUNDLE, 3, 1, 1]
        assert bytes(received[2][0]) == b"plain"  # a peer that reads no bundles gets it as sent
        opened = [data(m[0]) for r in received for m in unbundle(r)]
        assert opened == [b"h%d" % i for i in range(MAX_BUNDLE + 3)] + [b"plain", b"last"]
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_a_spin_returns_what_it_found_as_soon_as_it_is_there():
    looks = iter([None, 0, [], [("sock", 1)]])
    assert spin_until(lambda: next(looks), seconds=10.0) == [("sock", 1)]


def test_a_spin_that_finds_nothing_gives_up_after_its_time():
    looks = []
    assert spin_until(lambda: looks.append(1), seconds=0.001) is None
    assert len(looks) >= 1  # it looked at least once, then stopped: the loop is bounded by the clock


def test_a_spinner_stops_spinning_for_gaps_longer_than_its_limit_and_learns_again():
    # a limit of 100 ms: a process put off the CPU for a moment on a loaded machine still
    # counts a message that came at once as quick
    spinner = Spinner(limit_s=0.1)
    never = lambda: None  # noqa: E731 - nothing arrives while it spins

    def late() -> bool:  # the message comes after the limit
        time.sleep(0.15)
        return True

    for _ in range(12):
        assert spinner.wait(never, late) is True
    assert spinner.window == 0.0  # halved by each long gap, down to nothing
    assert spinner.wait(never, lambda: True) is True  # one that came at once, while it slept
    assert spinner.window == Spinner.GROW_FROM_S
    assert spinner.wait(never, lambda: True) is True
    assert spinner.window == 2 * Spinner.GROW_FROM_S


def test_a_spinner_that_finds_its_message_keeps_its_window():
    spinner = Spinner(limit_s=0.002)
    assert spinner.wait(lambda: "here", lambda: pytest.fail("slept although the message was there")) == "here"
    assert spinner.window == 0.002
