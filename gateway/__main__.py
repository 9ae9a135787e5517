"""One gateway process: `python -m isopool.gateway`, started by the supervisor (supervisor/gateways.py).

It serves the listening socket it inherited (ISOPOOL_GATEWAY_FD; every gateway accepts on
the same one, the kernel spreads connections) with uvicorn on uvloop and httptools, and
calls the supervisor at ISOPOOL_GATEWAY_ENDPOINT. It dies with the supervisor. Each
connection is a GuardedHttp (connection.py): uvicorn's protocol with every client's time,
memory and reading bounded; a large binary infer body is read straight into shared memory
(body.py), not through ASGI messages.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket

from .connection import KEEP_ALIVE_S, MAX_CONNECTIONS, GuardedHttp

ENV_FD = "ISOPOOL_GATEWAY_FD"
ENV_ENDPOINT = "ISOPOOL_GATEWAY_ENDPOINT"
ENV_MAX_BODY = "ISOPOOL_GATEWAY_MAX_BODY"
ENV_TOKENS = "ISOPOOL_GATEWAY_TOKENS"
ENV_CERT, ENV_KEY = "ISOPOOL_GATEWAY_CERT", "ISOPOOL_GATEWAY_KEY"
ENV_ACCESS_LOG = "ISOPOOL_GATEWAY_ACCESS_LOG"
ENV_LOG = "ISOPOOL_GATEWAY_LOG"  # LEVEL:FORMAT, as the daemon logs
ENV_CLIENT_TIMEOUT = "ISOPOOL_GATEWAY_CLIENT_TIMEOUT"
PR_SET_PDEATHSIG = 1


def main() -> None:
    import uvicorn

    from isopool.logs import setup_logging

    from .app import App
    from .auth import Tokens
    from .metrics import ENV_DIR, HttpMetrics

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # no gateway outlives its supervisor
    level, _, fmt = os.environ.get(ENV_LOG, "info:text").partition(":")
    setup_logging(level, fmt)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # each connection may hold its socket and a body's segment (body.py), and 503s need an fd to accept
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * MAX_CONNECTIONS + 256)), hard))
    sock = socket.socket(fileno=int(os.environ[ENV_FD]))
    GuardedHttp.timeout_s = client_timeout = float(os.environ.get(ENV_CLIENT_TIMEOUT, GuardedHttp.timeout_s))
    tokens = Tokens(os.environ[ENV_TOKENS]) if os.environ.get(ENV_TOKENS) else None
    app = App(os.environ[ENV_ENDPOINT], max_body=int(os.environ.get(ENV_MAX_BODY, 256 << 20)), tokens=tokens,
              metrics=HttpMetrics() if os.environ.get(ENV_DIR) else None,
              access_log=os.environ.get(ENV_ACCESS_LOG) == "1", body_timeout=client_timeout)
    GuardedHttp.direct_app = app
    # ws="none": the API has no websocket route, and an upgrade the app does not accept was a 500
    config = uvicorn.Config(app, loop="uvloop", http=GuardedHttp, ws="none", lifespan="on", log_level=logging.WARNING,
                            access_log=False, log_config=None, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=5, limit_concurrency=MAX_CONNECTIONS,
                            ssl_certfile=os.environ.get(ENV_CERT) or None, ssl_keyfile=os.environ.get(ENV_KEY) or None)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
