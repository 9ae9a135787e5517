"""--devices parsing and placement. CUDA placement itself needs a GPU; the suite never does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from isopool.supervisor.devices import parse_devices
from tests.helpers import ROOT


def no_gpu() -> int:
    return 0


def two_gpus() -> int:
    return 2


def test_parse_without_a_gpu():
    assert parse_devices("cpu", no_gpu) == ["cpu"]
    assert parse_devices("auto", no_gpu) == ["cpu"]
    assert parse_devices("cpu,cpu", no_gpu) == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        parse_devices("cuda", no_gpu)
    with pytest.raises(ValueError, match="cuda:1 does not exist"):
        parse_devices("cuda:1", no_gpu)
    with pytest.raises(ValueError, match="not a device"):
        parse_devices("gpu0", no_gpu)


def test_parse_with_gpus():
    assert parse_devices("auto", two_gpus) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda", two_gpus) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1, cuda:0", two_gpus) == ["cuda:1", "cuda:0"]
    with pytest.raises(ValueError, match="cuda:2 does not exist; 2 CUDA"):
        parse_devices("cuda:2", two_gpus)


NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # any host, with or without GPUs, as one without


def test_workers_see_their_device_in_context_and_status(start_pool):
    pool = start_pool("--workers", "2", "--devices", "auto", "--model", "isopool.examples.faulty:WhereAmI", env=NO_GPU)
    with pool.client() as c:
        # two at once: the second goes to the worker the first left free (least loaded)
        replies = [f.result(30) for f in [c.submit(1.0) for _ in range(2)]]
    assert {r["device"] for r in replies} == {"cpu"}  # no GPU visible: auto means CPU
    assert {r["worker"] for r in replies} == {0, 1}
    assert [w["device"] for w in pool.workers()] == ["cpu", "cpu"]


def test_cuda_on_a_machine_without_one_is_refused_clearly():
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--devices", "cuda", "--print-config"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, **NO_GPU})
    assert out.returncode == 2 and "no CUDA device is visible" in out.stderr


def test_preload_model_is_refused_with_gpus_in_the_spec():
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--devices", "auto", "--preload", "model",
                          "--print-config"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "CUDA cannot survive fork" in out.stderr
