"""Store selection: MongoDB when a URL is configured, otherwise SQLite in the data directory.

Also the file modes of that directory: it holds the admin key, the SQLite file and its WAL
(job `env` values in clear), so it is 0700 and its files 0600 whatever the umask.
"""

from __future__ import annotations

import logging
import os

from yardmaster.server.backends.base import Store

log = logging.getLogger("yardmaster.store")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def ensure_private_dir(path: str) -> None:
    """Create `path` (with parents) if needed and make it 0700, also when it already existed."""
    os.makedirs(path, mode=PRIVATE_DIR_MODE, exist_ok=True)
    _chmod(path, PRIVATE_DIR_MODE)


def ensure_private_file(path: str, *, create: bool) -> None:
    """Make `path` 0600; create it empty first when `create` (never truncates an existing file)."""
    if create:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE))
    if os.path.exists(path):
        _chmod(path, PRIVATE_FILE_MODE)


def _chmod(path: str, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as exc:  # e.g. a directory owned by another user: say so, but keep serving
        log.warning("cannot make %s mode %o: %s", path, mode, exc.strerror or exc)


def make_store(mongodb_url: str | None, data_dir: str) -> Store:
    if mongodb_url:
        from yardmaster.server.backends.mongo_store import MongoStore

        return MongoStore(mongodb_url)
    from yardmaster.server.backends.sqlite_store import SqliteStore

    return SqliteStore(os.path.join(data_dir, "yardmaster.db"))
