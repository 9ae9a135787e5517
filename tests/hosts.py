"""Several hosts for the multi-host tests: daemons in network namespaces (isopool.bench.netns),
each on tcp:// with CURVE, and a client in this namespace.

Where namespaces cannot be made (no root, no iproute2), `Hosts` falls back to loopback
addresses 127.0.0.2, 127.0.0.3, ... and says why in `fallback`; a link then cannot be cut,
and the test that needs it is skipped with that reason. ISOPOOL_TEST_HOSTS=loopback chooses
the fallback (to run it where namespaces work).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from isopool.bench.netns import Network
from tests.helpers import ROOT, PoolProc, free_port

PORT = 5555


class Hosts:
    def __init__(self, tmp: Path, count: int):
        self.tmp, self.count = tmp, count
        self.pools: list[PoolProc] = []
        self.network = Network(count)
        if os.environ.get("ISOPOOL_TEST_HOSTS") == "loopback":
            self.fallback = "ISOPOOL_TEST_HOSTS=loopback"
        else:
            self.fallback = self.network.make()
        if self.fallback is not None:
            self.fallback += "; using loopback addresses instead of network namespaces"
        self.keys = self._keys()
        self.ports = {i: free_port() for i in range(1, count + 1)}

    def _keys(self) -> dict:
        keys = self.tmp / "keys"
        for name, directory in (("server", keys), ("client", self.tmp / "clients")):
            subprocess.run([sys.executable, "-m", "isopool.cli", "keygen", name, "--dir", str(directory)],
                           check=True, capture_output=True, timeout=60, cwd=ROOT)
        return {"server_secret": str(keys / "server.key_secret"), "clients": str(self.tmp / "clients"),
                "curve_secret_key": str(self.tmp / "clients" / "client.key_secret"),
                "curve_server_key": str(keys / "server.key")}

    def endpoint(self, i: int) -> str:
        if self.fallback is None:
            return f"tcp://{self.network.address(i)}:{PORT}"
        return f"tcp://127.0.0.{i + 1}:{self.ports[i]}"

    def client_kw(self) -> dict:
        return {"curve_secret_key": self.keys["curve_secret_key"], "curve_server_key": self.keys["curve_server_key"]}

    def start(self, *args: str) -> list[PoolProc]:
        """A daemon on every host (started together, then waited for)."""
        for i in range(1, self.count + 1):
            sub = self.tmp / f"host{i}"
            sub.mkdir(mode=0o700)
            self.pools.append(PoolProc(
                sub, ["--curve-secret-key", self.keys["server_secret"], "--curve-clients", self.keys["clients"],
                      *args], endpoint=self.endpoint(i), client_kw=self.client_kw(),
                prefix=self.network.prefix(i) if self.fallback is None else []))
        for pool in self.pools:
            pool.wait_ready()
        return self.pools

    def link(self, i: int, up: bool) -> None:
        assert self.fallback is None, self.fallback
        self.network.link(i, up)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        self.network.close()
