"""The `isopool` command: serve, infer, status, health, events, models, load, unload, scale, reload, stop."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from isopool.bench import MECHANISMS
from isopool.protocol.codec import json_default
from isopool.protocol.exits import EXIT_LOAD_FAILED

from .cliutil import EXIT_UNREACHABLE, _client, _fail, endpoint_option
from .logs import setup_logging
from .manage import register
from .serveconfig import common_options, config_toml, load_config, serve_options



class _Commands(click.Group):
    """Every command: a user's mistake or an error we did not foresee is one line on stderr and
    a non-zero exit, never a traceback ($ISOPOOL_DEBUG=1 shows it)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line: said plainly
            if os.environ.get("ISOPOOL_DEBUG"):
                raise
            click.echo(f"isopool: {type(exc).__name__}: {exc} (set ISOPOOL_DEBUG=1 to see where)", err=True)
            sys.exit(1)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="isopool")
def main() -> None:
    """isopool: an isolated, supervised inference worker pool for PyTorch models.

    Start the daemon with `isopool serve`, send requests with `isopool infer` or the
    Python client (`from isopool import Client`), watch it with `isopool status`.
    """


# ---------------------------------------------------------------- serve

@main.command()
@common_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="A TOML file of serve settings (keys as the flags, a [models.NAME] table for the model); "
                   "flags override it. [default: none]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A value for the model's context.config (repeatable; a.b=1 nests). VALUE is read as TOML "
                   "(1, 2.5, true, \"text\", [1, 2]), else as text. Adds to [models.NAME.config].")
@serve_options
@click.option("--print-config", is_flag=True, help="Print the effective configuration as TOML (what --config "
                                                   "reads) and exit.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]),
              help="The least severe log lines written to stderr.")
@click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]),
              help="Log lines as text or as JSON objects (one a line).")
def serve(config_file: str | None, sets: tuple[str, ...], print_config: bool, log_level: str, log_format: str,
          **flags: Any) -> None:
    """Run the supervisor daemon in the foreground.

    SIGTERM or Ctrl-C drains (finishes queued work, then exits 0); a second one stops at
    once. SIGHUP replaces every worker, one at a time, with no failed request.
    """
    _check_server_extra()
    config = load_config(config_file, flags, sets)
    for model in config.models:
        _check_model_module(model.model)
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


SERVER_NEEDS = ("torch", "psutil", "prometheus_client", "tomli_w")  # the `server` extra


def _check_server_extra() -> None:
    import importlib.util

    missing = [name for name in SERVER_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise click.UsageError(f"`isopool serve` needs {', '.join(missing)}, which this install lacks: "
                               "pip install 'isopool[server]' (the client commands work without them)")


def _check_model_module(model: str) -> None:
    """A --model whose module cannot be found: one line now, not a traceback from each worker."""
    import importlib.util

    module = model.partition(":")[0]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as the workers have it (worker/handler.py)
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    except Exception:  # noqa: BLE001 - its package fails to import: the worker reports that, traceback and all
        found = True
    if not found:  # as a model that fails to load: 78, which a service manager need not retry
        click.echo(f"isopool serve: No module named {module!r} (--model {model}): is it installed, or on "
                   f"PYTHONPATH? Workers import it from {os.getcwd()}", err=True)
        sys.exit(EXIT_LOAD_FAILED)


# ---------------------------------------------------------------- requests


def _read_input(value: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"INPUT is not JSON ({exc}); pass JSON, or @file with JSON in it") from None


@main.command()
@endpoint_option
@click.option("--timeout", "-t", type=float, default=30.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--model", "-m", "model", default=None,
              help="The model to ask, by name (needed when the daemon serves several). [default: the only one]")
@click.option("--stream", is_flag=True, help="Print each part of a streaming handler as it arrives.")
@click.argument("input_", metavar="INPUT")
def infer(endpoint: str | None, timeout: float, model: str | None, stream: bool, input_: str) -> None:
    """Send one request and print the model's output as JSON.

    INPUT is JSON (e.g. '[0.1, 0.2, ...]') or @FILE holding JSON. The built-in model takes
    16 numbers, or a list of such rows, and returns 4 logits per row.
    """
    from isopool.errors import IsopoolError

    value = _read_input(input_)
    with _client(endpoint, timeout) as client:
        try:
            if stream:
                for part in client.stream(value, timeout=timeout, model=model):
                    click.echo(json.dumps(part, default=json_default))
            else:
                click.echo(json.dumps(client.infer(value, timeout=timeout, model=model), default=json_default))
        except IsopoolError as exc:
            _fail(exc)


# ---------------------------------------------------------------- watching


@main.command()
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the status map as JSON (keys: pool, workers).")
@click.option("--watch", "-w", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes (--watch).")
@click.option("--count", type=int, default=0, show_default=True, help="With --watch, stop after this many refreshes (0: never).")
def status(endpoint: str | None, as_json: bool, watch: bool, interval: float, count: int) -> None:
    """Show every worker and the pool: states, pids, counts, memory, latency, health."""
    from isopool.errors import IsopoolError

    from .display import render_status, watch_status

    with _client(endpoint, 5.0) as client:
        try:
            if watch:
                watch_status(client, interval, count, as_json)
            elif as_json:
                click.echo(json.dumps(client.status(), indent=2, default=json_default))
            else:
                render_status(client.status())
        except IsopoolError as exc:
            _fail(exc)


@main.command()
@endpoint_option
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds to wait for the supervisor's answer before saying unhealthy.")
@click.option("--model", "-m", "model", default=None,
              help="The health of this model alone. [default: the whole daemon: every model]")
def health(endpoint: str | None, timeout: float, model: str | None) -> None:
    """Exit 0 when the pool (or --model) is serving, 1 when it is degraded or unreachable (for probes)."""
    from isopool.errors import IsopoolError

    with _client(endpoint, timeout) as client:
        try:
            status = client.status(timeout=timeout)
        except IsopoolError as exc:
            click.echo(f"unhealthy: {exc}")
            sys.exit(EXIT_UNREACHABLE)
    pool = status["pool"]
    if model is not None:
        pool = status.get("models", {}).get(model)
        if pool is None:
            click.echo(f"unhealthy: no model named {model!r} is served here; the models are: "
                       f"{', '.join(status.get('models', {}))}")
            sys.exit(EXIT_UNREACHABLE)
    click.echo(("healthy: " if pool["healthy"] else "unhealthy: ") + pool["health_reason"])
    sys.exit(0 if pool["healthy"] else 1)


@main.command()
@endpoint_option
@click.option("--count", type=int, default=0, show_default=True, help="Exit after this many events (0: run until Ctrl-C).")
@click.option("--timeout", type=float, default=0.0, show_default=True, help="Exit after this many seconds (0: never).")
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


@main.command()
@click.option("--quick", is_flag=True, help="Small sizes and one round: checks every mechanism's answers fast; "
                                            "its figures are labelled QUICK and are not for comparison.")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Rounds to measure; each figure is their median (default: 3, or 1 with --quick).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.md, .json and .png (default: a new one under ~/.cache/isopool/bench).")
@click.option("--only", multiple=True, type=click.Choice(MECHANISMS),
              help="Run only this mechanism (repeatable; default: all).")
@click.option("--no-embeddings", is_flag=True,
              help="Skip the real-model workload (all-MiniLM-L6-v2, which needs the embeddings extra).")
@click.option("--http", "http", is_flag=True,
              help="Instead: isopool over HTTP (JSON, binary) beside its native client, LitServe and Ray Serve, "
                   "driven by wrk; writes http.md and http.json.")
@click.option("--peer", "peers", multiple=True, type=click.Choice(["litserve", "ray"]),
              help="With --http: compare with this peer only (repeatable; default: both).")
@click.option("--sandbox", "sandbox", is_flag=True,
              help="Instead: the same pool with and without --sandbox, in the same run (root needed). "
                   "[default: off]")
@click.option("--noisy", is_flag=True,
              help="Run with a noisy neighbour: a CPU-bound process on every core throughout.")
def bench(quick: bool, repeats: int | None, out: Path | None, only: tuple[str, ...], no_embeddings: bool,
          http: bool, peers: tuple[str, ...], sandbox: bool, noisy: bool) -> None:
    """Benchmark isopool against ProcessPoolExecutor, multiprocessing.Pool, loky and pebble.

    Every mechanism runs the same model on 2 worker processes; answers are checked against
    the model in-process. Tiny requests (throughput at 64 in flight, p50/p99 latency), a
    16 MiB round trip, and the real embedding model when installed. With --http, the HTTP
    front against LitServe and Ray Serve (bench/http.py).
    """
    if sandbox:
        from isopool.bench.sandbox import report

        sys.exit(report(2000 if quick else 20000, 3 if quick else 10, 1 if quick else (repeats or 2)))
    if http:
        from isopool.bench.http import run as run_http
        from isopool.bench.suite import default_out

        sys.exit(run_http(quick, out or default_out(quick), with_embeddings=not no_embeddings,
                          peers=list(peers) or None))
    from isopool.bench.suite import bench as run_bench

    sys.exit(run_bench(quick, repeats, out, list(only), embeddings=not no_embeddings, noisy=noisy))


register(main)

if __name__ == "__main__":
    main()
