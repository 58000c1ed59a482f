"""The durable certification queue: one job per version identity, sqlite or PostgreSQL.

**Identity.** A job is keyed by (model name, version, the version's registry creation timestamp
in ms, policy SHA-256). A model deleted and re-created gets a new v1 with a new creation
timestamp, hence a new job; a redelivered webhook for the same version finds its job.

**Guarantees.** MLflow delivers webhooks at least once (plus retries) and keeps nothing, and
the reconciliation loop re-offers every version without a current certificate, so the same
version is offered many times: `enqueue` is idempotent (``duplicate`` for a job that is queued,
running or done), so each version identity is certified once. Workers `claim` a job under a
*lease* (``lease_s``) that they renew while they work (`renew`); a worker that dies stops
renewing and, once the lease has expired, the job is claimed again by another worker (or the
same one after a restart). `finish`/`fail`/`retry_later` are fenced by the worker id: a worker
whose lease was taken over cannot overwrite the new owner's result. Together with idempotent
certification (the worker skips a version that already carries a current certificate) this
gives exactly one certificate per version identity under at-least-once delivery; only a worker
that is partitioned away longer than its lease while still certifying can race the new owner
(both write a certificate for the same version; the newer one stands).

**Nothing is lost.** A job that fails ends ``failed`` with ``retry_at`` set: `claim` takes
it again when that time comes (capped exponential backoff, set by the worker; only a job whose
version identity no longer exists gets none); a new delivery re-queues a failed job at once
(``requeued``); on-demand re-certification (``force=True``) queues a finished job again, marks a
queued one forced, or marks a running one to run once more when it ends — a forced request
always ends in a forced run.

Backends: ``open_queue("jobs.db")`` (sqlite, the embedded default: one process; it holds an
exclusive lock on ``jobs.db.lock`` while open, so a second process — e.g. ``serve`` plus
``serve --worker-only`` on the same file — is refused with QueueError instead of re-queueing the
first one's running jobs; jobs a crash left running are re-queued when it opens. Several
workers need the PostgreSQL queue) and ``open_queue("postgresql://user@host/db")``
(psycopg 3; many workers on many machines: ``SELECT … FOR UPDATE SKIP LOCKED`` hands each job
to exactly one worker). Times are wall-clock seconds of the machine that writes them: keep the
clocks of the workers sharing a PostgreSQL queue in sync (NTP), well within ``lease_s``.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from robust_cert.errors import RobustCertError

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock (the sqlite queue is one process anyway)
    fcntl = None

TABLE = "robust_cert_jobs"
COLUMNS = ("id, name, version, version_created, policy_sha256, state, attempts, failures, "
           "force, rerun, delivery_id, worker, lease_until, retry_at, verdict, run_id, error, "
           "updated_at")
STATES = ("queued", "running", "done", "failed")
DEFAULT_LEASE_S = 300.0


class QueueError(RobustCertError):
    """The job queue cannot be opened or reached (bad URL, database down, missing driver)."""


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    version: str
    version_created: int
    policy_sha256: str
    state: str
    attempts: int  # attempts in the current round (reset when a failed job is retried)
    failures: int  # rounds that ended failed
    force: bool  # on-demand: certify even if the version already has a current certificate
    rerun: bool  # asked for again while running: queue once more when this run ends
    delivery_id: str | None = None
    worker: str | None = None
    lease_until: float | None = None
    retry_at: float | None = None
    verdict: str | None = None
    run_id: str | None = None
    error: str | None = None
    updated_at: float | None = None

    @property
    def identity(self) -> tuple[str, str, int, str]:
        return self.name, self.version, self.version_created, self.policy_sha256


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobQueue(ABC):
    """Common logic; subclasses supply the connection and the claim statement.

    Thread-safe: one connection per queue object, each method one short transaction under a
    lock. Every state change is a single conditional UPDATE, so concurrent writers (threads or
    machines) cannot lose one another's changes."""

    param = "?"

    def __init__(self, lease_s: float = DEFAULT_LEASE_S):
        self.lease_s = float(lease_s)
        self._lock = threading.RLock()
        self.recovered = 0

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _execute(self, sql: str, params: tuple = ()) -> tuple[int, list[tuple]]:
        """Run one statement in its own transaction: (rowcount, rows)."""

    @abstractmethod
    def _claim_sql(self) -> str:
        """The backend's statement that claims the oldest due job (row locks where it has
        them)."""

    @abstractmethod
    def describe(self) -> str:
        """One line naming the backend and where the queue lives (no credentials)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (and the sqlite file lock)."""

    # -- helpers ---------------------------------------------------------------------------
    def _q(self, sql: str) -> str:
        return sql if self.param == "?" else sql.replace("?", self.param)

    def _run(self, sql: str, *params) -> tuple[int, list[tuple]]:
        with self._lock:
            return self._execute(self._q(sql), params)

    @staticmethod
    def _job(row) -> Job:
        (id_, name, version, created, policy, state, attempts, failures, force, rerun,
         delivery, worker, lease, retry, verdict, run_id, error, updated) = row
        return Job(int(id_), name, version, int(created), policy, state, int(attempts),
                   int(failures), bool(force), bool(rerun), delivery, worker, lease, retry,
                   verdict, run_id, error, updated)

    # -- producers ---------------------------------------------------------------------------
    def enqueue(self, name: str, version: str, version_created: int, policy_sha256: str,
                delivery_id: str | None = None, *, force: bool = False) -> str:
        """Offer a version identity; returns what happened:

        ``queued``: a new job. ``requeued``: a failed job queued again at once (any new
        offer), or, with ``force`` (on-demand re-certification), a finished job queued again /
        a queued job marked forced / a running job marked to run once more. ``duplicate``:
        nothing to do — the job is queued, running or done (and not forced), or, with
        ``force``, already queued forced. A forced offer always leaves a forced job (one that
        certifies even a version with a current certificate), and a later plain offer never
        clears that."""
        now = time.time()
        key = (name, str(version), int(version_created), policy_sha256)
        n, _ = self._run(
            f"INSERT INTO {TABLE} (name, version, version_created, policy_sha256, force, "
            "delivery_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name, version, version_created, policy_sha256) DO NOTHING",
            *key, int(force), delivery_id, now, now)
        if n == 1:
            return "queued"
        where = "name=? AND version=? AND version_created=? AND policy_sha256=?"
        # (each statement is atomic; the job may change state between them — a worker claims
        # or ends it — so a forced offer tries again until one applies or it is already forced)
        for _ in range(3):
            now = time.time()
            n, _ = self._run(
                f"UPDATE {TABLE} SET state='queued', attempts=0, not_before=0, retry_at=NULL, "
                f"worker=NULL, lease_until=NULL, force=CASE WHEN ?=1 THEN 1 ELSE force END, "
                f"delivery_id=COALESCE(?, delivery_id), updated_at=? "
                f"WHERE {where} AND (state='failed' OR (? = 1 AND state='done'))",
                int(force), delivery_id, now, *key, int(force))
            if n == 1:
                return "requeued"
            if not force:
                return "duplicate"
            n, _ = self._run(f"UPDATE {TABLE} SET force=1, "
                             f"delivery_id=COALESCE(?, delivery_id), updated_at=? "
                             f"WHERE {where} AND state='queued' AND force=0",
                             delivery_id, now, *key)
            if n == 1:
                return "requeued"
            n, _ = self._run(f"UPDATE {TABLE} SET rerun=1, updated_at=? "
                             f"WHERE {where} AND state='running'", now, *key)
            if n == 1:
                return "requeued"
            _, rows = self._run(f"SELECT state, force FROM {TABLE} WHERE {where}", *key)
            if rows and rows[0][0] == "queued" and rows[0][1]:
                return "duplicate"  # already queued forced
        return "duplicate"  # unreachable in practice: the job changed state three times

    # -- workers -----------------------------------------------------------------------------
    def claim(self, worker: str) -> Job | None:
        """Take the oldest due job for ``worker`` under a lease of ``lease_s``: a queued job
        whose ``not_before`` has come, a failed one whose ``retry_at`` has come (a new round:
        attempts start again at 1), or a running one whose lease expired (its worker died).
        Each job goes to exactly one claimer."""
        now = time.time()
        with self._lock:
            _, rows = self._execute(self._q(self._claim_sql()),
                                    (worker, now + self.lease_s, now, now, now, now))
        return self._job(rows[0]) if rows else None

    def renew(self, job_id: int, worker: str) -> bool:
        """Extend the lease; False when the job is no longer this worker's (stop working)."""
        now = time.time()
        n, _ = self._run(f"UPDATE {TABLE} SET lease_until=?, updated_at=? "
                         "WHERE id=? AND worker=? AND state='running'",
                         now + self.lease_s, now, job_id, worker)
        return n == 1

    def _end(self, job_id: int, worker: str, assignments: str, *values) -> bool:
        """Apply the end of a run if ``worker`` still holds the job; a run asked for again
        meanwhile (``rerun``) is queued once more instead of ending."""
        held = "WHERE id=? AND worker=? AND state='running'"
        for _ in range(2):  # a second time only if a rerun was asked for between the two
            now = time.time()
            n, _ = self._run(
                f"UPDATE {TABLE} SET state='queued', rerun=0, force=1, attempts=0, "
                f"not_before=0, retry_at=NULL, worker=NULL, lease_until=NULL, updated_at=? "
                f"{held} AND rerun=1", now, job_id, worker)
            if n == 1:
                return True
            n, _ = self._run(
                f"UPDATE {TABLE} SET {assignments}, worker=NULL, lease_until=NULL, "
                f"updated_at=? {held} AND rerun=0", *values, now, job_id, worker)
            if n == 1:
                return True
        return False

    def finish(self, job_id: int, worker: str, verdict: str | None, run_id: str | None,
               note: str | None = None) -> bool:
        """The job is done (``verdict``/``run_id`` of the certification). False when
        ``worker`` no longer holds it (its lease expired and another worker took it)."""
        return self._end(job_id, worker, "state='done', force=0, verdict=?, run_id=?, error=?",
                         verdict, run_id, note)

    def fail(self, job_id: int, worker: str, error: str, retry_in: float | None = None) -> bool:
        """The job failed this round; ``retry_in`` seconds from now it is claimed again
        (None: only a new offer — a delivery, the reconciliation loop or an on-demand request
        — re-queues it; for jobs whose version identity no longer exists)."""
        retry_at = None if retry_in is None else time.time() + retry_in
        return self._end(job_id, worker, "state='failed', failures=failures+1, error=?, "
                                         "retry_at=?", error, retry_at)

    def retry_later(self, job_id: int, worker: str, delay: float, error: str) -> bool:
        """Back to ``queued``, due in ``delay`` seconds (a quick retry within this round)."""
        return self._end(job_id, worker, "state='queued', not_before=?, error=?",
                         time.time() + delay, error)

    # -- reading -----------------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        _, rows = self._run(f"SELECT {COLUMNS} FROM {TABLE} WHERE id=?", job_id)
        return self._job(rows[0]) if rows else None

    def find(self, name: str, version: str, version_created: int,
             policy_sha256: str) -> Job | None:
        _, rows = self._run(f"SELECT {COLUMNS} FROM {TABLE} WHERE name=? AND version=? AND "
                            "version_created=? AND policy_sha256=?",
                            name, str(version), int(version_created), policy_sha256)
        return self._job(rows[0]) if rows else None

    def jobs(self) -> list[Job]:
        _, rows = self._run(f"SELECT {COLUMNS} FROM {TABLE} ORDER BY id")
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        _, rows = self._run(f"SELECT state, COUNT(*) FROM {TABLE} GROUP BY state")
        return {state: int(n) for state, n in rows}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Shared by both backends (sqlite ≥ 3.35 and PostgreSQL: ON CONFLICT, RETURNING).
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id {{serial}},
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    version_created BIGINT NOT NULL,        -- the registry's creation_timestamp (ms)
    policy_sha256 TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',   -- queued | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    force INTEGER NOT NULL DEFAULT 0,
    rerun INTEGER NOT NULL DEFAULT 0,
    not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
    retry_at DOUBLE PRECISION,
    worker TEXT,
    lease_until DOUBLE PRECISION,
    delivery_id TEXT,
    verdict TEXT,
    run_id TEXT,
    error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    UNIQUE (name, version, version_created, policy_sha256)
)
"""

# One statement: pick the oldest due job and take it. Parameters: worker, lease_until, now ×4.
_DUE = ("(state='queued' AND not_before <= ?) OR (state='failed' AND retry_at IS NOT NULL "
        "AND retry_at <= ?) OR (state='running' AND lease_until < ?)")
_TAKE = (f"UPDATE {TABLE} SET state='running', worker=?, lease_until=?, "
         "attempts=CASE WHEN state='failed' THEN 1 ELSE attempts+1 END, retry_at=NULL, "
         "updated_at=? WHERE id = ({pick}) RETURNING " + COLUMNS)


# The sqlite queue's inter-process lock: realpath of the queue file -> [fd, open queues]. The
# lock is per process (flock conflicts between open files, even within one process), so the
# queue objects of one process share it, and only the first one re-queues interrupted jobs.
_FILE_LOCKS: dict[str, list] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _lock_queue_file(path: Path) -> tuple[str, bool]:
    """Take (or share, within this process) the exclusive lock on ``<path>.lock``; returns
    (key, whether this process just took it). QueueError when another process holds it."""
    key = os.path.realpath(path)
    with _FILE_LOCKS_GUARD:
        held = _FILE_LOCKS.get(key)
        if held is not None:
            held[1] += 1
            return key, False
        lock_path = key + ".lock"
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise QueueError(f"cannot open the sqlite job queue's lock file {lock_path}: "
                                 f"{exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise QueueError(
                    f"the sqlite job queue {path} is in use by another process (it holds "
                    f"{lock_path}): probably another `robust-cert serve` (or `serve "
                    "--worker-only`) on the same file. A sqlite queue serves one process; "
                    "several workers need a PostgreSQL queue (--queue-url "
                    "postgresql://USER@HOST:PORT/DATABASE)") from None
        _FILE_LOCKS[key] = [fd, 1]
        return key, True


def _unlock_queue_file(key: str) -> None:
    with _FILE_LOCKS_GUARD:
        held = _FILE_LOCKS.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _FILE_LOCKS[key]
            if held[0] is not None:
                os.close(held[0])  # releases the flock


class SqliteJobQueue(JobQueue):
    """The embedded default: a file next to the certifier, used by one process.

    While open, the process holds an exclusive ``flock`` on ``<path>.lock``: a second process
    opening the same file gets QueueError (it would otherwise re-queue the first one's running
    jobs and certify them twice). Queue objects within one process share the lock."""

    def __init__(self, path: str | Path, lease_s: float = DEFAULT_LEASE_S):
        super().__init__(lease_s)
        self.path = Path(path)
        self._lock_key = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QueueError(f"cannot open the sqlite job queue {self.path}: {exc}") from None
        self._lock_key, first = _lock_queue_file(self.path)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT"))
        except (OSError, sqlite3.Error) as exc:
            self._release()
            raise QueueError(f"cannot open the sqlite job queue {self.path}: {exc}") from None
        if first:
            # embedded: this process is the only one using the file (it holds the lock), so a
            # job left running was interrupted (a crash, a kill)
            self.recovered = self._run(
                f"UPDATE {TABLE} SET state='queued', worker=NULL, lease_until=NULL, "
                "updated_at=? WHERE state='running'", time.time())[0]

    def _release(self) -> None:
        key, self._lock_key = self._lock_key, None
        if key is not None:
            _unlock_queue_file(key)

    def _execute(self, sql, params=()):
        try:
            cur = self._db.execute(sql, params)
            rows = cur.fetchall()
            return cur.rowcount, rows
        except sqlite3.Error as exc:
            raise QueueError(f"sqlite job queue {self.path}: {exc}") from None

    def _claim_sql(self):
        # the lock serialises claims within the process; sqlite serialises writers anyway
        pick = (f"SELECT id FROM {TABLE} WHERE {_DUE} ORDER BY id LIMIT 1")
        return _TAKE.format(pick=pick)

    def describe(self):
        return f"sqlite {self.path}"

    def close(self):
        try:
            self._db.close()
        finally:
            self._release()


class PostgresJobQueue(JobQueue):
    """A queue in PostgreSQL shared by many workers on many machines (psycopg 3)."""

    param = "%s"

    def __init__(self, url: str, lease_s: float = DEFAULT_LEASE_S, connect_timeout: int = 10):
        super().__init__(lease_s)
        try:
            import psycopg
        except ImportError:
            raise QueueError("a postgresql:// queue needs the psycopg (3) driver: "
                             "pip install 'robust_cert[postgres]'") from None
        self._psycopg = psycopg
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.connect_timeout = connect_timeout
        self._conn = None
        self._check_url()
        with self._lock:
            self._connection().execute(_SCHEMA.format(serial="BIGSERIAL PRIMARY KEY"))

    def _check_url(self) -> None:
        from psycopg.conninfo import conninfo_to_dict

        usage = "expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        try:
            info = conninfo_to_dict(self.url)
        except self._psycopg.ProgrammingError as exc:
            raise QueueError(f"bad PostgreSQL queue URL ({str(exc).strip()}); {usage}") from None
        port = str(info.get("port", "5432"))
        if not all(p.strip().isdigit() for p in port.split(",")):
            raise QueueError(f"bad PostgreSQL queue URL: port {port!r} is not a number; {usage}")
        if not info.get("dbname"):
            raise QueueError(f"bad PostgreSQL queue URL: no database named; {usage}")

    def describe(self):
        from psycopg.conninfo import conninfo_to_dict

        try:
            info = conninfo_to_dict(self.url)
        except self._psycopg.ProgrammingError:
            return "postgresql (unparsable URL)"
        return (f"postgresql {info.get('host', 'localhost')}:{info.get('port', 5432)}/"
                f"{info.get('dbname', '')}")  # never the password

    def _connection(self):
        if self._conn is None or self._conn.closed:
            psycopg = self._psycopg
            try:
                self._conn = psycopg.connect(self.url, autocommit=True,
                                             connect_timeout=self.connect_timeout)
            except psycopg.ProgrammingError as exc:
                raise QueueError(f"bad PostgreSQL queue URL ({exc}); expected "
                                 "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE") from None
            except psycopg.OperationalError as exc:
                raise QueueError(f"cannot reach the PostgreSQL job queue at "
                                 f"{self.describe()}: {str(exc).strip()}") from None
        return self._conn

    def _execute(self, sql, params=()):
        psycopg = self._psycopg
        for attempt in (1, 2):  # one reconnect: a server restart drops idle connections
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    # psycopg asks for a LiteralString: these are the module's own SQL texts
                    cur.execute(sql, params)  # pyright: ignore[reportArgumentType]
                    rows = cur.fetchall() if cur.description else []
                    return cur.rowcount, rows
            except psycopg.OperationalError as exc:
                lost = conn.closed or conn.broken
                conn.close()
                if attempt == 2 or not lost:
                    raise QueueError(f"PostgreSQL job queue at {self.describe()}: "
                                     f"{str(exc).strip()}") from None
            except psycopg.Error as exc:
                raise QueueError(f"PostgreSQL job queue at {self.describe()}: "
                                 f"{str(exc).strip()}") from None
        raise AssertionError("unreachable")

    def _claim_sql(self):
        # SKIP LOCKED: concurrent claimers each lock a different row, none waits or repeats
        pick = (f"SELECT id FROM {TABLE} WHERE {_DUE} ORDER BY id LIMIT 1 "
                "FOR UPDATE SKIP LOCKED")
        return _TAKE.format(pick=pick)

    def close(self):
        if self._conn is not None:
            self._conn.close()


def open_queue(url: str | Path, *, lease_s: float = DEFAULT_LEASE_S) -> JobQueue:
    """``postgresql://…`` (also ``postgresql+psycopg://`` and ``postgres://``) → PostgreSQL;
    ``sqlite:///path`` or a plain path → sqlite. Raises QueueError naming the problem."""
    text = str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        if scheme == "postgres":
            text = "postgresql" + text[len("postgres"):]
        return PostgresJobQueue(text, lease_s=lease_s)
    if scheme == "sqlite":
        path = text.split("://", 1)[1]
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        if not path:
            raise QueueError(f"queue URL {text!r} names no file (sqlite:///jobs.db)")
        return SqliteJobQueue(path, lease_s=lease_s)
    if scheme:
        raise QueueError(f"unsupported queue URL {text!r}: use a sqlite file path "
                         "(or sqlite:///path) or postgresql://USER@HOST:PORT/DATABASE")
    return SqliteJobQueue(text, lease_s=lease_s)
