"""Hold N idle ZeroMQ connections to an endpoint until stdin closes (bench/bounds.py, tests/supervisor/test_fds.py).

A process of its own, so its descriptors are not the caller's: `python -m isopool.bench.idle_peers N ENDPOINT`.
Prints "up" once every socket is connecting; closes them all when stdin reaches its end.
"""

import resource
import sys

import zmq


def main() -> None:
    n, endpoint = int(sys.argv[1]), sys.argv[2]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 4 * n + 256)  # a mailbox and a connection per socket
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, n + 16)
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    print("up", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()
    ctx.term()


if __name__ == "__main__":
    main()
