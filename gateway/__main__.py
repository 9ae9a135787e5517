"""One gateway process: `python -m isopool.gateway`, started by the supervisor (supervisor/gateways.py).

It serves the listening socket it inherited (ISOPOOL_GATEWAY_FD; every gateway accepts on
the same one, the kernel spreads connections) with uvicorn on uvloop and httptools, and
calls the supervisor at ISOPOOL_GATEWAY_ENDPOINT. It dies with the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket

ENV_FD = "ISOPOOL_GATEWAY_FD"
ENV_ENDPOINT = "ISOPOOL_GATEWAY_ENDPOINT"
ENV_MAX_BODY = "ISOPOOL_GATEWAY_MAX_BODY"
PR_SET_PDEATHSIG = 1


def main() -> None:
    import uvicorn

    from .app import App

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # no gateway outlives its supervisor
    sock = socket.socket(fileno=int(os.environ[ENV_FD]))
    app = App(os.environ[ENV_ENDPOINT], max_body=int(os.environ.get(ENV_MAX_BODY, 256 << 20)))
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on", log_level="warning",
                            access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
