"""CURVE authentication: a ZAP handler (ZeroMQ RFC 27) answered by the supervisor's own loop.

pyzmq's Authenticator serves ZAP from a thread or an asyncio loop; the supervisor owns one
thread and one poll loop, so it answers the (rare) ZAP requests itself and uses pyzmq only
for what it does well: certificate files and z85. A connection is let in only with a CURVE
key from the clients or admins directory; its messages then carry a User-Id saying which,
and control ops (scale, reload, load, unload, stop) need an admin key.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"isopool"
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
    def __init__(self, ctx: zmq.Context, secret_key_file: str, clients_dir: str | None, admins_dir: str | None):
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
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.denied = 0

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server whose peers must pass this handler."""
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = ZAP_DOMAIN

    def handle(self) -> None:
        """Answer one ZAP request: [version, id, domain, address, identity, mechanism, *credentials]."""
        msg = self.zap.recv_multipart()
        if len(msg) < 6:
            self.zap.send_multipart([b"1.0", msg[1] if len(msg) > 1 else b"", b"400", b"bad ZAP request", b"", b""])
            return
        version, request_id, _domain, _address, _identity, mechanism = msg[:6]
        key = zmq.utils.z85.encode(msg[6]) if mechanism == b"CURVE" and len(msg) > 6 else None
        if key is not None and key in self.clients:
            role = ADMIN if key in self.admins else CLIENT
            reply = [b"200", b"OK", f"{role}:{key.decode()}".encode()]
        else:
            self.denied += 1
            reply = [b"400", b"unknown key" if key is not None else b"CURVE required", b""]
        self.zap.send_multipart([version, request_id, *reply, b""])

    def close(self) -> None:
        self.zap.close(linger=0)


def is_admin(frame: zmq.Frame) -> bool:
    try:
        return frame.get("User-Id").startswith(ADMIN + ":")
    except zmq.ZMQError:  # no User-Id: not a CURVE connection
        return False
