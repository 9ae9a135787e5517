"""Sending and receiving frames with the least per-message work: the hot path of every hop.

pyzmq's send_multipart/recv_multipart are convenient but cost several microseconds of
flag arithmetic (IntFlag enums) and, at the end of each drained batch, a raised Again.
These helpers use plain int flags and ask the socket whether more is waiting. Bundles
(below) carry a burst of messages for one peer as one ZeroMQ message.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import msgpack
import zmq

from .headers import peek_id, unpack_header
from .errors import BadRequest
from .limits import Limits
from .schemas import check

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)



def send_frames(sock: zmq.Socket, frames: Sequence, flags: int = 0) -> None:
    """Send a multipart message. Large buffers go zero-copy; pyzmq copies small ones anyway."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, (SNDMORE if i < last else 0) | flags, copy=False)


class Oversized(list):
    """What drain() yields for a message over its bounds: only its first `kept` frames (the
    routing prefix and the header, to say whom and what to refuse), with its real size."""

    kept = 2

    def __init__(self, frames: list, size: int, count: int):
        super().__init__(frames[:self.kept])
        self.size, self.count = size, count


def oversized(frames: Oversized, limits: Limits) -> BadRequest:
    """The refusal of a message past the read bounds; its sender's size (the routing frame not counted)."""
    size, count = frames.size - len(frames[0]), frames.count - 1
    return BadRequest(f"a message of {size} bytes in {count} frames was refused: over "
                      f"max_message_bytes={limits.max_message_bytes} (or its frame bound) and read no further. "
                      f"Send less, or raise {limits.flag('max_message_bytes')}",
                      setting="max_message_bytes", limit=limits.max_message_bytes)


UNBOUNDED = 1 << 62


def drain(sock: zmq.Socket, limit: int, max_bytes: int = UNBOUNDED, max_frames: int = UNBOUNDED,
          until: float | None = None) -> Iterator[list]:
    """Yield up to `limit` waiting messages (as zmq.Frame lists) without blocking, and none
    after time.monotonic() passes `until`, if given (however few were read: the caller's work
    on each may be slow). A frame says whether more of its message follows, so no socket option
    is read per frame. For untrusted peers: a message over `max_bytes` in all or `max_frames`
    frames is read on frame by frame and its frames let go at once, so this process never holds
    more than the bounds of one message; it comes as an Oversized."""
    recv = sock.recv
    for _ in range(limit):
        if not sock.get(EVENTS) & POLLIN or until is not None and time.monotonic() > until:
            return
        frame = recv(NOBLOCK, copy=False)
        frames = [frame]
        size = len(frame)
        while frame.more:  # a multipart message arrives whole: the rest is already here
            frame = recv(NOBLOCK, copy=False)
            size += len(frame)
            frames.append(frame)
            if size > max_bytes or len(frames) > max_frames:
                count = len(frames)
                while frame.more:  # the rest is dropped as it is read
                    frame = recv(NOBLOCK, copy=False)
                    size += len(frame)
                    count += 1
                frames = Oversized(frames, size, count)
                break
        yield frames


def messages(frames: list, limits: Limits, at: int = 0, side: dict | None = None) -> list[tuple]:
    """The messages in one received ZeroMQ message (frames[:at] is its routing prefix), a
    bundle opened, each as (header, body, error): the decoded header and the frames after
    it; with `side` (schemas.py), the header was also checked against its op's schema. A
    message that cannot be read comes as (request id or None, None, BadRequest saying why). An empty message, which carries no id, is left out. Supervisor, workers and
    clients all read what they receive through here (after drain())."""
    try:
        opened = unbundle(frames, at)
    except ValueError as exc:
        return [(None, None, BadRequest(f"a bundle of messages was refused: {exc}; "
                                        "is the sender an isopool client?"))]
    out = []
    for m in opened:
        if len(m) <= at:
            continue
        raw = data(m[at])
        try:
            header = unpack_header(raw, limits)
            if side is not None:
                check(header, side)
            out.append((header, m[at + 1:], None))
        except BadRequest as err:
            out.append((peek_id(raw), None, err))
        except Exception as exc:  # a bug of ours in a check: the message is refused, the receiver lives
            out.append((peek_id(raw), None, BadRequest(f"the message could not be checked ({type(exc).__name__}: "
                                                       f"{exc}); this is a bug in isopool, please report it")))
    return out


# ---------------------------------------------------------------- bundles
#
# Under load most of a hop's cost is not Python but the work behind each ZeroMQ message and
# frame: the wake-ups of the sender's I/O thread, the receiver's I/O thread and the
# receiver's poll, and a send or receive call per frame. A bundle carries several messages
# for one peer as one ZeroMQ message, so a burst costs one set of wake-ups:
#
#     [BUNDLE + msgpack(index), frames of the messages the index says ride as frames]
#
# Each index entry is one message: a list of its frames' bytes (a small message, packed into
# the index itself: one frame for the whole burst) or an int, the number of frames it takes
# from those that follow (a large one, whose buffers still travel without a copy).
# 0xc1 is the one byte msgpack never uses, so no header can begin with it: a receiver tells
# a bundle from a plain message by its first byte. Frames of packed messages are bytes, not
# zmq.Frame: read them with data().

BUNDLE = b"\xc1"
MAX_BUNDLE = 64  # messages in one bundle; bounds what one receive hands the receiver
BUNDLE_BYTES = 8 << 20  # a bundle closes before it would pass this many bytes
BUNDLE_FRAMES = 256  # or frames: a message alone may be larger, held by its own limits
PACK_BELOW = 16 * 1024  # a message smaller than this is packed into the index
MAX_PACKED_FRAMES = 4098  # frames of one packed message (header, payload, max_buffers arrays)
_BYTES_ONLY = {bytes}  # the types a packed message's frames may have


def data(frame: zmq.Frame | bytes) -> bytes:
    """The bytes of a received frame: a zmq.Frame, or a bytes frame of a packed message."""
    return frame if type(frame) is bytes else frame.bytes


def unbundle(frames: list, at: int = 0) -> list[list]:
    """The messages in `frames` (frames[:at] is a routing prefix, kept on each); ValueError if malformed."""
    if len(frames) <= at:
        return [frames]
    first = data(frames[at])
    if first[:1] != BUNDLE:
        return [frames]
    try:
        index = msgpack.unpackb(first[1:], max_array_len=MAX_PACKED_FRAMES, max_bin_len=len(first),
                                max_map_len=0, max_str_len=0, max_ext_len=0,
                                **({"list_hook": _IndexBudget()} if len(first) > INDEX_COUNTED_ABOVE else {}))
    except _Overbuilt:
        raise ValueError(f"its bundle index holds more than {INDEX_ITEMS} items in its lists") from None
    except Exception:
        raise ValueError("its first frame starts with 0xc1, which marks a bundle, but the bundle index after "
                         "it is not valid msgpack of the index's kinds (frame counts, and lists of frames as bytes; no "
                         "strings, maps or extension types)") from None
    carried = len(frames) - at - 1
    if not isinstance(index, list) or not 0 < len(index) <= MAX_BUNDLE:
        raise ValueError(f"its bundle index must list 1 to {MAX_BUNDLE} messages")
    prefix, out, i = frames[:at], [], at + 1
    for entry in index:
        if type(entry) is int and 1 <= entry <= carried - (i - at - 1):
            out.append([*prefix, *frames[i:i + entry]])
            i += entry
        elif type(entry) is list and entry and {*map(type, entry)} == _BYTES_ONLY:
            out.append([*prefix, *entry])
        else:
            raise ValueError(f"its bundle index entry {str(entry)[:60]!r} is neither a frame count that fits "
                             f"its {carried} frames nor a list of frames")
    if i - at - 1 != carried:
        raise ValueError(f"its bundle index accounts for {i - at - 1} of its {carried} frames")
    return out


# An honest index is at most MAX_BUNDLE lists of at most MAX_PACKED_FRAMES frames, all under
# PACK_BELOW bytes each. One larger than INDEX_COUNTED_ABOVE bytes has its lists counted as
# msgpack builds them (nested empty lists: 50-70 bytes of Python each per byte sent).
INDEX_COUNTED_ABOVE = 256 << 10
INDEX_ITEMS = MAX_BUNDLE * (MAX_PACKED_FRAMES + 1)


class _Overbuilt(Exception):
    pass


class _IndexBudget:
    def __init__(self) -> None:
        self.items = 0

    def __call__(self, items: list) -> list:
        self.items += len(items) + 1
        if self.items > INDEX_ITEMS:
            raise _Overbuilt
        return items


def bundle(messages: list[list], at: int = 0, pack_below: int = PACK_BELOW,
           sizes: list[int] | None = None) -> list:
    """One message carrying `messages` (each with the same routing prefix frames[:at]);
    those smaller than `pack_below` bytes are packed into the index. `sizes`: each one's
    bytes past the prefix, where the caller has counted them (cuts())."""
    if len(messages) == 1:
        return messages[0]
    index: list = []
    frames = [*messages[0][:at], None]
    for i, m in enumerate(messages):
        body = m[at:]
        size = sizes[i] if sizes is not None else body_bytes(body)
        if size < pack_below:
            index.append([f if type(f) is bytes else bytes(f) for f in body])
        else:
            index.append(len(body))
            frames.extend(body)
    frames[at] = BUNDLE + msgpack.packb(index, use_bin_type=True)
    return frames


def body_bytes(body: Sequence) -> int:
    size = 0
    for f in body:
        size += f.nbytes if type(f) is memoryview else len(f)
    return size


def cuts(messages: list[list], at: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """Where a run of messages for one peer is cut into bundles: (start, end, sizes) for each,
    within MAX_BUNDLE messages, BUNDLE_BYTES and BUNDLE_FRAMES (a message over those alone is
    a bundle of its own), so what a receiver must take whole stays within its bounds."""
    start, size, nframes, sizes = 0, 0, 0, []
    for i, m in enumerate(messages):
        n = body_bytes(m[at:])
        k = len(m) - at
        if sizes and (len(sizes) == MAX_BUNDLE or size + n > BUNDLE_BYTES or nframes + k > BUNDLE_FRAMES):
            yield start, i, sizes
            start, size, nframes, sizes = i, 0, 0, []
        sizes.append(n)
        size += n
        nframes += k
    if sizes:
        yield start, len(messages), sizes


def bounds(limits: Limits) -> tuple[int, int]:
    """(bytes, frames): the most one ZeroMQ message from an honest peer holds under `limits`,
    a bundle included (cuts()). The supervisor reads nothing larger (drain())."""
    largest = max(limits.max_message_bytes, BUNDLE_BYTES) + limits.max_header_bytes
    return largest + MAX_BUNDLE * PACK_BELOW + 4096, max(BUNDLE_FRAMES, limits.max_buffers + 2) + 2


class Outbox:
    """Messages for the peers of one socket, gathered during a loop pass and sent by flush().

    Each peer's messages keep their order; those posted with bundle=True leave together as
    bundles (MAX_BUNDLE at most), the others each as itself (a peer that never said it reads
    bundles). On a ROUTER, the peer is the first frame of each message. Errors of one peer's
    send (a departed client) are handed to `on_error`, not raised.
    """

    def __init__(self, sock: zmq.Socket, routed: bool, on_error: Callable[[bytes | None, zmq.ZMQError], None]):
        self.sock = sock
        self.at = 1 if routed else 0
        self.on_error = on_error
        self.pending: dict[bytes | None, list] = {}
        self.count = 0
        self.since = 0.0  # monotonic time of the oldest message waiting

    def post(self, frames: list, bundle: bool = True) -> None:
        peer = frames[0] if self.at else None
        messages = self.pending.get(peer)
        if messages is None:
            self.pending[peer] = messages = []
        messages.append(frames if bundle else _Alone(frames))
        if not self.count:
            self.since = time.monotonic()
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.count = self.pending, {}, 0
        for peer, messages in pending.items():
            try:
                for frames in wire(messages, self.at):
                    send_frames(self.sock, frames, NOBLOCK)
            except zmq.ZMQError as exc:
                self.on_error(peer, exc)


def wire(messages: list, at: int) -> Iterator[list]:
    """The ZeroMQ messages that carry one peer's posted `messages`, in order: bundled where
    the peer reads bundles (cut by cuts()), each alone where it does not."""
    group: list = []
    for m in messages:
        if type(m) is _Alone:
            if group:
                yield from _bundles(group, at)
                group = []
            yield m.frames
        else:
            group.append(m)
    if group:
        yield from _bundles(group, at)


def _bundles(group: list, at: int) -> Iterator[list]:
    if len(group) == 1:
        yield group[0]
        return
    for start, end, sizes in cuts(group, at):
        yield bundle(group[start:end], at, sizes=sizes)


class _Alone:
    """A message for a peer that reads no bundles."""

    __slots__ = ("frames",)

    def __init__(self, frames: list):
        self.frames = frames
