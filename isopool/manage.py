"""The `isopool` commands that manage a running daemon: its models, workers and keys.

    isopool models | load NAME=MODULE:ATTR | unload NAME | scale N | reload | stop | keygen NAME
"""

from __future__ import annotations

import json
from typing import Any

import click

from .cliutil import _client, _fail, endpoint_option


# ---------------------------------------------------------------- keys


@click.command()
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory to write the two key files in (created 0700 if missing).")
@click.option("--http-tokens", "tokens_file", type=click.Path(dir_okay=False), default=None,
              help="Instead of a CURVE pair, add a bearer token for NAME to this --http-tokens file "
                   "(created 0600) and print it. [default: none]")
@click.option("--admin", is_flag=True, help="With --http-tokens: an admin token (may load and unload models). [default: off]")
def keygen(name: str, directory: str, tokens_file: str | None, admin: bool) -> None:
    """Write a CURVE key pair: NAME.key (public: share it) and NAME.key_secret (keep it private).

    The server uses its .key_secret (--curve-secret-key); clients use their own .key_secret
    and the server's .key ($ISOPOOL_CURVE_SECRET_KEY, $ISOPOOL_CURVE_SERVER_KEY). Put client
    .key files in the server's --curve-clients or --curve-admins directory to let them in.

    With --http-tokens FILE, add a bearer token for the HTTP front instead: a running
    daemon's gateways read the file again when it changes.
    """
    import os

    if tokens_file is not None:
        from isopool.gateway.auth import new_token

        token = new_token()
        fd = os.open(tokens_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{'admin' if admin else 'client'} {token}  # {name}\n")
        click.echo(token)
        return
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


model_option = click.option("--model", "-m", "model", default=None,
                            help="The model, by name (needed when the daemon serves several). [default: the only one]")


@click.command()
@endpoint_option
@model_option
@click.argument("workers", type=click.IntRange(min=1))
def scale(endpoint: str | None, model: str | None, workers: int) -> None:
    """Change the number of workers of a model at runtime."""
    _control(endpoint, "scale", workers=workers, **({"model": model} if model else {}))


@click.command()
@endpoint_option
@click.option("--model", "-m", "model", default=None,
              help="Reload only this model. [default: every model]")
def reload(endpoint: str | None, model: str | None) -> None:
    """Replace every worker one at a time (picks up new code and weights); no request fails."""
    _control(endpoint, "reload", **({"model": model} if model else {}))


@click.command()
@endpoint_option
@click.argument("spec", metavar="NAME=MODULE:ATTR")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Its worker count. [default: --workers of the daemon]")
def load(endpoint: str | None, spec: str, workers: int | None) -> None:
    """Start serving a model while serving the others.

    Requests to it queue until its first worker is ready. Under a NAME already served, its
    workers roll over to the new implementation with no failed request.
    """
    name, sep, target = spec.partition("=")
    if not sep or not name or ":" not in target:
        raise click.BadParameter(f"{spec!r} should look like NAME=MODULE:ATTR", param_hint="NAME=MODULE:ATTR")
    _control(endpoint, "load", name=name, model=target, **({"workers": workers} if workers else {}))


@click.command()
@endpoint_option
@click.argument("name")
def unload(endpoint: str | None, name: str) -> None:
    """Stop serving a model: its queued and running requests are answered, then its workers stop."""
    _control(endpoint, "unload", name=name)


@click.command()
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the models map as JSON.")
def models(endpoint: str | None, as_json: bool) -> None:
    """List the models served: name, implementation, workers and readiness."""
    from isopool.errors import IsopoolError

    with _client(endpoint, 10.0) as client:
        try:
            served = client.models()
        except IsopoolError as exc:
            _fail(exc)
    if as_json:
        click.echo(json.dumps(served))
        return
    for name, m in served.items():
        click.echo(f"{name}\t{m['model']}\t{m['workers_ready']}/{m['workers_target']} ready\t{m['phase']}\t"
                   + ("healthy" if m["healthy"] else "unhealthy: " + m["health_reason"]))


@click.command()
@endpoint_option
def stop(endpoint: str | None) -> None:
    """Drain and stop the supervisor, like SIGTERM."""
    _control(endpoint, "stop")


def register(group: click.Group) -> None:
    for command in (models, load, unload, scale, reload, stop, keygen):
        group.add_command(command)
