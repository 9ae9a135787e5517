"""Schema-driven fuzzing of the HTTP front (schemathesis): every route of its OpenAPI document,
with valid and invalid requests; no 5xx, no answer that breaks the document, no gateway crash."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from isopool.gateway import app, openapi
from isopool.gateway.auth import new_token
from tests.helpers import PoolProc, assert_replaced

TOKEN = new_token()
schema = schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module")
def fuzzed():
    """One pool for every operation: the default model (a declared signature) and a streaming one."""
    tmp = Path(tempfile.mkdtemp(prefix="iso-fuzz-"))
    tokens = tmp / "tokens"
    tokens.write_text(f"client {TOKEN}\n")
    tokens.chmod(0o600)
    pool = PoolProc(tmp, ["--model", "default=isopool.models.default:DefaultModel", "--model",
                          "count=isopool.examples.streaming:Countdown", "--workers", "1", "--http", "127.0.0.1:0",
                          "--http-workers", "2", "--http-tokens", str(tokens), "--max-message-bytes", "1MiB"])
    try:
        pool.wait_ready()
        pool.url = "http://" + pool.status()["pool"]["http"]
        yield pool
        gateways = pool.status()["pool"]["gateways"]
        assert [g["restarts"] for g in gateways] == [0, 0], gateways  # no input crashed a gateway
        assert_replaced(pool.status(), {})
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_every_route_is_in_the_openapi_document():
    documented = {(m.upper(), p.replace("/versions/{version}", "")) for p, ops in openapi.document()["paths"].items()
                  for m in ops}
    assert documented == set(app.ROUTES) - {("GET", "/openapi.json")}


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_no_input_gets_a_5xx_or_an_undocumented_answer(case, fuzzed):
    # Every check but positive_data_acceptance: a request can fit the schema and still be wrong
    # (data that does not fill its shape, a model that is not served), and that is a 400 or 404.
    case.call_and_validate(base_url=fuzzed.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                           excluded_checks=[positive_data_acceptance])
