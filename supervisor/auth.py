"""Who may connect: one ZAP handler (ZeroMQ RFC 27) answered by the supervisor's own loop.

pyzmq's Authenticator serves ZAP from a thread or an asyncio loop; the supervisor owns one
thread and one poll loop, so it answers the (rare) ZAP requests itself and uses pyzmq only
for what it does well: certificate files and z85. Two domains:

    isopool          the frontend, with --curve-secret-key: a connection is let in only with
                     a CURVE key from the clients or admins directory; its messages then carry
                     a User-Id saying which, and control ops (scale, reload, load, unload, stop)
                     need an admin key
    isopool-local    an ipc:// frontend without CURVE: everyone who may open the socket is let
                     in (its 0600 file is the guard), and its messages carry a User-Id of
                     "pid:PID", the process the kernel says connected: a request that names
                     shared memory must come from the process that holds it (protocol/shm.py)
    isopool-backend  the backend, always: a connection is let in only from the process of a
                     live worker, and only once. The kernel says which process connected (a
                     unix socket's SO_PEERCRED, which ZeroMQ puts in the request's address as
                     HOST:UID:GID:PID), so no process can pass for another; a second connection
                     from a worker (an impostor inside a compromised model) is refused, counted
                     and reported (the "intruder" event)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import zmq
import zmq.auth

from isopool.logs import worth_a_line
from isopool.protocol import BadRequest, ops

log = logging.getLogger("isopool.supervisor")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"isopool"
BACKEND_DOMAIN = b"isopool-backend"
LOCAL_DOMAIN = b"isopool-local"
ADMIN, CLIENT = "admin", "client"


class AuthError(ValueError):
    pass


def load_keys(directory: str | None) -> set[bytes]:
    """Public keys (z85) of every *.key certificate in a directory."""
    if not directory:
        return set()
    if not Path(directory).is_dir():
        raise AuthError(f"{directory} is not a directory of public keys (*.key files from `isopool keygen`)")
    return set(zmq.auth.load_certificates(directory))


class CurveAuth:
    def __init__(self, secret_key_file: str, clients_dir: str | None, admins_dir: str | None):
        try:
            self.public, self.secret = zmq.auth.load_certificate(secret_key_file)
        except (OSError, ValueError) as exc:
            raise AuthError(f"cannot read the server key {secret_key_file}: {exc}") from None
        if self.secret is None:
            raise AuthError(f"{secret_key_file} holds no secret key; pass the .key_secret file from `isopool keygen`")
        self.admins = load_keys(admins_dir)
        self.clients = load_keys(clients_dir) | self.admins
        if not self.clients:
            raise AuthError("no client keys: give --curve-clients and/or --curve-admins directories of *.key files")
        self.denied = 0

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server whose peers must pass this handler."""
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = ZAP_DOMAIN

    def check(self, mechanism: bytes, credentials: list[bytes]) -> list[bytes]:
        """A ZAP reply's status, text and user id for a frontend connection."""
        key = zmq.utils.z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials else None
        if key is not None and key in self.clients:
            role = ADMIN if key in self.admins else CLIENT
            return [b"200", b"OK", f"{role}:{key.decode()}".encode()]
        self.denied += 1
        return [b"400", b"unknown key" if key is not None else b"CURVE required", b""]


class Zap:
    """The context's one ZAP handler: the frontend's keys (`curve`) and the backend's workers
    (`admit`: the pid of the connecting process -> None to let it in, or why not)."""

    def __init__(self, ctx: zmq.Context, curve: CurveAuth | None):
        self.curve = curve
        self.admit: Callable[[int], str | None] = lambda pid: "no workers yet"
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.refused = 0  # backend connections refused

    def guard_backend(self, sock: zmq.Socket) -> None:
        sock.zap_domain = BACKEND_DOMAIN

    def guard_local(self, sock: zmq.Socket) -> None:
        sock.zap_domain = LOCAL_DOMAIN

    def handle(self, events) -> None:
        """Answer one ZAP request: [version, id, domain, address, identity, mechanism, *credentials];
        a refused backend connection is logged and told to `events` (an EventLog) as "intruder"."""
        msg = self.sock.recv_multipart()
        if len(msg) < 6:
            self.sock.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"bad ZAP request", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = msg[:6]
        if domain == BACKEND_DOMAIN:
            uid, pid = peer_credentials(address)
            why = self.admit(pid) if pid is not None else "no peer credentials on the connection"
            reply = [b"200", b"OK", b"worker"] if why is None else [b"400", why.encode(), b""]
            if why is not None:
                self.refused += 1
                self.report(events, {"pid": pid, "uid": uid, "why": why, "refused": self.refused})
        elif domain == LOCAL_DOMAIN:
            _, pid = peer_credentials(address)
            reply = [b"200", b"OK", f"pid:{pid}".encode() if pid is not None else b""]
        elif domain == ZAP_DOMAIN and self.curve is not None:
            reply = self.curve.check(mechanism, msg[6:])
        else:
            reply = [b"400", b"unknown domain", b""]
        self.sock.send_multipart([version, request_id, *reply, b""])

    def report(self, events, fields: dict) -> None:
        if worth_a_line(self.refused):
            events.emit("intruder", fields)
            log.warning("refused a backend connection from process %s (uid %s): %s (%d refused so far). A "
                        "compromised model may be trying to pass for a worker", fields["pid"], fields["uid"],
                        fields["why"], self.refused)

    def close(self) -> None:
        self.sock.close(linger=0)


def peer_credentials(address: bytes) -> tuple[int | None, int | None]:
    """(uid, pid) of the process at the other end of a unix socket, from a ZAP address
    (HOST:UID:GID:PID); (None, None) if it has none."""
    parts = address.decode(errors="replace").rsplit(":", 3)
    try:
        return int(parts[1]), int(parts[3])
    except (IndexError, ValueError):
        return None, None


def peer_pid(frame: zmq.Frame) -> int | None:
    """The process that sent `frame`, as the kernel told ZAP (an ipc:// frontend without CURVE)."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return int(user[4:]) if user.startswith("pid:") and user[4:].isdigit() else None


def mark_peer(header: dict, frame: zmq.Frame) -> None:
    """Whose memory, in the kernel's word, not the client's: a hello learns the pid we see its
    client as (header "peer"); an infer naming shared memory is refused unless that memory's
    pid is its connection's own process (only an infer's shm is checked by its schema, and used)."""
    op = header["op"]
    if op == ops.HELLO:
        header["peer"] = peer_pid(frame)
    elif op == ops.INFER and header.get("shm") is not None and header["shm"][0] != (pid := peer_pid(frame)):
        raise BadRequest(f"this request names the shared memory of process {header['shm'][0]}, but its connection "
                         f"is from {'process ' + str(pid) if pid else 'an unknown process (tcp://, or CURVE)'}: only "
                         "a client's own memory, over ipc:// on this host; else send arrays as frames "
                         "(Client(shm=False))", setting="shm")


def is_admin(frame: zmq.Frame) -> bool:
    try:
        return frame.get("User-Id").startswith(ADMIN + ":")
    except zmq.ZMQError:  # no User-Id: not a CURVE connection
        return False
