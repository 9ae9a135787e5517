"""The `isopool` command as a user runs it: real processes, captured output, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def isopool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isopool.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


def test_infer_status_health(pool):
    out = isopool("infer", "--endpoint", pool.endpoint, json.dumps(list(range(16))))
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 4
    bad = isopool("infer", "--endpoint", pool.endpoint, "[1, 2]")
    assert bad.returncode == 1 and "RemoteError" in bad.stderr and "(16,)" in bad.stderr
    status = json.loads(isopool("status", "--endpoint", pool.endpoint, "--json").stdout)
    assert status["pool"]["workers_ready"] == 2 and status["pool"]["requests_total"] == 2
    health = isopool("health", "--endpoint", pool.endpoint)
    assert health.returncode == 0 and health.stdout.startswith("healthy")


def test_infer_reads_input_from_a_file(pool, short_tmp):
    path = short_tmp / "in.json"
    path.write_text(json.dumps([[0.5] * 16, [1.5] * 16]))
    out = isopool("infer", "--endpoint", pool.endpoint, f"@{path}")
    assert out.returncode == 0 and len(json.loads(out.stdout)) == 2


def test_status_table_and_watch_render_without_a_tty(pool):
    table = isopool("status", "--endpoint", pool.endpoint)
    assert table.returncode == 0, table.stderr
    for word in ("workers", "pid", "state", "idle", "RSS", "last exit", "healthy", "2/2 ready"):
        assert word in table.stdout
    watch = isopool("status", "--endpoint", pool.endpoint, "--watch", "--count", "2", "--interval", "0.1")
    assert watch.returncode == 0, watch.stderr
    assert watch.stdout.count("healthy — serving") == 2


def test_toml_config_equals_the_same_flags(short_tmp):
    cfg = short_tmp / "isopool.toml"
    cfg.write_text('[isopool]\nworkers = 3\nmax-queue = 50\nrequest-timeout = 12.5\nmax-rss = "1GiB"\n'
                   'model = "isopool.examples.faulty:Faulty"\n')
    from_file = isopool("serve", "--config", str(cfg), "--print-config")
    from_flags = isopool("serve", "--workers", "3", "--max-queue", "50", "--request-timeout", "12.5",
                         "--max-rss", "1GiB", "--model", "isopool.examples.faulty:Faulty", "--print-config")
    assert from_file.returncode == from_flags.returncode == 0, from_file.stderr + from_flags.stderr
    assert from_file.stdout == from_flags.stdout
    assert "max-rss = 1073741824" in from_file.stdout
    override = isopool("serve", "--config", str(cfg), "--workers", "5", "--print-config")
    assert "workers = 5" in override.stdout


def test_bad_config_key_and_value_are_refused_with_exit_2(short_tmp):
    cfg = short_tmp / "bad.toml"
    cfg.write_text("[isopool]\nworkerz = 3\n")
    out = isopool("serve", "--config", str(cfg), "--print-config")
    assert out.returncode == 2 and "unknown key 'workerz'" in out.stderr
    cfg.write_text('[isopool]\nworkers = "many"\n')
    out = isopool("serve", "--config", str(cfg), "--print-config")
    assert out.returncode == 2 and "workers" in out.stderr
    out = isopool("serve", "--workers", "0", "--print-config")
    assert out.returncode == 2 and "workers must be at least 1" in out.stderr


def test_serve_refuses_tcp_without_authentication():
    out = isopool("serve", "--endpoint", "tcp://127.0.0.1:0", "--workers", "1")
    assert out.returncode == 1
    assert "refusing to serve tcp://127.0.0.1:0 without authentication" in out.stderr


BAD_SETTINGS = [
    (("--request-timeout", "nan"), "request-timeout must be a finite number"),
    (("--kill-grace", "nan"), "kill-grace must be a finite number"),
    (("--heartbeat-timeout", "inf"), "heartbeat-timeout must be a finite number"),
    (("--heartbeat-timeout", "nan"), "heartbeat-timeout must be a finite number"),
    (("--drain-timeout", "-inf"), "drain-timeout"),
    (("--metrics-port", "99999"), "metrics-port must be 0 (off) to 65535"),
    (("--workers", "99999999999999999999"), "workers must be at most 1024"),
    (("--workers", "0"), "workers must be at least 1"),
]


def test_each_bad_setting_is_one_clear_line_and_no_traceback(short_tmp):
    for args, words in BAD_SETTINGS:
        out = isopool("serve", *args, "--endpoint", f"ipc://{short_tmp}/never.sock", timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and words in errors[0], (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_with_no_daemon_every_client_command_is_one_line_naming_the_endpoint(short_tmp):
    endpoint = f"ipc://{short_tmp}/nobody.sock"
    for args in (["infer", "[1]"], ["status"], ["health"], ["scale", "2"], ["reload"], ["stop"]):
        out = isopool(*args, "--endpoint", endpoint, timeout=30)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        said = (out.stderr + out.stdout).strip().splitlines()
        assert len(said) == 1 and endpoint in said[0] and "isopool serve" in said[0], (args, said)


def test_user_mistakes_are_one_line_and_no_traceback(short_tmp):
    cases = [
        (["status", "--endpoint", "foo://bar"], "is not one isopool serves"),
        (["infer", "--endpoint", "tcp://", "[1]"], "is not one isopool serves"),
        (["serve", "--model", "no_such_module_anywhere:Model", "--endpoint", f"ipc://{short_tmp}/m.sock"],
         "No module named 'no_such_module_anywhere'"),
        (["infer", "not json"], "is not JSON"),
    ]
    for args, words in cases:
        out = isopool(*args, timeout=30)
        assert out.returncode != 0 and "Traceback" not in out.stderr, (args, out.stderr)
        assert words in out.stderr, (args, out.stderr)


def test_the_models_config_table_and_set_reach_the_factory_and_print_config_round_trips(start_pool, short_tmp):
    cfg = short_tmp / "pool.toml"
    cfg.write_text('workers = 1\nrequest-timeout = 20.0\n\n[models.default]\nmodel = "isopool.examples.faulty:WhereAmI"\n'
                   'max-batch-size = 4\n\n[models.default.config]\ncheckpoint = "/srv/w.pt"\nlayers = [1, 2]\n'
                   '[models.default.config.opts]\nfast = false\n')
    sets = ["--set", "opts.fast=true", "--set", "scale=2.5", "--set", "label=plain words"]
    printed = isopool("serve", "--config", str(cfg), *sets, "--print-config")
    assert printed.returncode == 0, printed.stderr
    again = short_tmp / "printed.toml"
    again.write_text(printed.stdout)
    reread = isopool("serve", "--config", str(again), "--print-config")
    assert reread.returncode == 0 and reread.stdout == printed.stdout, reread.stderr  # the same settings
    want = {"checkpoint": "/srv/w.pt", "layers": [1, 2], "opts": {"fast": True}, "scale": 2.5, "label": "plain words"}
    pool = start_pool("--config", str(again))
    with pool.client() as c:
        assert c.infer("where")["config"] == want
    status = pool.status()["pool"]
    assert status["workers_target"] == 1


def test_a_models_table_refuses_what_is_not_a_models_setting(short_tmp):
    cfg = short_tmp / "bad.toml"
    cfg.write_text('[models.default]\nmodel = "isopool.examples.faulty:WhereAmI"\nmetrics-port = 9000\n')
    out = isopool("serve", "--config", str(cfg), "--print-config")
    assert out.returncode == 2 and "setting of the daemon, not of one model" in out.stderr
    cfg.write_text('[models.a]\nmodel = "isopool.examples.faulty:Faulty"\n[models.b]\nmodel = "x:Z"\nmax-queue = 2\n'
                   'workers = 0\n')
    out = isopool("serve", "--config", str(cfg), "--print-config")
    assert out.returncode == 2 and "model 'b'" in out.stderr and "workers" in out.stderr  # names the model


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    import click

    from isopool.cli import main

    for name, command in main.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            assert param.help, f"isopool {name} {param.opts[0]} has no help"
            takes_value = not param.is_flag and not param.multiple and param.name not in ("endpoint", "print_config")
            if takes_value:
                assert param.show_default or "[default" in param.help or "default" in param.help, \
                    f"isopool {name} {param.opts[0]} does not say its default"
    serve = [p.opts[0] for p in main.commands["serve"].params]
    assert serve[:5] == ["--model", "--workers", "--endpoint", "--config", "--set"]  # the common ones first


def test_timeout_hints_from_the_cli_name_the_cli_flag(start_pool):
    pool = start_pool("--workers", "1", "--model", "isopool.examples.faulty:Faulty")
    out = isopool("infer", "--endpoint", pool.endpoint, "--timeout", "0.3", json.dumps({"do": "sleep", "s": 2}))
    assert out.returncode == 1 and "RequestTimeout" in out.stderr
    assert "--timeout" in out.stderr and "timeout=" not in out.stderr, out.stderr
