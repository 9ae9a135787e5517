"""Where the sockets live: a per-user runtime directory created 0700, refused if anyone else can enter."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

ENV_ENDPOINT = "ISOPOOL_ENDPOINT"


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "isopool"
    return Path(tempfile.gettempdir()) / f"isopool-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` 0700, or check that an existing one is ours and closed to others."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} exists and is not a directory (a symlink?); remove it or pick another "
                              f"endpoint with --endpoint or ${ENV_ENDPOINT}")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                              "another user could read your requests. Remove it or pick another endpoint")
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; other users could reach its "
                              f"sockets. Run `chmod 700 {path}` or remove it")
    return path


def default_endpoint() -> str:
    return os.environ.get(ENV_ENDPOINT) or f"ipc://{runtime_dir() / 'isopool.sock'}"


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def closed_path(path: Path) -> Path:
    """Where a supervisor keeps the socket at `path` while its descriptors run low and it takes no
    new connections (supervisor/connections.py): the same socket, renamed, so a connect() finds no
    file and retries, and a client can tell a full daemon from a missing one."""
    return path.with_name(f".{path.name}.full")


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")
