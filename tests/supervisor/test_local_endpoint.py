"""The default ipc endpoint lives in a private runtime directory; a loose or foreign one is refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from isopool.protocol.endpoints import ensure_private_dir
from tests.helpers import ROOT


def serve_default(runtime_parent) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_parent)}
    env.pop("ISOPOOL_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--workers", "1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_runtime_dir_is_created_private(short_tmp):
    path = ensure_private_dir(short_tmp / "isopool")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_loose_runtime_dir_is_refused(short_tmp):
    (short_tmp / "isopool").mkdir(mode=0o755)
    os.chmod(short_tmp / "isopool", 0o755)
    out = serve_default(short_tmp)
    assert out.returncode == 1 and "has mode 755" in out.stderr and "chmod 700" in out.stderr


def test_foreign_runtime_dir_is_refused(short_tmp):
    if os.geteuid() == 0:  # root can hand a directory to another user; serve must refuse it
        (short_tmp / "isopool").mkdir(mode=0o700)
        os.chown(short_tmp / "isopool", 4242, -1)
        out = serve_default(short_tmp)
        assert out.returncode == 1 and "belongs to uid 4242" in out.stderr
    else:  # anyone else can point the check at a directory root owns
        with pytest.raises(PermissionError, match="belongs to uid 0"):
            ensure_private_dir(Path("/"))


def test_symlinked_runtime_dir_is_refused(short_tmp):
    (short_tmp / "elsewhere").mkdir(mode=0o700)
    (short_tmp / "isopool").symlink_to(short_tmp / "elsewhere")
    out = serve_default(short_tmp)
    assert out.returncode == 1 and "not a directory" in out.stderr


def test_an_endpoint_path_that_is_not_a_socket_is_refused_never_deleted(short_tmp):
    import subprocess
    import sys

    precious = short_tmp / "notes.txt"
    precious.write_text("keep me")
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--endpoint", f"ipc://{precious}"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and "is not a socket" in out.stderr
    assert precious.read_text() == "keep me"
