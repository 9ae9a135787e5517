"""A client-only install: `pip install isopool` into a fresh venv, no torch, no psutil, no
prometheus-client, and from it a running pool is called (the library and the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import ROOT

PIP_S = 500


@pytest.mark.timeout(PIP_S + 100)
def test_a_client_only_install_calls_a_running_pool(start_pool, tmp_path):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "isopool"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    src = tmp_path / "src"  # the wheel is built from a copy: the checkout stays as it is
    src.mkdir()
    dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    subprocess.run(["cp", "-r", *[str(ROOT / p) for p in ("pyproject.toml", "README.md", *sorted(dirs))], str(src)],
                   check=True, timeout=60)
    installed = subprocess.run([str(py), "-m", "pip", "install", "-v", "--disable-pip-version-check", str(src)],
                               capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=PIP_S)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "DeprecationWarning" not in installed.stdout + installed.stderr  # setuptools says nothing to fix

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                              timeout=120, stdin=subprocess.DEVNULL)

    missing = run(str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'psutil', "
                                 "'prometheus_client') if u.find_spec(m)])")
    assert missing.stdout.strip() == "[]", missing.stdout + missing.stderr
    called = run(str(py), "-c", "import sys, numpy as np; from isopool import Client, AsyncClient\n"
                                f"with Client({pool.endpoint!r}) as c:\n"
                                "    assert c.infer({'a': [1, 2]})['echo'] == {'a': [1, 2]}\n"
                                "    y = c.infer({'do': 'tensor', 'n': 4})  # a torch answer, and no torch here\n"
                                "    assert type(y) is np.ndarray and y.tolist() == [0.0, 1.0, 2.0, 3.0]\n"
                                "    print('ok', 'torch' in sys.modules)")
    assert called.stdout.strip() == "ok False", called.stdout + called.stderr
    status = run(str(cli), "status", "--endpoint", pool.endpoint, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["pool"]["workers_ready"] == 1, status.stderr
    inferred = run(str(cli), "infer", "--endpoint", pool.endpoint, '{"b": 1}')
    assert inferred.returncode == 0 and json.loads(inferred.stdout)["echo"] == {"b": 1}, inferred.stderr
    serve = run(str(cli), "serve", "--endpoint", f"ipc://{tmp_path}/x.sock")
    assert serve.returncode == 2 and "isopool[server]" in serve.stderr and "Traceback" not in serve.stderr
