"""The client's connection to the supervisor: the endpoint, CURVE keys, socket options, and
what its socket monitor says (connected, dropped, refused) with the error each means."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import zmq

from isopool.protocol import IsopoolError, NotAllowed, Unavailable
from isopool.protocol.endpoints import ENV_ENDPOINT, closed_path, default_endpoint, ipc_path, runtime_dir

if TYPE_CHECKING:
    from .core import Session

CONNECT_S = 1.0  # how long a call waits for the connection to the supervisor before Unavailable


ENDPOINT_SCHEMES = ("ipc://", "tcp://")


def resolve_endpoint(endpoint: str | None) -> str:
    """The endpoint a client connects to (the default one if None); ValueError if it is malformed."""
    endpoint = endpoint or default_endpoint()
    if not endpoint.startswith(ENDPOINT_SCHEMES) or len(endpoint) <= len("ipc://"):
        raise ValueError(f"endpoint {endpoint!r} is not one isopool serves: give ipc:///path/to/pool.sock or "
                         "tcp://host:port (the one `isopool serve` printed)")
    return endpoint


ENV_SECRET_KEY = "ISOPOOL_CURVE_SECRET_KEY"
ENV_SERVER_KEY = "ISOPOOL_CURVE_SERVER_KEY"


def curve_keys(secret_key: str | None, server_key: str | None) -> dict | None:
    """CURVE keys from `isopool keygen` files (arguments, else the environment); None for plain."""
    import os

    import zmq.auth

    secret_key = secret_key or os.environ.get(ENV_SECRET_KEY)
    server_key = server_key or os.environ.get(ENV_SERVER_KEY)
    if not secret_key and not server_key:
        return None
    if not (secret_key and server_key):
        raise ValueError("CURVE needs both the client's .key_secret file and the server's public .key file")
    public, secret = zmq.auth.load_certificate(secret_key)
    if secret is None:
        raise ValueError(f"{secret_key} holds no secret key; pass the .key_secret file")
    server, _ = zmq.auth.load_certificate(server_key)
    return {"public": public, "secret": secret, "server": server}


def connect(sock: zmq.Socket, endpoint: str) -> None:
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot connect to {endpoint}: {exc}; give ipc:///path/to/pool.sock or "
                         "tcp://host:port (the one `isopool serve` printed)") from None


HEARTBEAT_MS = 1000  # a ZMTP ping each second on a quiet connection...
HEARTBEAT_TIMEOUT_MS = 3000  # ...and one unanswered this long drops it: a cut link is noticed, not waited out
CONNECT_TIMEOUT_MS = 2000  # a TCP connect unanswered this long is tried again (not left to SYN backoff,
                           # which would keep a mended link unused for up to a minute)


ROUTING_ID_BYTES = 16


def routing_id() -> bytes:
    """A connection's name at the supervisor, which routes its answers by it: 16 random bytes
    (the first never 0, which libzmq keeps for the names it makes up). ZeroMQ would otherwise
    name each connection by a counter, so that another client could tell the next name, or a
    departed one's, connect under it and be sent that client's answers."""
    return bytes([os.urandom(1)[0] | 1]) + os.urandom(ROUTING_ID_BYTES - 1)


def configure_socket(sock: zmq.Socket, curve: dict | None) -> None:
    """Options every client socket gets: a random routing id, never block, never linger,
    heartbeats (so a host that vanishes from the network is a lost connection within seconds,
    on both sides: the supervisor drops a connection silent for HEARTBEAT_TIMEOUT_MS), CURVE
    when given keys."""
    sock.setsockopt(zmq.ROUTING_ID, routing_id())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    # the supervisor's end drops the connection after this long without a word: a client that
    # comes back under its name is not kept waiting for a dead connection's end to time out
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    if curve:
        sock.curve_secretkey = curve["secret"]
        sock.curve_publickey = curve["public"]
        sock.curve_serverkey = curve["server"]


def closed_early() -> Unavailable:
    return Unavailable("the client was closed before the reply arrived")


def lost(endpoint: str) -> Unavailable:
    return Unavailable(f"lost the connection to the supervisor at {endpoint}; in-flight requests were not "
                       "answered. Is `isopool serve` running?", endpoint=endpoint)


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def watch_disconnects(sock: zmq.Socket) -> zmq.Socket:
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)


def close_watched(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """Close a socket and the monitor that watch_disconnects gave it (None: it has none yet)."""
    if monitor is not None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
    sock.close()  # with its LINGER: 0, unless a CANCEL must still get out (direct.py)


def monitor_error(session: "Session", event: dict, endpoint: str) -> IsopoolError | None:
    """What a monitor event means for the connection's calls: lost (it dropped, or a handshake
    broke off: both may pass), a refusal (the server's authenticator refused our key; kept on
    the session, every later call gets it until a handshake succeeds) or nothing."""
    if event["event"] == zmq.EVENT_DISCONNECTED:
        return lost(endpoint)
    if event["event"] & zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        session.refused = refusal(endpoint)
        return session.refused
    if event["event"] & HANDSHAKE_FAILED:
        return Unavailable(f"the security handshake with {endpoint} broke off: the server may require CURVE "
                           "keys this client does not have (curve_secret_key, curve_server_key), or something "
                           "other than an isopool supervisor answered there", endpoint=endpoint)
    return None


def on_monitor_event(session: "Session", event: dict, endpoint: str) -> None:
    """Track the connection; fail what is pending when it drops or the server refuses us."""
    if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        session.refused = None  # a key refused before may be let in now
        session.up.set()
        return
    err = monitor_error(session, event, endpoint)
    if err is not None:
        session.up.clear()
        session.fail_all(err)


def not_running(endpoint: str) -> Unavailable:
    """The error of a call that found no supervisor at its endpoint, with the likely causes."""
    path = ipc_path(endpoint)
    if path is not None and closed_path(path).exists():
        return Unavailable(f"the isopool supervisor at {endpoint} takes no new connections: its open-files limit "
                           "is nearly reached (see `isopool status`: health_reason). It takes them again once "
                           "connections close; raise its limit (LimitNOFILE=, ulimit -n) or use fewer connections",
                           endpoint=endpoint)
    if endpoint == default_endpoint() and not os.environ.get(ENV_ENDPOINT):
        where = (f"Either it is not running (start it with `isopool serve`), or it runs with another runtime "
                 f"directory: this client looked in {runtime_dir()} (XDG_RUNTIME_DIR="
                 f"{os.environ.get('XDG_RUNTIME_DIR') or 'unset'}). Give the endpoint `isopool serve` printed "
                 f"(--endpoint, or ${ENV_ENDPOINT}).")
    else:
        where = ("Either it is not running (start it with `isopool serve --endpoint " + endpoint + "`), or it "
                 "serves another endpoint: check the one `isopool serve` printed.")
    return Unavailable(f"no isopool supervisor answered at {endpoint} within {CONNECT_S:g}s. {where}",
                       endpoint=endpoint)


def refusal(endpoint: str) -> NotAllowed:
    return NotAllowed(
        f"the supervisor at {endpoint} refused the connection's security handshake: it requires CURVE "
        "and this client's key is missing or not authorised (set curve_secret_key/curve_server_key, "
        "or $ISOPOOL_CURVE_SECRET_KEY and $ISOPOOL_CURVE_SERVER_KEY)", endpoint=endpoint)
