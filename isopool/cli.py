"""The `isopool` command: serve, infer, status, health, events, scale, reload, stop."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from isopool.protocol.endpoints import ENV_ENDPOINT

ENDPOINT_HELP = f"Supervisor endpoint (default: ${ENV_ENDPOINT}, else ipc:// in the per-user runtime directory)."
EXIT_UNREACHABLE = 1

endpoint_option = click.option("--endpoint", "-e", envvar=ENV_ENDPOINT, default=None, help=ENDPOINT_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="isopool")
def main() -> None:
    """isopool: an isolated, supervised inference worker pool for PyTorch models.

    Start the daemon with `isopool serve`, send requests with `isopool infer` or the
    Python client (`from isopool import Client`), watch it with `isopool status`.
    """


# ---------------------------------------------------------------- serve

SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
              "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(value: Any) -> int:
    """Bytes from 1048576, '512MiB', '2GB'."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; use bytes or a unit like 512MiB or 2GB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


# flag name -> (config field, click type, help). Every serve flag is also a config-file key.
SERVE_OPTIONS: list[tuple[str, type | click.ParamType, str]] = [
    ("model", str, "The model: MODULE:ATTR, a class or factory called once per worker. Default: the built-in model."),
    ("workers", int, "Number of worker processes."),
    ("endpoint", str, ENDPOINT_HELP),
    ("devices", str, "Devices to spread workers over: cpu, cuda, cuda:0,cuda:1 or auto."),
    ("threads", int, "torch intra-op threads per worker (0: the cores divided by the workers)."),
    ("max-queue", int, "Queued requests beyond which new ones are refused with Overloaded (default 4096); one "
                       "client may fill 7/8 of it, the rest is kept for others."),
    ("prefetch", int, "Requests a worker may hold at once (default 16), so it never waits on the "
                      "supervisor; under load they travel, and their results return, in bundles. "
                      "Lower it (1-2) when request durations vary widely, so none waits behind a slow one."),
    ("spin-us", int, "After quick work, the supervisor and each worker look for the next message for up "
                     "to this many microseconds, yielding the core to any thread that wants it, before "
                     "they sleep (default 300): a sleeping process costs every message a few thread "
                     "wake-ups. Only while requests finish within ~2 ms; the window shrinks by itself "
                     "when requests come further apart. 0: always sleep at once, the least CPU."),
    ("max-batch-size", int, "Models with batch(list) -> list get up to this many requests at once."),
    ("max-batch-wait-ms", float, "How long a partial batch waits for more requests."),
    ("request-timeout", float, "Seconds any request may take; also the deadline when the client gives none."),
    ("max-attempts", int, "Tries of a request whose worker died (1: never retry)."),
    ("poison-threshold", int, "Worker deaths after which an input is refused with PoisonRequest."),
    ("heartbeat-interval", float, "Seconds between heartbeats of an idle worker."),
    ("heartbeat-timeout", float, "An idle worker silent this long is replaced."),
    ("start-timeout", float, "A worker not ready after this many seconds is killed."),
    ("kill-grace", float, "Seconds between SIGTERM and SIGKILL when a worker is killed."),
    ("drain-timeout", float, "On SIGTERM, seconds to finish queued and running work before stopping."),
    ("max-restarts", int, "Restarts within --restart-window beyond which the pool is reported degraded."),
    ("restart-window", float, "Window in seconds for --max-restarts."),
    ("backoff-base", float, "First restart delay after repeated crashes; doubles each time."),
    ("backoff-max", float, "Longest restart delay."),
    ("max-requests", int, "Recycle a worker after this many requests (0: never)."),
    ("max-requests-jitter", int, "Add 0..N to --max-requests per worker so they don't recycle together."),
    ("max-rss", str, "Recycle a worker whose memory grows past this (e.g. 2GiB; 0: never)."),
    ("stats-interval", float, "Seconds between samples of worker memory and CPU."),
    ("log-rate", str, "Bytes a second of each worker's output that are logged (e.g. 128KiB, the default; "
                      "0: no limit); the rest are dropped and counted in status and metrics."),
    ("max-message-bytes", str, "Largest accepted message (e.g. 256MiB)."),
    ("max-depth", int, "Deepest accepted nesting of lists and maps in a payload."),
    ("max-elements", int, "Most array elements plus container items accepted in one payload."),
    ("arrays", click.Choice(["auto", "numpy", "torch"]), "How the model receives arrays."),
    ("metrics-port", int, "Serve Prometheus metrics at http://HOST:PORT/metrics (0: off)."),
    ("metrics-host", str, "Address for --metrics-port (default 127.0.0.1: loopback only)."),
    ("integrity-interval", float, "Seconds between checks of each idle worker's weights against their "
     "fingerprint at load (0: off). A changed model is recycled."),
    ("isolation", click.Choice(["none", "tenant", "request"]),
     "none: any worker serves any request; tenant: a worker serves one tenant until it is recycled; "
     "request: every request runs in a fresh worker."),
    ("preload", click.Choice(["none", "imports", "model"]),
     "Start workers by fork from a template that has imported torch and the handler (imports, the "
     "default: a restart takes milliseconds), that has also built the model so workers share its weights "
     "(model, CPU only), or as fresh interpreters (none)."),
]
SIZE_FIELDS = {"max_rss", "max_message_bytes", "log_rate"}
SERVE_OPTIONS += [
    ("curve-secret-key", str, "The server's .key_secret file (from `isopool keygen`): require CURVE."),
    ("curve-clients", str, "Directory of client public keys (*.key) allowed to infer and read status."),
    ("curve-admins", str, "Directory of public keys also allowed control ops (scale, reload, stop)."),
]
BOOL_FLAGS = [("integrity-every-request", "Also check the weights after every request (costs a hash of them)."),
              ("insecure", "Allow a tcp:// endpoint without authentication (trusted networks only).")]


def _serve_options(func):
    for name, typ, help_text in reversed(SERVE_OPTIONS):
        func = click.option(f"--{name}", type=typ, default=None, help=help_text)(func)
    for name, help_text in reversed(BOOL_FLAGS):
        func = click.option(f"--{name}", is_flag=True, default=None, help=help_text)(func)
    return func


def load_config(path: str | None, flags: dict[str, Any]):
    """Defaults < TOML file < flags. Unknown keys and bad values name the key."""
    from isopool.supervisor.config import PoolConfig
    from isopool.supervisor.devices import parse_devices

    known = {f.name for f in fields(PoolConfig)}
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
        data = data.get("isopool", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise click.BadParameter(f"unknown key {key!r} in {path}; known keys: "
                                         f"{', '.join(sorted(k.replace('_', '-') for k in known))}",
                                         param_hint="--config")
            values[name] = value
    values.update({k: v for k, v in flags.items() if v is not None})
    for name in SIZE_FIELDS & values.keys():
        try:
            values[name] = parse_size(values[name])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"--{name.replace('_', '-')}") from None
    for name, value in values.items():
        want = PoolConfig.__dataclass_fields__[name].type
        if not _type_ok(value, want):
            raise click.BadParameter(f"{name.replace('_', '-')} = {value!r} should be {want}", param_hint="--config")
    try:
        config = PoolConfig(**values)
        parse_devices(config.devices)
        return config
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _type_ok(value: Any, want: str) -> bool:
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "dict": lambda v: isinstance(v, dict)}
    base = want.split("|")[0].strip()
    if "None" in want and value is None:
        return True
    return checks.get(base, lambda v: True)(value)


def config_toml(config) -> str:
    lines = ["[isopool]"]
    for key, value in config.to_dict().items():
        if value is None:
            lines.append(f"# {key.replace('_', '-')} = (default)")
        elif isinstance(value, dict):
            lines.append(f"{key.replace('_', '-')} = {json.dumps(value)}")
        else:
            lines.append(f"{key.replace('_', '-')} = {json.dumps(value)}")
    return "\n".join(lines)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for key in ("worker", "pid", "request"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML file of serve settings (keys as the flags, under [isopool]); flags override it.")
@_serve_options
@click.option("--print-config", is_flag=True, help="Print the effective configuration as TOML and exit.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", type=click.Choice(["text", "json"]), help="Log lines as text or JSON.")
def serve(config_file: str | None, print_config: bool, log_level: str, log_format: str, **flags: Any) -> None:
    """Run the supervisor daemon in the foreground.

    SIGTERM or Ctrl-C drains (finishes queued work, then exits 0); a second one stops at
    once. SIGHUP replaces every worker, one at a time, with no failed request.
    """
    config = load_config(config_file, {k: v for k, v in flags.items()})
    if print_config:
        click.echo(config_toml(config))
        return
    setup_logging(log_level, log_format)
    from isopool.supervisor import StartupError, Supervisor

    try:
        code = Supervisor(config).run()
    except (StartupError, PermissionError) as exc:
        click.echo(f"isopool serve: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))
    sys.exit(code)


# ---------------------------------------------------------------- requests


def _json_default(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"cannot print a {type(obj).__name__} as JSON")


def _read_input(value: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"INPUT is not JSON ({exc}); pass JSON, or @file with JSON in it") from None


def _client(endpoint: str | None, timeout: float = 30.0):
    from isopool.client import Client

    return Client(endpoint, timeout=timeout)


def _fail(exc: Exception, code: int = 1) -> None:
    click.echo(f"isopool: {type(exc).__name__}: {exc}", err=True)
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        click.echo(f"remote traceback:{cause}", err=True)
    sys.exit(code)


@main.command()
@endpoint_option
@click.option("--timeout", "-t", type=float, default=30.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--stream", is_flag=True, help="Print each part of a streaming handler as it arrives.")
@click.argument("input_", metavar="INPUT")
def infer(endpoint: str | None, timeout: float, stream: bool, input_: str) -> None:
    """Send one request and print the model's output as JSON.

    INPUT is JSON (e.g. '[0.1, 0.2, ...]') or @FILE holding JSON. The built-in model takes
    16 numbers, or a list of such rows, and returns 4 logits per row.
    """
    from isopool.errors import IsopoolError

    value = _read_input(input_)
    with _client(endpoint, timeout) as client:
        try:
            if stream:
                for part in client.stream(value, timeout=timeout):
                    click.echo(json.dumps(part, default=_json_default))
            else:
                click.echo(json.dumps(client.infer(value, timeout=timeout), default=_json_default))
        except IsopoolError as exc:
            _fail(exc)


# ---------------------------------------------------------------- watching


@main.command()
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the status map as JSON (keys: pool, workers).")
@click.option("--watch", "-w", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes (--watch).")
@click.option("--count", type=int, default=0, help="With --watch, stop after this many refreshes (0: never).")
def status(endpoint: str | None, as_json: bool, watch: bool, interval: float, count: int) -> None:
    """Show every worker and the pool: states, pids, counts, memory, latency, health."""
    from isopool.errors import IsopoolError

    from .display import render_status, watch_status

    with _client(endpoint, 5.0) as client:
        try:
            if watch:
                watch_status(client, interval, count, as_json)
            elif as_json:
                click.echo(json.dumps(client.status(), indent=2, default=_json_default))
            else:
                render_status(client.status())
        except IsopoolError as exc:
            _fail(exc)


@main.command()
@endpoint_option
@click.option("--timeout", type=float, default=5.0, show_default=True)
def health(endpoint: str | None, timeout: float) -> None:
    """Exit 0 when the pool is serving, 1 when it is degraded or unreachable (for probes)."""
    from isopool.errors import IsopoolError

    with _client(endpoint, timeout) as client:
        try:
            pool = client.status(timeout=timeout)["pool"]
        except IsopoolError as exc:
            click.echo(f"unhealthy: {exc}")
            sys.exit(EXIT_UNREACHABLE)
    click.echo(("healthy: " if pool["healthy"] else "unhealthy: ") + pool["health_reason"])
    sys.exit(0 if pool["healthy"] else 1)


@main.command()
@endpoint_option
@click.option("--count", type=int, default=0, help="Exit after this many events (0: run until Ctrl-C).")
@click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds (0: never).")
def events(endpoint: str | None, count: int, timeout: float) -> None:
    """Print one JSON line per pool event as it happens (started, ready, crashed, ...)."""
    import zmq

    from isopool.errors import IsopoolError

    with _client(endpoint, 5.0) as client:
        try:
            where = client.status()["pool"].get("events_endpoint")
        except IsopoolError as exc:
            _fail(exc)
    if not where:
        _fail(RuntimeError("this supervisor publishes no event stream"))
    ctx = zmq.Context(1)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(where)
    seen, end = 0, (time.monotonic() + timeout) if timeout else None
    try:
        while not count or seen < count:
            wait = 1000 if end is None else int(max(0.0, end - time.monotonic()) * 1000)
            if end is not None and wait == 0:
                break
            if sub.poll(wait):
                _, data = sub.recv_multipart()
                click.echo(data.decode())
                seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        ctx.term()


# ---------------------------------------------------------------- keys


@main.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", show_default=True)
def keygen(name: str, directory: str) -> None:
    """Write a CURVE key pair: NAME.key (public: share it) and NAME.key_secret (keep it private).

    The server uses its .key_secret (--curve-secret-key); clients use their own .key_secret
    and the server's .key ($ISOPOOL_CURVE_SECRET_KEY, $ISOPOOL_CURVE_SERVER_KEY). Put client
    .key files in the server's --curve-clients or --curve-admins directory to let them in.
    """
    import os

    import zmq.auth

    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    click.echo(f"public key: {public}\nsecret key: {secret}")


# ---------------------------------------------------------------- control


def _control(endpoint: str | None, action: str, **args: Any) -> None:
    from isopool.errors import IsopoolError

    with _client(endpoint, 10.0) as client:
        try:
            click.echo(json.dumps(client.control(action, **args)))
        except IsopoolError as exc:
            _fail(exc)


@main.command()
@endpoint_option
@click.argument("workers", type=click.IntRange(min=1))
def scale(endpoint: str | None, workers: int) -> None:
    """Change the number of workers at runtime."""
    _control(endpoint, "scale", workers=workers)


@main.command()
@endpoint_option
def reload(endpoint: str | None) -> None:
    """Replace every worker one at a time (picks up new code and weights); no request fails."""
    _control(endpoint, "reload")


@main.command()
@endpoint_option
def stop(endpoint: str | None) -> None:
    """Drain and stop the supervisor, like SIGTERM."""
    _control(endpoint, "stop")


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmark isopool against ProcessPoolExecutor, multiprocessing.Pool, loky and pebble.

    `isopool bench --help` lists its options; `--quick` checks every mechanism's answers fast.
    """
    from isopool.bench.suite import main as bench_main

    sys.exit(bench_main(list(args)))


if __name__ == "__main__":
    main()
