"""Hosts as network namespaces, joined to this one by veth links (the multi-host tests and bench).

    this namespace                       host i (namespace <tag>h<i>)
        <tag>r<i>  198.18.i.1/24  ═══veth═══  <tag>n<i>  198.18.i.2/24

198.18.0.0/15 is set aside for benchmarking networks (RFC 2544): nothing real lives there.
Making them needs root and iproute2; `Network.make` says why it could not.
"""

from __future__ import annotations

import os
import shutil
import subprocess

MADE = iter(range(100))  # each Network its own names, even while an earlier one's winds down


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Network:
    def __init__(self, count: int):
        self.count = count
        self.tag = f"iso{os.getpid() % 10000}{next(MADE)}"  # + r/n + i: within the 15 bytes of a link name
        self.names: list[str] = []

    def make(self) -> str | None:
        """Make the namespaces and links; why they could not be made, else None."""
        if shutil.which("ip") is None or os.geteuid() != 0:
            return "network namespaces need root and iproute2 (ip)"
        for i in range(1, self.count + 1):
            ns, outer, inner = f"{self.tag}h{i}", f"{self.tag}r{i}", f"{self.tag}n{i}"
            self.names.append(ns)  # removed at close, even if a later step fails
            for step in [("netns", "add", ns), ("link", "add", outer, "type", "veth", "peer", "name", inner),
                         ("link", "set", inner, "netns", ns), ("addr", "add", f"198.18.{i}.1/24", "dev", outer),
                         ("link", "set", outer, "up"),
                         ("netns", "exec", ns, "ip", "addr", "add", f"198.18.{i}.2/24", "dev", inner),
                         ("netns", "exec", ns, "ip", "link", "set", inner, "up"),
                         ("netns", "exec", ns, "ip", "link", "set", "lo", "up")]:
                out = ip(*step)
                if out.returncode != 0:
                    self.close()
                    return f"cannot create network namespaces here (ip {' '.join(step)}: {out.stderr.strip()})"
        return None

    def address(self, i: int) -> str:
        return f"198.18.{i}.2"

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program on host i."""
        return ["ip", "netns", "exec", self.names[i - 1]]

    def link(self, i: int, up: bool) -> None:
        """Cut (or mend) host i's link, at the host's end, as a pulled cable: this end keeps its
        route but loses its carrier, so packets are dropped and nothing is told to anyone."""
        out = ip("netns", "exec", self.names[i - 1], "ip", "link", "set", f"{self.tag}n{i}", "up" if up else "down")
        if out.returncode != 0:
            raise RuntimeError(f"cannot set host {i}'s link {'up' if up else 'down'}: {out.stderr.strip()}")

    def close(self) -> None:
        for i, ns in enumerate(self.names, 1):
            ip("link", "del", f"{self.tag}r{i}")  # both ends of the link
            ip("netns", "del", ns)
        self.names = []
