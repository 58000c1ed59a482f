"""The certification queue: identity keys, idempotence, leases, retries; sqlite and PostgreSQL.

The PostgreSQL cases run against a real server (the ``postgres`` fixture) and skip only where
PostgreSQL is not installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from robust_cert.jobqueue import (
    PostgresJobQueue,
    QueueError,
    SqliteJobQueue,
    open_queue,
)
from tests.helpers import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[1]
POLICY = "p" * 64


@pytest.fixture(params=["sqlite", "postgresql"])
def make_queue(request, tmp_path):
    """A factory of queue objects on one fresh queue (several objects = several workers)."""
    if request.param == "sqlite":
        url = str(tmp_path / "jobs.db")
    else:
        pg = request.getfixturevalue("postgres")
        url = pg.create_database(f"q_{uuid.uuid4().hex[:16]}")
    opened = []

    def make(lease_s: float = 300.0):
        q = open_queue(url, lease_s=lease_s)
        opened.append(q)
        return q

    yield make
    for q in opened:
        q.close()


def test_open_queue_urls(tmp_path, postgres):
    with open_queue(tmp_path / "a.db") as q:
        assert isinstance(q, SqliteJobQueue)
    with open_queue(f"sqlite:///{tmp_path}/b.db") as q:
        assert q.path == tmp_path / "b.db"
    url = postgres.create_database("q_urls")
    for u in (url, url.replace("postgresql://", "postgresql+psycopg://"),
              url.replace("postgresql://", "postgres://")):
        with open_queue(u) as q:
            assert isinstance(q, PostgresJobQueue)
            assert "q_urls" in q.describe()
    with pytest.raises(QueueError, match="unsupported queue URL"):
        open_queue("mysql://x/y")
    with pytest.raises(QueueError, match="cannot reach the PostgreSQL job queue"):
        open_queue(f"postgresql://postgres@127.0.0.1:{_closed_port()}/x")
    with pytest.raises(QueueError, match="bad PostgreSQL queue URL"):
        open_queue("postgresql://postgres@127.0.0.1:notaport/x")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_identity_idempotence_and_recreated_versions(make_queue):
    q = make_queue()
    assert q.enqueue("m", "1", 1000, POLICY, "d1") == "queued"
    assert q.enqueue("m", "1", 1000, POLICY, "d2") == "duplicate"
    # the same name and version, re-created (new creation time): a new job
    assert q.enqueue("m", "1", 2000, POLICY, "d3") == "queued"
    # another policy: another job
    assert q.enqueue("m", "1", 2000, "q" * 64) == "queued"
    assert [(j.version_created, j.policy_sha256[0]) for j in q.jobs()] == [
        (1000, "p"), (2000, "p"), (2000, "q")]
    job = q.claim("w")
    assert q.finish(job.id, "w", "PASS", "r1")
    assert q.enqueue("m", "1", 1000, POLICY) == "duplicate"  # done stays done
    assert q.counts() == {"done": 1, "queued": 2}


def test_on_demand_requeues_done_and_running_jobs(make_queue):
    q = make_queue()
    q.enqueue("m", "1", 1000, POLICY)
    job = q.claim("w")
    # asked for again while it runs: it runs once more after this run ends
    assert q.enqueue("m", "1", 1000, POLICY, force=True) == "requeued"
    assert q.finish(job.id, "w", "PASS", "r1")
    again = q.claim("w")
    assert (again.id, again.force) == (job.id, True)
    assert q.finish(again.id, "w", "PASS", "r2")
    assert q.get(job.id).state == "done"
    assert q.enqueue("m", "1", 1000, POLICY, force=True) == "requeued"
    assert q.get(job.id).state == "queued"
    assert q.enqueue("m", "1", 1000, POLICY, force=True) == "duplicate"  # already queued


def test_each_job_goes_to_one_claimer(make_queue):
    queues = [make_queue() for _ in range(3)]
    for i in range(30):
        queues[0].enqueue("m", str(i), 1000, POLICY)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(q, name):
        while (job := q.claim(name)) is not None:
            with lock:
                claimed.append((name, job.id))
            assert q.finish(job.id, name, "PASS", None)

    threads = [threading.Thread(target=work, args=(q, f"w{i}")) for i, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [i for _, i in claimed]
    assert sorted(ids) == sorted(j.id for j in queues[0].jobs())
    assert len(ids) == len(set(ids)) == 30
    assert queues[0].counts() == {"done": 30}


def test_lease_expiry_hands_a_job_to_another_worker_and_fences_the_first(make_queue):
    a, b = make_queue(lease_s=0.3), make_queue(lease_s=0.3)
    a.enqueue("m", "1", 1000, POLICY)
    job = a.claim("A")
    assert b.claim("B") is None  # held under A's lease
    assert a.renew(job.id, "A")
    taken = _wait_for(lambda: b.claim("B"), within_s=5)
    assert taken, "the job was not handed over after A's lease expired"
    assert (taken.id, taken.attempts) == (job.id, 2)
    assert not a.renew(job.id, "A")  # A has lost it ...
    assert not a.finish(job.id, "A", "FAIL", "stale")  # ... and cannot overwrite B's result
    assert b.finish(taken.id, "B", "PASS", "r")
    assert (b.get(job.id).state, b.get(job.id).verdict) == ("done", "PASS")


def test_failed_jobs_come_back_after_backoff_or_at_once_on_delivery(make_queue):
    q = make_queue()
    q.enqueue("m", "1", 1000, POLICY)
    job = q.claim("w")
    assert q.fail(job.id, "w", "server down", retry_in=0.3)
    assert q.get(job.id).state == "failed"
    assert q.claim("w") is None  # not yet due
    again = _wait_for(lambda: q.claim("w"), within_s=5)
    assert again, "a failed job with a retry time was never retried"
    assert (again.id, again.attempts, again.failures) == (job.id, 1, 1)
    assert q.fail(again.id, "w", "bad model")  # no retry time: stays failed ...
    time.sleep(0.05)
    assert q.claim("w") is None
    assert q.enqueue("m", "1", 1000, POLICY, "new-delivery") == "requeued"  # ... until offered
    assert q.claim("w").id == job.id


def test_sqlite_reopen_requeues_interrupted_jobs(tmp_path):
    q = SqliteJobQueue(tmp_path / "q.db")
    assert q.enqueue("m", "1", 1000, POLICY) == "queued"
    assert q.claim("w").state == "running"
    q.close()  # the process dies mid-certification
    q = SqliteJobQueue(tmp_path / "q.db")
    assert q.recovered == 1
    job = q.claim("w2")
    assert (job.name, job.version, job.attempts) == ("m", "1", 2)
    q.close()


def _start_worker(url: str, name: str, lease_s: float, hang_after: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tests.queue_worker", url, name,
                             str(lease_s), str(hang_after)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_one_postgres_queue_exactly_once_even_when_one_is_killed(postgres):
    """20 jobs, workers A and B (separate processes) on one PostgreSQL queue with 1.5 s leases;
    A is SIGKILLed in the middle of its third job. Every version ends done, certified exactly
    once (one effect row each); A's interrupted job is finished by B after the lease."""
    import psycopg

    from tests.queue_worker import VERSION_CREATED, setup_tables

    url = postgres.create_database("two_workers")
    setup_tables(url)
    lease_s = 1.5
    with open_queue(url, lease_s=lease_s) as q:
        for i in range(20):
            assert q.enqueue(f"m{i:02d}", "1", VERSION_CREATED, POLICY) == "queued"
    a = _start_worker(url, "A", lease_s, hang_after=2)
    b = _start_worker(url, "B", lease_s, hang_after=-1)
    db = psycopg.connect(url, autocommit=True)
    try:
        hung = _wait_for(lambda: db.execute("SELECT name FROM hangs").fetchall(), within_s=60)
        assert hung, "worker A never reached its third job"
        hung_name = hung[0][0]
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        with open_queue(url) as q:
            assert _wait_for(lambda: q.counts() == {"done": 20}, within_s=90), q.counts()
            jobs = {j.name: j for j in q.jobs()}
        effects = db.execute("SELECT name, worker FROM effects ORDER BY name").fetchall()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        db.close()
    by_name: dict[str, list[str]] = {}
    for name, worker in effects:
        by_name.setdefault(name, []).append(worker)
    assert sorted(by_name) == sorted(jobs)
    assert len(jobs) == 20
    assert all(len(w) == 1 for w in by_name.values()), by_name  # exactly once each
    assert by_name[hung_name] == ["B"]  # finished by the survivor ...
    assert jobs[hung_name].attempts == 2  # ... on a second attempt, after the lease
    assert sum(w == ["A"] for w in by_name.values()) == 2
    print(f"\ntwo workers: 20 jobs done, effects {len(effects)} (A 2, B "
          f"{sum(w == ['B'] for w in by_name.values())}), killed A's job {hung_name} redone "
          f"by B on attempt {jobs[hung_name].attempts}")


def test_forced_offer_always_leaves_a_forced_job(make_queue):
    """Before: enqueue(force=True) on a queued, plain job answered `duplicate` and left it
    plain, so the worker skipped the version (it had a current certificate)."""
    q = make_queue()
    assert q.enqueue("m", "1", 1000, POLICY) == "queued"
    assert q.enqueue("m", "1", 1000, POLICY, "alias", force=True) == "requeued"
    job = q.find("m", "1", 1000, POLICY)
    assert (job.state, job.force, job.delivery_id) == ("queued", True, "alias")
    assert q.enqueue("m", "1", 1000, POLICY, force=True) == "duplicate"  # already forced
    assert q.enqueue("m", "1", 1000, POLICY) == "duplicate"
    assert q.find("m", "1", 1000, POLICY).force  # a plain offer does not clear it
    claimed = q.claim("w")
    assert claimed.force
    # a forced job that failed stays forced when a plain offer re-queues it
    assert q.fail(claimed.id, "w", "out of memory", retry_in=3600)
    assert q.enqueue("m", "1", 1000, POLICY, "redelivery") == "requeued"
    assert q.claim("w").force


_HOLDER = """
import sys, time
from robust_cert.jobqueue import SqliteJobQueue
q = SqliteJobQueue(sys.argv[1])
q.enqueue("m", "1", 1000, "p" * 64)
assert q.claim("holder").state == "running"
print("ready", flush=True)
sys.stdin.read()  # hold the queue (and its running job) until stdin closes
"""


def test_sqlite_queue_is_locked_against_a_second_process(tmp_path):
    """Before: a second process (serve + serve --worker-only on one file) opened the queue and
    re-queued the first one's running job, which was then certified twice."""
    path = tmp_path / "jobs.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(QueueError) as exc:
            SqliteJobQueue(path)
        message = str(exc.value)
        assert str(path) in message
        assert "another process" in message
        assert "PostgreSQL" in message
        import sqlite3

        with sqlite3.connect(path) as db:  # the holder's job was not touched
            assert db.execute("SELECT state, worker FROM robust_cert_jobs").fetchall() == [
                ("running", "holder")]
    finally:
        holder.stdin.close()  # the holder exits without closing: a crash, for the queue
        holder.wait(30)
    # the lock went with the process: the next one opens and recovers the interrupted job
    q = SqliteJobQueue(path)
    try:
        assert q.recovered == 1
        # queue objects of one process share the lock; only the first one recovers jobs
        assert q.claim("w").state == "running"
        with open_queue(path) as second:
            assert second.recovered == 0
            assert second.counts() == {"running": 1}
    finally:
        q.close()
    # closed: another process can open it
    done = subprocess.run([sys.executable, "-c", "import sys; from robust_cert.jobqueue import "
                           "SqliteJobQueue; SqliteJobQueue(sys.argv[1]).close()", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
