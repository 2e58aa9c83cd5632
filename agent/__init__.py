"""Yardmaster host agent: runs jobs assigned over a WebSocket and streams their output back."""

__version__ = "0.1.0"
