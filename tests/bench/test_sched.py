"""bench/sched.py's reading of a scheduler trace (the trace itself needs root and tracefs;
its reading does not): idle time, idle periods, and who stood runnable on another CPU."""

from __future__ import annotations

import pytest

from isopool.bench.sched import analyse

# tracefs lines as the kernel writes them: CPU 1 goes idle at 0.000100 while the supervisor
# (pid 11) runs on CPU 0 and the client (pid 22), preempted there at 0.000050, waits behind
# it; CPU 1 picks up a worker (pid 33) woken onto it at 0.000400; the client runs at 0.000500.
TRACE = """\
# tracer: nop
  python-22 [000] d..2. 100.000050: sched_switch: prev_comm=python prev_pid=22 prev_prio=120 prev_state=R ==> next_comm=python next_pid=11 next_prio=120
  python-33 [001] d..2. 100.000100: sched_switch: prev_comm=python prev_pid=33 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
  python-11 [000] d..3. 100.000390: sched_wakeup: comm=python pid=33 prio=120 target_cpu=001
  <idle>-0 [001] d..2. 100.000400: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python next_pid=33 next_prio=120
  python-11 [000] d..2. 100.000500: sched_switch: prev_comm=python prev_pid=11 prev_prio=120 prev_state=S ==> next_comm=python next_pid=22 next_prio=120
"""


def test_idle_time_and_who_waited_elsewhere_meanwhile_are_read_from_the_trace():
    report = analyse(TRACE, {"11": "supervisor:python", "22": "client:python", "33": "worker 3:python"}, cpus=2)
    assert report["seconds"] == pytest.approx(0.000450)
    assert report["idle_share"][1] == pytest.approx(0.000300 / 0.000450)  # 100 -> 400 µs
    assert report["idle_share"].get(0, 0.0) == 0.0
    assert report["idle_with_others_waiting"] == pytest.approx(1.0)  # the client waited on CPU 0 throughout
    assert report["who_waits_ms"] == {"client:python": pytest.approx(0.3, abs=0.05)}
