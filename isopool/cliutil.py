"""What every `isopool` command shares: the endpoint option, the client, one-line failures."""

from __future__ import annotations

import sys

import click

from isopool.protocol.endpoints import ENV_ENDPOINT

from .serveconfig import ENDPOINT_HELP

EXIT_UNREACHABLE = 1
endpoint_option = click.option("--endpoint", "-e", envvar=ENV_ENDPOINT, default=None, help=ENDPOINT_HELP)


def _client(endpoint: str | None, timeout: float = 30.0):
    from isopool.client import Client

    try:
        return Client(endpoint, timeout=timeout)
    except ValueError as exc:  # a malformed endpoint, a bad key file
        _fail(exc, code=2)


# the Python client's words for a setting, and what the CLI calls it
CLI_WORDS = (("raise the client's timeout=", "raise --timeout"), ("or raise timeout=", "or raise --timeout"))


def _fail(exc: Exception, code: int = 1) -> None:
    text = str(exc)
    for python, flag in CLI_WORDS:
        text = text.replace(python, flag)
    click.echo(f"isopool: {type(exc).__name__}: {text}", err=True)
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        click.echo(f"remote traceback:{cause}", err=True)
    sys.exit(code)
