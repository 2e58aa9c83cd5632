"""Store selection: MongoDB when a URL is configured, otherwise SQLite in the data directory."""

from __future__ import annotations

import os

from yardmaster.server.backends.base import Store


def make_store(mongodb_url: str | None, data_dir: str) -> Store:
    if mongodb_url:
        from yardmaster.server.backends.mongo_store import MongoStore

        return MongoStore(mongodb_url)
    from yardmaster.server.backends.sqlite_store import SqliteStore

    return SqliteStore(os.path.join(data_dir, "yardmaster.db"))
