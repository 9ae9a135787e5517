"""bench/concurrency.py runs isopool and ProcessPoolExecutor at each level it is given and
reports every one (its figures are for reading, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_each_mechanism_is_measured_at_each_level():
    run = subprocess.run([sys.executable, "-m", "isopool.bench.concurrency", "--in-flight", "1,4", "--rounds", "1",
                          "--requests", "400"], capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report) == {"isopool", "ppe"}
    for levels in report.values():
        assert set(levels) == {"1", "4"}
        assert all(level["requests_per_s"] > 0 and level["p50_us"] > 0 for level in levels.values())
