"""Make an MLflow tracking store safe to open from several processes at once.

MLflow creates (and migrates) a SQLite store's schema the first time a process opens it, with
no locking between processes: two to five runs started together into a new ``sqlite:///`` store
race through the alembic migrations and all but one fail (``table ... already exists``,
``duplicate column name``, "Online migration expected to match one row"). :func:`prepare_store`
runs that set-up under a file lock next to the database, so one process creates the schema and
the others find it done.

mlflow is imported inside the function: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

SQLITE_PREFIX = "sqlite:///"
LOCK_TIMEOUT_S = 300.0  # creating a schema takes seconds; a stuck holder should not hang a sweep

_prepared: set[str] = set()
_guard = threading.Lock()


def _sqlite_path(uri: str) -> Path | None:
    """The database file a ``sqlite:///`` URI names, or None (another scheme, in-memory)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path).absolute()


def prepare_store(uri: str) -> None:
    """Create ``uri``'s schema, once, under a lock shared by every process; call it before a
    process first uses a tracking URI.

    For a ``sqlite:///`` URI: creates the database's folder, then, holding the file lock
    ``<database>.lock``, opens the store with an :class:`mlflow.MlflowClient`, which creates or
    migrates the tables if needed (later clients in this process reuse that store). Cheap when
    already done: a memo skips URIs this process prepared. Other schemes (http, postgresql, a
    file store): nothing to do.

    Raises ``filelock.Timeout`` (an ``OSError``) if the lock is not had in ``LOCK_TIMEOUT_S``.
    """
    path = _sqlite_path(uri)
    if path is None:
        return
    key = f"{uri}|{path}"  # a relative URI names another file in another working directory
    if key in _prepared:
        return
    with _guard:
        if key in _prepared:
            return
        from filelock import FileLock

        import mlflow

        # Importing the SQL store's modules is most of the cost of opening it (about 1 s):
        # done before the lock, processes do not queue behind each other's imports.
        with contextlib.suppress(ImportError):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            # Building the client builds the SqlAlchemyStore, whose __init__ creates the tables
            # and runs the migrations when they are missing; the call makes sure it happened.
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        _prepared.add(key)
