"""`isopool bench --quick`: every mechanism answers correctly on the tiny model (the real
model through isopool is tests/examples/test_embeddings.py's; through the executors it is
the full bench's, which loads it in 16 processes). It asserts correctness, never speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, need


# a whole bench run (~25 s alone): beyond the suite's 120 s default under load, still bounded
@pytest.mark.timeout(330)
def test_bench_quick_checks_every_mechanism(short_tmp):
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "bench", "--quick", "--no-embeddings", "--out",
                          str(short_tmp)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    written = json.loads((short_tmp / "results.json").read_text())
    results = written["results"]
    assert written["quick"] is True and written["date"] and "CPUs" in written["machine"]
    assert {"inproc", "isopool", "isopool_async", "ppe", "mp_pool", "loky", "pebble"} <= set(results)
    assert all(r["correct"] for r in results.values())  # tiny model and the 16 MiB echo
    report = (short_tmp / "results.md").read_text()
    assert report.startswith("isopool bench — QUICK run") and "| mechanism |" in report
    assert all(r["req_per_s_min"] <= r["req_per_s"] <= r["req_per_s_max"] for r in results.values())
    # isopool's 16 MiB figure is bracketed by ceiling figures in its round: a ratio, in the table too
    for name in ("isopool", "isopool_async"):
        bracketed = results[name]["mib_per_s_x_ceiling"]
        assert 0 < bracketed and f"{bracketed:.2f}× (" in report
    assert "mib_per_s_x_ceiling" not in results["ppe"]
    assert (short_tmp / "results.png").stat().st_size > 10_000


@pytest.mark.timeout(330)
def test_bench_http_quick_checks_answers_and_loses_nothing_on_a_kill(short_tmp):
    need("wrk")
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "bench", "--http", "--quick", "--no-embeddings",
                          "--peer", "litserve", "--out", str(short_tmp)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tiny = json.loads((short_tmp / "http.json").read_text())["tiny"]  # every answer was checked before timing
    assert set(tiny) == {"isopool native Client", "isopool HTTP, JSON", "isopool HTTP, binary",
                         "isopool HTTP, 16 MiB binary", "LitServe"}
    assert tiny["isopool HTTP, 16 MiB binary"]["requests"] > 0 and tiny["isopool HTTP, JSON"]["gateway_us"] > 0
    kill = tiny["isopool HTTP, JSON"]["kill"]
    assert kill["failed"] == 0 and kill["requests"] > 0  # a worker SIGKILLed under HTTP load: nothing lost
    assert "| isopool HTTP, binary |" in (short_tmp / "http.md").read_text()
