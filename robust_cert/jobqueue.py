"""A durable certification queue in sqlite: one job per (model, version, policy).

Why sqlite: MLflow delivers webhooks once (plus three retries on errors) and keeps nothing,
so the receiver must persist work before it answers. The unique key makes redelivery
idempotent; jobs left ``running`` by a crash go back to ``queued`` when the queue is opened;
a job ends ``done`` (with the verdict the certification wrote) or ``failed`` (with why).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    policy_sha256 TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',     -- queued | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    delivery_id TEXT,
    verdict TEXT,
    run_id TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (name, version, policy_sha256)
)
"""


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    version: str
    policy_sha256: str
    state: str
    attempts: int
    delivery_id: str | None = None
    verdict: str | None = None
    run_id: str | None = None
    error: str | None = None


class JobQueue:
    """Thread-safe; every method is one short transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        recovered = self._db.execute(
            "UPDATE jobs SET state='queued', updated_at=? WHERE state='running'", (time.time(),)
        ).rowcount
        self.recovered = recovered  # jobs a crash left running, queued again

    def enqueue(self, name: str, version: str, policy_sha256: str,
                delivery_id: str | None = None) -> bool:
        """Queue a job; False when this (version, policy) already has one (idempotent)."""
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO jobs (name, version, policy_sha256, delivery_id, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, str(version), policy_sha256, delivery_id, now, now))
            return cur.rowcount == 1

    def claim(self) -> Job | None:
        """Take the oldest job that is due; it becomes ``running`` with one more attempt."""
        now = time.time()
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state='queued' AND not_before <= ? "
                "ORDER BY id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state='running', attempts=attempts+1, "
                             "updated_at=? WHERE id=?", (now, row[0]))
            return self.get(row[0])

    def finish(self, job_id: int, verdict: str, run_id: str) -> None:
        self._set(job_id, "state='done', verdict=?, run_id=?, error=NULL", verdict, run_id)

    def fail(self, job_id: int, error: str) -> None:
        self._set(job_id, "state='failed', error=?", error)

    def retry_later(self, job_id: int, delay: float, error: str) -> None:
        self._set(job_id, "state='queued', not_before=?, error=?", time.time() + delay, error)

    def _set(self, job_id: int, assignments: str, *values) -> None:
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments}, updated_at=? WHERE id=?",
                             (*values, time.time(), job_id))

    def get(self, job_id: int) -> Job | None:
        row = self._db.execute(
            "SELECT id, name, version, policy_sha256, state, attempts, delivery_id, verdict, "
            "run_id, error FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def jobs(self) -> list[Job]:
        rows = self._db.execute(
            "SELECT id, name, version, policy_sha256, state, attempts, delivery_id, verdict, "
            "run_id, error FROM jobs ORDER BY id").fetchall()
        return [Job(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def close(self) -> None:
        self._db.close()
