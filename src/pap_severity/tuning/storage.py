"""Where a study lives, the lock its budget is decided under, and whether a trial's worker lives.

- Default: a journal file, `tuning/<pipeline>/study.journal` (Optuna's JournalStorage with a
  JournalFileBackend: safe for several processes on one machine, unlike SQLite). The budget
  lock is a file lock beside it (`filelock`, an flock the kernel drops with a killed process).
- An RDB URL, `postgresql://user@host/db`, shared by workers on many machines: the budget
  lock is a PostgreSQL session advisory lock keyed by the study name (dropped with the
  connection of a dead worker). Every running trial sends a heartbeat each
  `tune.heartbeat_interval` seconds (`heartbeat`); a trial silent for `tune.grace_period`
  seconds is failed by the next worker that looks for work (Optuna's fail_stale_trials).
- Every trial records its worker (`this_worker`: machine, pid, process start time), so a
  worker on the same machine sees at once that a trial's process is gone (`worker_alive`),
  on a journal (no heartbeat) and on PostgreSQL alike.

A URL that cannot be used (unknown scheme, unreachable host, missing database) is a
ValueError naming the URL, its password hidden, and what to do.

SQLAlchemy 2.1 reads a bare `postgresql://` as the psycopg 3 driver, which is not installed;
`storage_url` rewrites it to `postgresql+psycopg2://` (psycopg2-binary is a dependency).
Tools that take the URL directly (optuna-dashboard, the `optuna` CLI) need that form spelled out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil
from filelock import FileLock

from pap_severity.tracking import redact

log = logging.getLogger(__name__)

STUDY_FILE = "study.journal"
WORKER_ATTR = "worker"
# Seconds to wait for a PostgreSQL server to answer before calling the URL unusable.
CONNECT_TIMEOUT = 10


def _machine_id() -> str:
    """Where a pid means one process: host name, boot time and pid namespace (two containers
    may share a host name and a kernel, never a pid namespace; psutil does not read namespaces)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pidns = "nons"
    return f"{socket.gethostname()}/{int(psutil.boot_time())}/{pidns}"


MACHINE = _machine_id()


def this_worker() -> dict:
    """This process as a trial records it."""
    return {"machine": MACHINE, "pid": os.getpid(), "start": psutil.Process().create_time()}


def worker_alive(worker: dict) -> bool | None:
    """Whether the process that ran a trial lives; None when it ran on another machine."""
    if worker.get("machine") != MACHINE:
        return None
    try:
        proc = psutil.Process(int(worker["pid"]))
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        start = worker.get("start")
        return start is None or abs(proc.create_time() - float(start)) < 1e-3  # else the pid was reused
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def storage_url(url: str) -> str:
    """An RDB URL with a driver SQLAlchemy can load: SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, while this project installs psycopg2 (psycopg2-binary)."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            import importlib.util

            if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
                return "postgresql+psycopg2://" + url[len(bare):]
            return "postgresql://" + url[len(bare):]
    return url


def _engine_kwargs(url: str) -> dict:
    """Pre-ping pooled connections; give up on a silent PostgreSQL host after CONNECT_TIMEOUT s."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql+psycopg2://") and "connect_timeout" not in url:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    return kwargs


class _PgLock:
    """A PostgreSQL session advisory lock keyed by a name (released if the worker dies)."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self._text = sqlalchemy.text
        kwargs = _engine_kwargs(url)
        kwargs.pop("pool_pre_ping")
        self.engine = sqlalchemy.create_engine(url, poolclass=NullPool, **kwargs)
        self.key = int.from_bytes(hashlib.sha256(f"pap-severity/{name}".encode()).digest()[:8], "big", signed=True)
        self._conn = None

    def __enter__(self):
        if self._conn is None:
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._conn.execute(self._text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        return self

    def __exit__(self, *exc) -> None:
        if self._conn is not None:
            self._conn.execute(self._text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.engine.dispose()


@dataclass
class Storage:
    """An opened study storage: Optuna's, the budget lock, and the RDBStorage (heartbeats) or None."""

    optuna: optuna.storages.BaseStorage
    lock: AbstractContextManager
    rdb: optuna.storages.RDBStorage | None
    url: str  # as given, or the journal file's path

    def close(self) -> None:
        if isinstance(self.lock, _PgLock):
            self.lock.close()
        if self.rdb is not None:
            self.rdb.engine.dispose()


def _unusable(url: str, exc: BaseException) -> ValueError:
    """One line for a storage URL that cannot be used: the URL without its password, why, what to do."""
    from sqlalchemy.exc import ArgumentError, OperationalError
    from urllib.parse import urlsplit

    cause = getattr(exc, "orig", None) or (exc.__cause__ if isinstance(exc, ImportError) else None) or exc
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    password = urlsplit(url).password if "://" in url else None
    if password:
        reason = reason.replace(password, "***")
    if isinstance(exc, (ImportError, ArgumentError, ValueError)):
        hint = ("give postgresql://user[:password]@host[:port]/database, sqlite:///file.db, or a journal file "
                "path (empty: tuning/<pipeline>/study.journal)")
    elif "database" in reason and "does not exist" in reason:
        hint = "create the database first (createdb -h HOST -U USER NAME) or fix its name in the URL"
    elif isinstance(exc, OperationalError):
        hint = "check the host, port, user and password, and that the server accepts connections from this machine"
    else:
        hint = "check the URL"
    return ValueError(f"cannot use the Optuna storage {redact(url)}: {reason}; {hint}")


def _open_rdb(url: str, study_name: str, heartbeat_interval: int, grace_period: int,
              on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]) -> Storage:
    from sqlalchemy.exc import SQLAlchemyError

    driver_url = storage_url(url)
    postgres = driver_url.startswith("postgresql")
    lock: Any = None
    try:
        # Under a lock for every study of the database: workers started together on an empty
        # database would race to create Optuna's tables (a unique violation in PostgreSQL).
        tables: Any = _PgLock(driver_url, "optuna-tables") if postgres else nullcontext()
        if driver_url.startswith("sqlite:///"):
            lock = FileLock(driver_url.removeprefix("sqlite:///").split("?", 1)[0] + ".budget.lock",
                            fallback_to_soft=False)
            tables = lock
        try:
            with tables, warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(
                    driver_url,
                    engine_kwargs=_engine_kwargs(driver_url),
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=on_stale,
                )
        finally:
            if isinstance(tables, _PgLock):
                tables.close()
        if postgres:
            lock = _PgLock(driver_url, study_name)
            with lock:  # connect now, so a refused connection is told here
                pass
    except (SQLAlchemyError, ImportError, ValueError) as exc:  # ValueError: a malformed URL
        if isinstance(lock, _PgLock):
            lock.close()
        raise _unusable(url, exc) from None
    if lock is None:  # no portable lock: the budget may overshoot by (workers - 1) trials
        log.warning("no budget lock for %s: the study may run up to one extra trial per worker", redact(url))
        lock = nullcontext()
    return Storage(rdb, lock, rdb, url)


def open_storage(url: str, default_journal: Path, study_name: str, *, heartbeat_interval: int, grace_period: int,
                 on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]) -> Storage:
    """An RDB storage for a URL (`scheme://...`), else the journal file at `url` or `default_journal`.

    on_stale: called by Optuna for a trial failed for want of heartbeats (RDB only).
    """
    if "://" in url:
        return _open_rdb(url, study_name, heartbeat_interval, grace_period, on_stale)
    path = Path(url) if url else default_journal
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    except OSError as exc:
        raise ValueError(f"cannot use the journal file {path}: {exc.strerror or exc}; give a writable path") from None
    # Not `<journal>.lock`: JournalFileBackend's own lock file has that name.
    lock = FileLock(path.with_name(path.name + ".budget.lock"), fallback_to_soft=False)
    return Storage(journal, lock, None, str(path))


@contextmanager
def heartbeat(rdb: optuna.storages.RDBStorage | None, study_name: str, number: int, interval: int) -> Iterator[None]:
    """Record the running trial's heartbeat in an RDB storage every `interval` seconds."""
    if rdb is None:
        yield
        return
    trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(study_name), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                rdb.record_heartbeat(trial_id)
            except Exception as exc:  # a database hiccup: try again at the next beat
                log.warning("heartbeat of trial %d failed: %s", number, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
