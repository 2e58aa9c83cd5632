"""Yardmaster wire protocol: pure, sans-I/O. Nothing here touches sockets, asyncio or storage."""

PROTOCOL_VERSION = 1
