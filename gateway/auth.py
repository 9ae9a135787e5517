"""Bearer tokens for the HTTP front, in two roles that mirror CURVE's: client and admin.

The token file (--http-tokens) holds one token per line, with its role first:

    # who: what for
    client 7Qm3...   any route but the admin ones
    admin  k9Zp...   also the model repository's load and unload

No other user may read it, and only its owner may write it (0600, or 0440 for a group the
daemon runs in, as a Kubernetes Secret mounted with fsGroup gives it). A
gateway reads it at start and again when it changes (checked at most once a second), so
a token is added or revoked without a restart. Tokens are kept as SHA-256 digests and
compared in constant time. The health routes (/v2/health/live, /v2/health/ready) need
no token: they are what a load balancer or a kubelet probes, and they say nothing of
the models.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import time

ROLES = ("client", "admin")
OPEN_ROUTES = {("GET", "/v2/health/live"), ("GET", "/v2/health/ready")}
RECHECK_S = 1.0


class TokenFileError(ValueError):
    pass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_tokens(path: str) -> dict[bytes, str]:
    """{sha256 of a token: its role} from a token file; TokenFileError saying what is wrong."""
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc}") from None
    if info.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise TokenFileError(f"the token file {path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}: "
                             f"readable by all, or writable by its group); chmod 600 {path}")
    tokens = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in ROLES:
            raise TokenFileError(f"{path}:{number}: expected 'client TOKEN' or 'admin TOKEN', got {len(words)} "
                                 f"word(s) starting {words[0][:20]!r}")
        if len(words[1]) < 16:
            raise TokenFileError(f"{path}:{number}: a token must be at least 16 characters; "
                                 "`isopool keygen NAME --http-tokens FILE` makes one")
        tokens[_digest(words[1])] = words[0]
    if not tokens:
        raise TokenFileError(f"the token file {path} holds no tokens; add a line 'client TOKEN'")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The roles of the tokens in one file, kept up to date with it."""

    def __init__(self, path: str):
        self.path = path
        self.tokens = read_tokens(path)
        self.mtime = os.stat(path).st_mtime_ns
        self.checked = time.monotonic()

    def role(self, authorization: bytes | None) -> str | None:
        """The role the Authorization header's bearer token has; None for no or an unknown token."""
        self._refresh()
        if not authorization:
            return None
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = _digest(token.strip())
        found = None
        for known, role in self.tokens.items():  # every entry compared, in constant time each
            if hmac.compare_digest(known, digest):
                found = role
        return found

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self.checked < RECHECK_S:
            return
        self.checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime != self.mtime:
                self.tokens, self.mtime = read_tokens(self.path), mtime
        except (OSError, TokenFileError):
            pass  # a file being rewritten, or broken: keep the tokens it last held
