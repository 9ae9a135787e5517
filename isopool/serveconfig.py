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
    ("model", str, "The model: MODULE:ATTR, a class or factory called once per worker."),
    ("workers", int, "Number of worker processes."),
    ("endpoint", str, ENDPOINT_HELP),
    ("devices", str, "Devices to spread workers over: cpu, cuda, cuda:0,cuda:1 or auto."),
    ("threads", int, "torch intra-op threads per worker (0: the cores divided by the workers)."),
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
    ("log-rate", str, "Bytes a second of each worker's output that are logged (e.g. 128KiB; "
                      "0: no limit); the rest are dropped and counted in status and metrics."),
    ("max-message-bytes", str, "Largest accepted message (e.g. 256MiB)."),
    ("max-depth", int, "Deepest accepted nesting of lists and maps in a payload."),
    ("max-elements", int, "Most array elements plus container items accepted in one payload."),
    ("arrays", click.Choice(["auto", "numpy", "torch"]), "How the model receives arrays."),
    ("metrics-port", int, "Serve Prometheus metrics at http://HOST:PORT/metrics (0: off)."),
    ("metrics-host", str, "Address for --metrics-port (127.0.0.1: loopback only)."),
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


COMMON = ("model", "workers", "endpoint")  # the flags most people give: listed first in --help
# then these, in this order; the rest (tuning, limits, security) after them as SERVE_OPTIONS has them
FREQUENT = ("devices", "max-batch-size", "max-batch-wait-ms", "request-timeout", "max-queue", "max-rss",
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


def _option(name: str, typ: Any, help_text: str):
    default = _default_text(name)
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
PER_MODEL = {"workers", "devices", "threads", "max_queue", "prefetch", "max_batch_size", "max_batch_wait_ms",
             "request_timeout", "max_attempts", "max_requests", "max_requests_jitter", "max_rss", "arrays",
             "isolation", "preload", "start_timeout", "integrity_interval", "integrity_every_request"}
HIDDEN = {"model", "model_name", "user_config"}  # written in the [models.NAME] table, not as top-level keys


def load_config(path: str | None, flags: dict[str, Any], sets: tuple[str, ...] = ()):
    """Defaults < TOML file < flags (and --set for the model's config). Unknown keys and bad
    values name the key."""
    from isopool.supervisor.config import PoolConfig
    from isopool.supervisor.devices import parse_devices

    known = {f.name for f in fields(PoolConfig)} - {"model_name", "user_config"}  # `model` is a flag: a key too
    values: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
        models = data.pop("models", None)
        data = data.get("isopool", data)
        if models is None:
            models = data.pop("models", None)
        if "user-config" in data or "user_config" in data:  # the older spelling of [models.default.config]
            values["user_config"] = data.pop("user-config", None) or data.pop("user_config", None) or {}
        for key, value in data.items():
            values[_known(key, known, path)] = value
        if models is not None:
            values.update(_model_table(models, path, known))
    values.update({k: v for k, v in flags.items() if v is not None})
    if sets:
        values["user_config"] = _apply_sets(dict(values.get("user_config") or {}), sets)
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


def _known(key: str, known: set[str], path: str, where: str = "") -> str:
    name = key.replace("-", "_")
    if name not in known:
        raise click.BadParameter(f"unknown key {key!r}{where} in {path}; known keys: "
                                 f"{', '.join(sorted(k.replace('_', '-') for k in known))}", param_hint="--config")
    return name


def _model_table(models: Any, path: str, known: set[str]) -> dict[str, Any]:
    """The settings of the one [models.NAME] table."""
    if not isinstance(models, dict) or not all(isinstance(t, dict) for t in models.values()):
        raise click.BadParameter(f"[models] in {path} must hold tables, as [models.default] with model = "
                                 "\"MODULE:ATTR\"", param_hint="--config")
    if len(models) != 1:
        raise click.BadParameter(f"{path} names {len(models)} models ({', '.join(models) or 'none'}); this "
                                 "daemon serves one: keep one [models.NAME] table, and run a daemon per model",
                                 param_hint="--config")
    (name, table), = models.items()
    table = dict(table)
    out: dict[str, Any] = {"model_name": name}
    if "model" in table:
        out["model"] = table.pop("model")
    config = table.pop("config", None)
    if config is not None:
        if not isinstance(config, dict):
            raise click.BadParameter(f"[models.{name}] config in {path} must be a table: [models.{name}.config]",
                                     param_hint="--config")
        out["user_config"] = config
    for key, value in table.items():
        field_name = _known(key, known - {"model"}, path, f" of [models.{name}]")
        if field_name not in PER_MODEL:
            raise click.BadParameter(f"{key!r} is a setting of the daemon, not of one model: move it out of "
                                     f"[models.{name}] in {path} (a model's own: "
                                     f"{', '.join(sorted(k.replace('_', '-') for k in PER_MODEL))})",
                                     param_hint="--config")
        out[field_name] = value
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
    """The configuration as a TOML file that `serve --config` reads back to the same settings."""
    import tomli_w

    settings = config.to_dict()
    top = {k.replace("_", "-"): v for k, v in settings.items() if k not in HIDDEN and v is not None}
    unset = [k.replace("_", "-") for k, v in settings.items() if k not in HIDDEN and v is None]
    model = {"model": config.model}
    if config.user_config:
        model["config"] = config.user_config
    doc = tomli_w.dumps({**top, "models": {config.model_name: model}})
    return "".join(f"# {key} = (not set)\n" for key in unset) + doc
