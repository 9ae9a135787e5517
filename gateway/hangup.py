"""A request whose connection is lost before its answer is withdrawn, not run for nobody.

The connection (connection.py) gives each request a list under scope["extensions"][HANGUP_KEY]
and calls what is in it when the connection is lost before that request is answered: reset
by the peer, or failing. A peer that only ends its stream (FIN: close() or shutdown(SHUT_WR))
cannot be told from one that half-closes after its request and still reads (`nc -N`), which
is answered (connection.py: eof_received): its request runs on, bounded by its deadline.
`until_hangup` puts the request task's cancel there while it awaits the pool: the client's
call is cancelled, which sends the supervisor a CANCEL (the worker is told, the request
leaves the queue), and the route raises ClientGone, answered with 499 to nobody (nginx's
"client closed request", which is what the metrics and the access log then count). A
callback, not a task reading receive(): nothing is spent on a request whose client stays.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

HANGUP_KEY = "isopool.hangup"  # scope["extensions"]: a list of callables, called on a hang-up


class ClientGone(Exception):
    """The client hung up before its answer: its call was withdrawn."""

    status = 499


async def until_hangup(scope: dict, call: Awaitable[Any]) -> Any:
    """Await `call`, withdrawn (ClientGone) if the client hangs up first."""
    hangup = scope.get("extensions", {}).get(HANGUP_KEY)
    if hangup is None:  # another server, or a stream of ours: awaited as it is
        return await call
    task = asyncio.current_task()
    gone = []

    def cancel() -> None:
        gone.append(True)
        task.cancel("the client hung up")

    hangup.append(cancel)
    try:
        return await call
    except asyncio.CancelledError:
        if not gone:
            raise
        if hasattr(task, "uncancel"):  # 3.11+: ours, and handled here, so an outer cancel scope must not count it
            task.uncancel()
        raise ClientGone("the client hung up before its answer; the request was withdrawn") from None
    finally:
        hangup.remove(cancel)
