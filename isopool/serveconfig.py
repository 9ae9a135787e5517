"""The settings of `isopool serve`: its flags, the TOML file, and the TOML it prints.

    defaults (supervisor/config.PoolConfig) < TOML file (--config) < flags

Every serve flag is also a top-level key of the file (or of an [isopool] table); sizes
read as 512MiB, 2GB or bytes. The model has a table of its own, as in ../shared/design.md:

    workers = 4
    [models.default]
    model = "mypkg.models:Embedder"
    max-batch-size = 16
    [models.default.config]          # the factory's context.config; --set KEY=VALUE adds to it
    checkpoint = "/srv/weights.pt"

`--print-config` writes exactly this form, and reading it back gives the same settings.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from isopool.protocol.endpoints import ENV_ENDPOINT

ENDPOINT_HELP = f"Supervisor endpoint (default: ${ENV_ENDPOINT}, else ipc:// in the per-user runtime directory)."

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
    ("model", str, "A model to serve: [NAME=]MODULE:ATTR, a class or factory called once per worker. "
                   "Repeat it to serve several; without NAME= the model is named default."),
    ("workers", str, "Worker processes: N for each model, or NAME=N for one model (repeatable)."),
    ("endpoint", str, ENDPOINT_HELP),
    ("devices", str, "Devices to spread workers over: cpu, cuda, cuda:0,cuda:1 or auto."),
    ("threads", int, "Threads per worker for torch's intra-op pool and for Rayon pools such as Hugging Face "
                     "tokenizers' (0: the cores divided by the workers; at 1, tokenizers run inline). More "
                     "than that share oversubscribes the cores and torch's threads spin against each other "
                     "(2 workers x 2 threads on 2 cores: 20x fewer tiny requests/s)."),
    ("max-queue", int, "Queued requests beyond which new ones are refused with Overloaded; one "
                       "client may fill 7/8 of it, the rest is kept for others."),
    ("prefetch", int, "Requests a worker may hold at once, so it never waits on the "
                      "supervisor; under load they travel, and their results return, in bundles. "
                      "Lower it (1-2) when request durations vary widely, so none waits behind a slow one."),
    ("spin-us", int, "After quick work, the supervisor and each worker look for the next message for up "
                     "to this many microseconds, yielding the core to any thread that wants it, before "
                     "they sleep: a sleeping process costs every message a few thread "
                     "wake-ups. Only while requests finish within ~2 ms; the window shrinks by itself "
                     "when requests come further apart. 0: always sleep at once, the least CPU."),
    ("max-batch-size", int, "Models with batch(list) -> list get up to this many requests at once. "
                            "For throughput under a deep queue, set it to --prefetch (16): each worker "
                            "then runs all it holds as one batch, and the supervisor and clients spend "
                            "about a quarter less CPU per request (MiniLM at 64 in flight)."),
    ("max-batch-wait-ms", float, "How long a partial batch waits for more requests."),
    ("request-timeout", float, "Seconds any request may take; also the deadline when the client gives none."),
    ("max-attempts", int, "Tries of a request whose worker died (1: never retry)."),
    ("poison-threshold", int, "Worker deaths after which an input is refused with PoisonRequest."),
    ("heartbeat-interval", float, "Seconds between heartbeats of an idle worker."),
    ("heartbeat-timeout", float, "An idle worker silent this long is replaced."),
    ("start-timeout", float, "A worker not ready after this many seconds is killed."),
    ("kill-grace", float, "SIGTERM to SIGKILL, in seconds; a worker alive as long (30 s at least) past SIGKILL is given up on."),
    ("drain-timeout", float, "On SIGTERM, seconds to finish queued and running work before stopping."),
    ("max-restarts", int, "Restarts within --restart-window beyond which the pool is reported degraded."),
    ("restart-window", float, "Window in seconds for --max-restarts."),
    ("backoff-base", float, "First restart delay after repeated crashes; doubles each time."),
    ("backoff-max", float, "Longest restart delay."),
    ("max-requests", int, "Recycle a worker after this many requests (0: never)."),
    ("max-requests-jitter", int, "Add 0..N to --max-requests per worker so they don't recycle together."),
    ("max-rss", str, "Recycle a worker whose memory grows past this (e.g. 2GiB; 0: never)."),
    ("stats-interval", float, "Seconds between samples of worker memory and CPU."),
    ("log-rate", str, "Bytes a second of each worker's output that are logged (e.g. 128KiB; "
                      "0: no limit); the rest are dropped and counted in status and metrics."),
    ("max-message-bytes", str, "Largest accepted message (e.g. 256MiB)."),
    ("max-depth", int, "Deepest accepted nesting of lists and maps in a payload."),
    ("max-elements", int, "Most array elements plus container items accepted in one payload."),
    ("arrays", click.Choice(["auto", "numpy", "torch"]), "How the model receives arrays."),
    ("shm", click.Choice(["auto", "off"]),
     "auto: a client on this host (ipc://) sends and receives its large arrays in shared memory that the "
     "worker maps: the supervisor routes them by reference and copies nothing (off under --sandbox, where "
     "workers cannot open the client's memory); off: every array travels in message frames."),
    ("shm-threshold", str, "Arrays of this size or more go by shared memory (e.g. 1MiB)."),
    ("max-queue-bytes", str, "Bytes of requests (their payloads and array frames) that one model may hold, "
                             "queued or running, e.g. 2GiB; a request past it is refused with Overloaded (one "
                             "alone is always taken; one client may hold 7/8 of it). Shared memory is capped "
                             "apart: --max-shm-bytes."),
    ("max-shm-bytes", str, "Shared memory that the requests in flight of one model may name (e.g. 4GiB); "
                           "a request past it is refused with Overloaded, retry it or send it as frames."),
    ("http", str, "Serve the Open Inference Protocol (v2 REST) on HOST:PORT, e.g. 127.0.0.1:8000, from gateway "
                  "processes of their own; a non-loopback address needs --http-cert, --http-key and "
                  "--http-tokens (or --insecure)."),
    ("http-workers", int, "HTTP gateway processes (0: half the cores, at least 1)."),
    ("http-client-timeout", float, "Seconds an HTTP client may take to send a request's headers, and may "
                                   "pause while sending its body (then 408 and the connection is closed); "
                                   "over each such time it must read 500 bytes a second of an answer it is "
                                   "behind on, or the connection is closed."),
    ("http-cert", str, "TLS certificate (PEM) for --http: serve https."),
    ("http-key", str, "The private key (PEM) of --http-cert."),
    ("http-tokens", str, "File of bearer tokens for --http, one 'client TOKEN' or 'admin TOKEN' per line "
                         "(no other user may read it: 0600; `isopool keygen NAME --http-tokens FILE` adds one)."),
    ("metrics-port", int, "Serve Prometheus metrics at http://HOST:PORT/metrics (0: off)."),
    ("metrics-host", str, "Address for --metrics-port (127.0.0.1: loopback only)."),
    ("integrity-interval", float, "Seconds between checks of each idle worker's weights against their "
     "fingerprint at load (0: off). A changed model is recycled."),
    ("isolation", click.Choice(["none", "tenant", "request"]),
     "none: any worker serves any request; tenant: a worker serves one tenant until it is recycled; "
     "request: every request runs in a fresh worker."),
    ("sandbox-user", str, "With --sandbox: run every worker as this existing user (its uid and group, and the "
                          "workers' group) instead of a uid of its own per slot. Workers then share that "
                          "user's files; the supervisor still refuses signals between them (SECURITY.md)."),
    ("sandbox-network", click.Choice(["host", "none"]),
     "With --sandbox: none gives each worker an empty network namespace (no network at all)."),
    ("preload", click.Choice(["auto", "none", "imports", "model"]),
     "Start workers by fork from a template that has imported torch and the handler (imports: a restart "
     "takes milliseconds, then the worker builds its model), that has also built the model so workers share "
     "its weights and a replacement serves at once (model, CPU only), or as fresh interpreters (none). auto, "
     "the default: model on CPU without --sandbox for a model that takes no context or declares "
     "fork_safe = True, else imports."),
]
SIZE_FIELDS = {"max_rss", "max_message_bytes", "log_rate", "shm_threshold", "max_shm_bytes", "max_queue_bytes"}
SERVE_OPTIONS += [
    ("curve-secret-key", str, "The server's .key_secret file (from `isopool keygen`): require CURVE."),
    ("curve-clients", str, "Directory of client public keys (*.key) allowed to infer and read status."),
    ("curve-admins", str, "Directory of public keys also allowed control ops (scale, reload, load, unload, stop)."),
]
BOOL_FLAGS = [("integrity-every-request", "Also check the weights after every request (costs a hash of them)."),
              ("insecure", "Allow a tcp:// endpoint, or a non-loopback --http, without authentication "
                           "(trusted networks only)."),
              ("sandbox", "Run each worker under a uid of its own, with no_new_privs and a seccomp filter, so "
                          "a compromised model cannot touch the supervisor or other workers (root needed; "
                          "SECURITY.md)."),
              ("http-access-log", "Log one line per HTTP request (method, route, model, status, time) "
                                  "in --log-format.")]


COMMON = ("model", "workers", "endpoint")  # the flags most people give: listed first in --help
# then these, in this order; the rest (tuning, limits, security) after them as SERVE_OPTIONS has them
FREQUENT = ("http", "devices", "max-batch-size", "max-batch-wait-ms", "request-timeout", "max-queue", "max-rss",
            "max-requests", "metrics-port", "metrics-host", "preload", "isolation", "arrays", "log-rate")


def _default_text(name: str) -> str:
    """'[default: X]' for flag `name`, from PoolConfig's defaults."""
    from isopool.supervisor.config import PoolConfig

    field_name = name.replace("-", "_")
    default = PoolConfig.__dataclass_fields__[field_name].default
    if field_name == "model":
        return "[default: the built-in model]"
    if field_name == "endpoint":
        return ""  # its help says it
    if default is None or default == "":
        return "[default: none]"
    if field_name in SIZE_FIELDS and isinstance(default, int) and default:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if default % size == 0:
                return f"[default: {default // size}{unit}]"
    return f"[default: {default}]"


REPEATED = {"model": "[NAME=]MODULE:ATTR", "workers": "[NAME=]N"}  # flags given once per model


def _option(name: str, typ: Any, help_text: str):
    default = _default_text(name)
    if name in REPEATED:
        return click.option(f"--{name}", multiple=True, metavar=REPEATED[name], help=f"{help_text} {default}".strip())
    return click.option(f"--{name}", type=typ, default=None, help=f"{help_text} {default}".strip())


def common_options(func):
    """--model, --workers, --endpoint."""
    for name, typ, help_text in reversed([o for o in SERVE_OPTIONS if o[0] in COMMON]):
        func = _option(name, typ, help_text)(func)
    return func


def serve_options(func):
    """Every other serve flag, in the order of SERVE_OPTIONS, then the on/off ones."""
    for name, help_text in reversed(BOOL_FLAGS):
        func = click.option(f"--{name}", is_flag=True, default=None, help=f"{help_text} [default: off]")(func)
    rest = [o for o in SERVE_OPTIONS if o[0] not in COMMON]
    rest.sort(key=lambda o: FREQUENT.index(o[0]) if o[0] in FREQUENT else len(FREQUENT))  # stable
    for name, typ, help_text in reversed(rest):
        func = _option(name, typ, help_text)(func)
    return func


# settings a [models.NAME] table may give its model (the rest are the daemon's)
PER_MODEL = {"workers", "devices", "threads", "max_queue", "max_queue_bytes", "prefetch", "max_batch_size", "max_batch_wait_ms",
             "request_timeout", "max_attempts", "max_requests", "max_requests_jitter", "max_rss", "arrays",
             "isolation", "preload", "start_timeout", "integrity_interval", "integrity_every_request"}
HIDDEN = {"model", "model_name", "user_config"}  # written in the [models.NAME] table, not as top-level keys


def load_config(path: str | None, flags: dict[str, Any], sets: tuple[str, ...] = ()):
    """Defaults < TOML file < flags (and --set for a model's config): a ServeConfig with one
    PoolConfig per model. Unknown keys and bad values name the key.

    --model is repeatable: NAME=MODULE:ATTR, or MODULE:ATTR for the model named "default".
    --workers is repeatable: N for every model without its own count, NAME=N for one."""
    from isopool.protocol.contract import DEFAULT_MODEL
    from isopool.supervisor.config import PoolConfig, ServeConfig
    from isopool.supervisor.devices import parse_devices

    known = {f.name for f in fields(PoolConfig)} - {"model_name", "user_config"}  # `model` is a flag: a key too
    base: dict[str, Any] = {}
    models: dict[str, dict[str, Any]] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
        tables = data.pop("models", None)
        data = data.get("isopool", data)
        if tables is None:
            tables = data.pop("models", None)
        if "user-config" in data or "user_config" in data:  # the older spelling of [models.default.config]
            base["user_config"] = data.pop("user-config", None) or data.pop("user_config", None) or {}
        for key, value in data.items():
            base[_known(key, known, path)] = value
        if tables is not None:
            models = _model_tables(tables, path, known)
    flags = {k: v for k, v in flags.items() if v is not None and v != ()}
    for spec in flags.pop("model", ()):
        name, sep, target = spec.partition("=")
        name, target = (name.strip(), target.strip()) if sep else ("default", spec.strip())
        models.setdefault(name, {})["model"] = target
    for count in flags.pop("workers", ()):
        name, sep, n = count.rpartition("=")
        n = _count(n, count)
        if not sep:
            base["workers"] = n
        elif name.strip() not in models:
            raise click.BadParameter(f"--workers {count}: no model named {name.strip()!r} "
                                     f"(models: {', '.join(models) or 'none'})", param_hint="--workers")
        else:
            models[name.strip()]["workers"] = n
    base.update(flags)
    if "model" in base:  # a top-level `model = ...` key: the default model
        models.setdefault("default", {}).setdefault("model", base.pop("model"))
    if not models:
        models["default"] = {"model": DEFAULT_MODEL}
    if sets:
        _set_model_config(models, base, sets)
    configs = []
    for name, own in models.items():
        values = {**base, **own, "model_name": name}
        if "model" not in values:
            raise click.BadParameter(f"[models.{name}] has no model = \"MODULE:ATTR\"", param_hint="--config")
        for field_name in SIZE_FIELDS & values.keys():
            try:
                values[field_name] = parse_size(values[field_name])
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{field_name.replace('_', '-')}") from None
        for field_name, value in values.items():
            want = PoolConfig.__dataclass_fields__[field_name].type
            if not _type_ok(value, want):
                raise click.BadParameter(f"{field_name.replace('_', '-')} = {value!r} should be {want}",
                                         param_hint="--config")
        try:
            config = PoolConfig(**values)
            parse_devices(config.devices)
        except ValueError as exc:
            raise click.BadParameter(f"model {name!r}: {exc}" if len(models) > 1 else str(exc)) from None
        configs.append(config)
    try:
        return ServeConfig(configs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _count(text: str, flag: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise click.BadParameter(f"{flag!r} should be N or NAME=N (a worker count)", param_hint="--workers") from None


def _set_model_config(models: dict, base: dict, sets: tuple[str, ...]) -> None:
    """--set KEY=VALUE: with one model, into its config; with several, KEY begins with the
    model's name (embed.batch=4)."""
    if len(models) == 1:
        (own,) = models.values()
        own["user_config"] = _apply_sets(dict(own.get("user_config") or base.get("user_config") or {}), sets)
        return
    for item in sets:
        name, dot, rest = item.partition(".")
        if not dot or name not in models:
            raise click.BadParameter(f"{item!r}: with several models, --set takes NAME.KEY=VALUE "
                                     f"(models: {', '.join(models)})", param_hint="--set")
        own = models[name]
        own["user_config"] = _apply_sets(dict(own.get("user_config") or {}), (rest,))


def _known(key: str, known: set[str], path: str, where: str = "") -> str:
    name = key.replace("-", "_")
    if name not in known:
        raise click.BadParameter(f"unknown key {key!r}{where} in {path}; known keys: "
                                 f"{', '.join(sorted(k.replace('_', '-') for k in known))}", param_hint="--config")
    return name


def _model_tables(tables: Any, path: str, known: set[str]) -> dict[str, dict[str, Any]]:
    """name -> the settings of each [models.NAME] table."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise click.BadParameter(f"[models] in {path} must hold tables, as [models.default] with model = "
                                 "\"MODULE:ATTR\"", param_hint="--config")
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        table = dict(table)
        own: dict[str, Any] = {}
        if "model" in table:
            own["model"] = table.pop("model")
        config = table.pop("config", None)
        if config is not None:
            if not isinstance(config, dict):
                raise click.BadParameter(f"[models.{name}] config in {path} must be a table: [models.{name}.config]",
                                         param_hint="--config")
            own["user_config"] = config
        for key, value in table.items():
            field_name = _known(key, known - {"model"}, path, f" of [models.{name}]")
            if field_name not in PER_MODEL:
                raise click.BadParameter(f"{key!r} is a setting of the daemon, not of one model: move it out of "
                                         f"[models.{name}] in {path} (a model's own: "
                                         f"{', '.join(sorted(k.replace('_', '-') for k in PER_MODEL))})",
                                         param_hint="--config")
            own[field_name] = value
        out[name] = own
    return out


def _apply_sets(config: dict, sets: tuple[str, ...]) -> dict:
    """--set KEY=VALUE (KEY may be dotted: a.b=1 makes {"a": {"b": 1}}); VALUE is read as a TOML
    value (1, 2.5, true, "text", [1, 2]) and taken as text if it is none."""
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} should look like KEY=VALUE", param_hint="--set")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        *parents, leaf = [part.strip() for part in key.split(".")]
        node = config
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                node[part] = child = {}
            node = child
        node[leaf] = value
    return config


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
    """A ServeConfig as a TOML file that `serve --config` reads back to the same settings: the
    daemon's settings at the top, each model's own in its [models.NAME] table."""
    import tomli_w

    daemon = config.daemon.to_dict()
    top = {k.replace("_", "-"): v for k, v in daemon.items()
           if k not in HIDDEN and k not in PER_MODEL and v is not None}
    unset = [k.replace("_", "-") for k, v in daemon.items() if k not in HIDDEN and v is None]
    models = {}
    for m in config.models:
        settings = m.to_dict()
        table = {"model": m.model, **{k.replace("_", "-"): settings[k] for k in sorted(PER_MODEL)
                                      if settings[k] is not None}}
        if m.user_config:
            table["config"] = m.user_config
        models[m.model_name] = table
    doc = tomli_w.dumps({**top, "models": models})
    return "".join(f"# {key} = (not set)\n" for key in unset) + doc
