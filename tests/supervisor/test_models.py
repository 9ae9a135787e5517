"""Several models in one daemon: routed by name, each its own pool, managed at runtime."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from isopool.errors import BadRequest, Overloaded, UnknownModel, WorkerCrashed
from isopool.models.default import DefaultModel
from tests.helpers import ROOT, Background, assert_replaced

FAULTY = "isopool.examples.faulty:Faulty"
ECHO = "isopool.examples.faulty:make_echo"
WHERE = "isopool.examples.faulty:WhereAmI"


def test_two_models_on_one_client_every_reply_from_the_right_model(start_pool):
    pool = start_pool("--model", "isopool.models.default:DefaultModel", "--model", f"echo={ECHO}", "--workers", "1")
    assert all(m["workers_ready"] == 1 for m in pool.status()["models"].values())  # READY=1 waits for every model
    model = DefaultModel()
    wrong: list[str] = []
    done = [0] * 16
    with pool.client() as c:
        def lane(t: int) -> None:
            rng = np.random.default_rng(t)
            for i in range(200):
                if i % 2:
                    reply = c.infer({"t": t, "i": i}, model="echo")
                    if reply != {"t": t, "i": i}:
                        wrong.append(f"echo {t}:{i} got {reply!r}")
                else:
                    x = rng.standard_normal(16).astype(np.float32)
                    if not np.allclose(c.infer(x, model="default"), model(x), rtol=1e-5):
                        wrong.append(f"default {t}:{i}")
                done[t] += 1

        lanes = [threading.Thread(target=lane, args=(t,)) for t in range(16)]
        for th in lanes:
            th.start()
        for th in lanes:
            th.join(120)
    assert wrong == [] and done == [200] * 16
    status = pool.status()
    assert set(status["models"]) == {"default", "echo"}
    assert status["models"]["echo"]["requests_total"] == 1600 and status["models"]["default"]["requests_total"] == 1600
    assert {w["model"] for w in status["workers"]} == {"default", "echo"}


def test_with_several_models_a_request_must_name_one_and_an_unknown_name_lists_them(start_pool):
    pool = start_pool("--model", f"a={ECHO}", "--model", f"b={ECHO}", "--workers", "1")
    with pool.client() as c:
        with pytest.raises(BadRequest, match=r"serves 2 models \(a, b\); name one") as info:
            c.infer(1)
        assert info.value.details["field"] == "model"
        with pytest.raises(UnknownModel, match="no model named 'c'.*a, b") as unknown:
            c.infer(1, model="c")
        assert unknown.value.details["models"] == ["a", "b"]
        assert c.infer(2, model="b") == 2
    with pool.client(model="a") as named:  # a client's default model
        assert named.infer(3) == 3
    out = subprocess.run([sys.executable, "-m", "isopool.cli", "infer", "--endpoint", pool.endpoint, "--model", "a",
                          "[1]"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == [1]


def test_a_flooded_model_refuses_while_the_other_serves(start_pool, short_tmp):
    cfg = short_tmp / "two.toml"
    cfg.write_text(f'workers = 1\n[models.slow]\nmodel = "{FAULTY}"\nmax-queue = 4\n'
                   f'[models.fast]\nmodel = "{FAULTY}"\n')
    pool = start_pool("--config", str(cfg))
    with pool.client() as c:
        flood = [c.submit({"do": "sleep", "s": 0.2}, model="slow", timeout=60) for _ in range(40)]
        fast = [c.infer({"do": "ok", "i": i}, model="fast")["echo"]["i"] for i in range(100)]
        outcomes = []
        for f in flood:
            try:
                f.result(timeout=60)
                outcomes.append("ok")
            except Overloaded:
                outcomes.append("overloaded")
    assert fast == list(range(100))
    assert outcomes.count("overloaded") > 0 and outcomes.count("ok") > 0
    models = pool.status()["models"]
    assert models["fast"]["outcomes"].get("overloaded", 0) == 0 and models["slow"]["outcomes"]["overloaded"] > 0


def test_a_model_that_always_crashes_degrades_only_itself(start_pool):
    pool = start_pool("--model", f"bad={FAULTY}", "--model", f"good={FAULTY}", "--workers", "1",
                      "--max-restarts", "2", "--backoff-base", "0.01")
    with pool.client() as c:
        for i in range(4):  # each input different: crashes, not one poisoned input
            with pytest.raises(WorkerCrashed):
                c.infer({"do": "exit", "i": i}, model="bad", retry=False)
            assert c.infer({"do": "ok"}, model="good")["echo"] == {"do": "ok"}
    status = pool.wait_until(lambda s: not s["models"]["bad"]["healthy"], "degraded")
    assert status["models"]["good"]["healthy"] and not status["pool"]["healthy"]
    health = [subprocess.run([sys.executable, "-m", "isopool.cli", "health", "--endpoint", pool.endpoint, "--model", m],
                             capture_output=True, text=True, cwd=ROOT, timeout=60) for m in ("good", "bad")]
    assert health[0].returncode == 0 and health[1].returncode == 1
    assert_replaced(status, {}, model="good")


def test_load_scale_reload_unload_under_load_fail_nothing(start_pool):
    pool = start_pool("--model", f"steady={FAULTY}", "--workers", "1")
    with pool.client() as c, pool.client() as bg_client, Background(bg_client, model="steady") as steady:
        assert c.load("extra", FAULTY, workers=1)["loading"] is True
        assert c.infer({"do": "ok"}, model="extra", timeout=60)["echo"] == {"do": "ok"}  # queued until ready
        pool.wait_until(lambda s: s["models"].get("extra", {}).get("workers_ready") == 1, "ready")
        assert c.scale(2, model="extra")["workers_target"] == 2
        pool.wait_until(lambda s: s["models"]["extra"]["workers_ready"] == 2, "ready", timeout=60)
        with pool.client() as own, Background(own, model="extra") as own_load:  # reload of the loaded model, under its load
            before = {w["pid"] for w in pool.status()["workers"] if w["model"] == "extra"}
            assert c.reload(model="extra")["reloading"] == 2
            pool.wait_until(lambda s: not before & {w["pid"] for w in s["workers"]}
                            and s["models"]["extra"]["workers_ready"] == 2, "recycled", timeout=60)
        assert own_load.failed == [] and own_load.ok > 0
        assert c.unload("extra")["unloading"] is True
        pool.wait_event("unloaded", model="extra", timeout=60)
        with pytest.raises(UnknownModel):
            c.infer(1, model="extra")
    assert steady.failed == [] and steady.ok > 0
    assert set(pool.status()["models"]) == {"steady"}


def test_loading_a_model_that_fails_leaves_the_others_alone(start_pool):
    pool = start_pool("--model", f"steady={FAULTY}", "--workers", "1")
    with pool.client() as c:
        c.load("broken", "isopool.examples.faulty:no_such_attribute")
        failed = pool.wait_event("load_failed", model="broken", timeout=60)
        assert "no_such_attribute" in failed["error"]
        assert c.infer({"do": "ok"}, model="steady")["echo"] == {"do": "ok"}
    assert set(pool.status()["models"]) == {"steady"} and pool.status()["pool"]["healthy"]


def test_two_models_in_toml_with_their_own_settings_round_trip(start_pool, short_tmp):
    cfg = short_tmp / "models.toml"
    cfg.write_text(f'workers = 1\n[models.where]\nmodel = "{WHERE}"\nworkers = 2\nmax-batch-size = 4\n'
                   f'[models.where.config]\nshard = "a"\n[models.echo]\nmodel = "{ECHO}"\nmax-queue = 16\n')
    printed = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--config", str(cfg), "--workers", "echo=3",
                              "--print-config"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert printed.returncode == 0, printed.stderr
    again = short_tmp / "again.toml"
    again.write_text(printed.stdout)
    reread = subprocess.run([sys.executable, "-m", "isopool.cli", "serve", "--config", str(again), "--print-config"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert reread.stdout == printed.stdout
    pool = start_pool("--config", str(again))
    models = pool.status()["models"]
    assert (models["where"]["workers_target"], models["echo"]["workers_target"]) == (2, 3)
    assert models["echo"]["max_queue"] == 16
    with pool.client() as c:
        assert c.infer("?", model="where")["config"] == {"shard": "a"}


def test_loading_a_new_implementation_under_a_served_name_rolls_it_over(start_pool):
    """Requests in flight finish on the old workers, new ones go to the new implementation."""
    pool = start_pool("--model", f"m={FAULTY}", "--model", f"other={FAULTY}", "--workers", "1")
    with pool.client() as c, pool.client() as bg_client, Background(bg_client, model="other") as other:
        slow = c.submit({"do": "sleep", "s": 0.5}, model="m")
        pool.running(lambda w: w["model"] == "m")  # in flight on the old implementation
        assert c.load("m", WHERE)["replacing"] == 1
        assert slow.result(timeout=60)["echo"] == {"do": "sleep", "s": 0.5}
        pool.wait_until(lambda s: s["models"]["m"]["model"] == WHERE and s["models"]["m"]["workers_ready"] == 1
                        and all(w["generation"] > 1 for w in s["workers"] if w["model"] == "m"), "reload_finished",
                        timeout=60)
        assert set(c.infer(1, model="m")) >= {"worker", "generation", "config"}  # WhereAmI's answer
    assert other.failed == [] and other.ok > 0
