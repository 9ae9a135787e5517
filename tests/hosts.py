"""Several hosts for the multi-host tests: network namespaces joined to this one by veth links.

    this namespace (the client)          host i (namespace iso<pid><n>h<i>)
        iso<pid>r<i>  198.18.i.1/24  ═══veth═══  iso<pid>n<i>  198.18.i.2/24   isopool serve on tcp:// with CURVE

198.18.0.0/15 is the range set aside for benchmarking networks (RFC 2544): nothing real
lives there. Where namespaces cannot be made (no root, no iproute2), `Hosts` falls back to
loopback addresses 127.0.0.2, 127.0.0.3, ... and says why in `fallback`; a link then cannot
be cut, and the test that needs it is skipped with that reason. ISOPOOL_TEST_HOSTS=loopback
chooses the fallback (to run it where namespaces work).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, PoolProc, free_port

PORT = 5555
MADE = iter(range(100))  # each Hosts its own names, even while an earlier one's namespaces wind down


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Hosts:
    def __init__(self, tmp: Path, count: int):
        self.tmp, self.count = tmp, count
        self.tag = f"iso{os.getpid() % 10000}{next(MADE)}"  # + r/n + i: within the 15 bytes of a link name
        self.names: list[str] = []
        self.pools: list[PoolProc] = []
        self.fallback = self._namespaces()
        self.keys = self._keys()

    def _namespaces(self) -> str | None:
        """Make the namespaces and links; the reason they could not be made, else None."""
        if os.environ.get("ISOPOOL_TEST_HOSTS") == "loopback":
            return "ISOPOOL_TEST_HOSTS=loopback: using loopback addresses instead of network namespaces"
        if shutil.which("ip") is None or os.geteuid() != 0:
            return "network namespaces need root and iproute2 (ip); using loopback addresses instead"
        for i in range(1, self.count + 1):
            ns, outer, inner = f"{self.tag}h{i}", f"{self.tag}r{i}", f"{self.tag}n{i}"
            steps = [("netns", "add", ns), ("link", "add", outer, "type", "veth", "peer", "name", inner),
                     ("link", "set", inner, "netns", ns), ("addr", "add", f"198.18.{i}.1/24", "dev", outer),
                     ("link", "set", outer, "up"),
                     ("netns", "exec", ns, "ip", "addr", "add", f"198.18.{i}.2/24", "dev", inner),
                     ("netns", "exec", ns, "ip", "link", "set", inner, "up"),
                     ("netns", "exec", ns, "ip", "link", "set", "lo", "up")]
            self.names.append(ns)  # removed at close, even if a later step fails
            for step in steps:
                out = _ip(*step)
                if out.returncode != 0:
                    self.close_network()
                    return (f"cannot create network namespaces here (ip {' '.join(step)}: {out.stderr.strip()}); "
                            "using loopback addresses instead")
        return None

    def _keys(self) -> dict:
        keys = self.tmp / "keys"
        for name, directory in (("server", keys), ("client", self.tmp / "clients")):
            subprocess.run([sys.executable, "-m", "isopool.cli", "keygen", name, "--dir", str(directory)],
                           check=True, capture_output=True, timeout=60, cwd=ROOT)
        return {"server_secret": str(keys / "server.key_secret"), "clients": str(self.tmp / "clients"),
                "curve_secret_key": str(self.tmp / "clients" / "client.key_secret"),
                "curve_server_key": str(keys / "server.key")}

    def address(self, i: int) -> str:
        return f"198.18.{i}.2" if self.fallback is None else f"127.0.0.{i + 1}"

    def endpoint(self, i: int) -> str:
        port = PORT if self.fallback is None else self.ports[i]
        return f"tcp://{self.address(i)}:{port}"

    def start(self, *args: str) -> list[PoolProc]:
        """A daemon on every host (started together, then waited for)."""
        self.ports = {i: free_port() for i in range(1, self.count + 1)}
        for i in range(1, self.count + 1):
            sub = self.tmp / f"host{i}"
            sub.mkdir(mode=0o700)
            prefix = ["ip", "netns", "exec", self.names[i - 1]] if self.fallback is None else []
            self.pools.append(PoolProc(
                sub, ["--curve-secret-key", self.keys["server_secret"], "--curve-clients", self.keys["clients"],
                      *args], endpoint=self.endpoint(i), prefix=prefix,
                client_kw={"curve_secret_key": self.keys["curve_secret_key"],
                           "curve_server_key": self.keys["curve_server_key"]}))
        for pool in self.pools:
            pool.wait_ready()
        return self.pools

    def client_kw(self) -> dict:
        return {"curve_secret_key": self.keys["curve_secret_key"], "curve_server_key": self.keys["curve_server_key"]}

    def link(self, i: int, up: bool) -> None:
        """Cut (or mend) host i's link, at the host's end, as a pulled cable: this end keeps its
        route but loses its carrier, so packets are dropped and nothing is told to anyone."""
        assert self.fallback is None, self.fallback
        out = _ip("netns", "exec", self.names[i - 1], "ip", "link", "set", f"{self.tag}n{i}", "up" if up else "down")
        assert out.returncode == 0, out.stderr

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        self.close_network()

    def close_network(self) -> None:
        for i, ns in enumerate(self.names, 1):
            _ip("link", "del", f"{self.tag}r{i}")  # both ends of the link
            _ip("netns", "del", ns)
        self.names = []
