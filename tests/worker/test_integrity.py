"""A model that writes to its own weights is detected, recycled and reported; answers stay right."""

from __future__ import annotations

import numpy as np

from isopool.examples.faulty import SelfModifying


def test_self_modifying_model_is_detected_and_recycled(start_pool):
    pool = start_pool("--workers", "2", "--model", "isopool.examples.faulty:SelfModifying",
                      "--integrity-every-request")
    expected = SelfModifying()([1.0, 2.0, 3.0, 4.0])
    with pool.client() as c:
        assert c.infer("corrupt") == "done"  # succeeded: it is not failed afterwards
        event = pool.wait_event("integrity")
        pool.wait_event("recycled", worker=event["worker"], stopped_for="integrity")
        for _ in range(20):  # every later answer comes from intact weights
            np.testing.assert_allclose(c.infer([1.0, 2.0, 3.0, 4.0]), expected, rtol=1e-6)
    status = pool.all_ready()
    assert event["expected"] != event["actual"] and event["when"] == "after request"
    assert status["pool"]["restarts_by_reason"]["integrity"] == 1
    assert status["pool"]["outcomes"] == {"ok": 21}


def test_scheduled_check_catches_it_too(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:SelfModifying",
                      "--integrity-interval", "0.2", "--heartbeat-interval", "0.1")
    with pool.client() as c:
        c.infer("corrupt")
        event = pool.wait_event("integrity")
        assert event["when"] == "scheduled"
        replacement = pool.wait_event("ready")  # a recycled worker's replacement: a new slot, the same id
        assert replacement["slot"] != event["slot"] and replacement["worker"] == event["worker"]
        assert replacement["generation"] > event["generation"]
        np.testing.assert_allclose(c.infer([1.0, 0.0, 0.0, 0.0]), SelfModifying()([1.0, 0.0, 0.0, 0.0]), rtol=1e-6)
