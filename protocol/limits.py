"""Decode limits. Each is a named setting; the error it raises says which one to raise."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 256 * MiB  # whole message, all frames (ZeroMQ MAXMSGSIZE per frame too)
    max_header_bytes: int = 64 * 1024
    max_depth: int = 32  # nesting of lists/maps in a payload
    max_elements: int = 2**28  # array elements plus container items in one payload
    max_buffers: int = 4096  # array frames in one message
    holder: str = "server"  # whose limits these are: "client" for what a client decodes

    def flag(self, name: str) -> str:
        """How to raise limit `name`, for error messages: the server's flag, or the client's option."""
        if self.holder == "client":
            return f"Client(limits=Limits({name}=...)) in this client"
        return "--" + name.replace("_", "-") + " on the server"


DEFAULT_LIMITS = Limits()
CLIENT_LIMITS = Limits(holder="client")  # what a client decodes, unless given its own
