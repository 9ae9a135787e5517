"""Clients of an isopool supervisor: Client (sync, thread-safe) and AsyncClient (asyncio)."""

from .aio import AsyncClient
from .sync import Client

__all__ = ["Client", "AsyncClient"]
