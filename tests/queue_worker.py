"""A certifier worker process for the shared-queue tests, with a cheap fake certification.

``python -m tests.queue_worker QUEUE_URL WORKER_ID LEASE_S HANG_AFTER``

Runs :meth:`Receiver.work_forever` on the queue at QUEUE_URL (the real worker loop: claim under
a lease, heartbeat, idempotence check, finish fenced by worker id) with the certification
replaced by a fake that records its *effect* in the table ``effects`` of the same PostgreSQL
database (the stand-in for the certificate written to the registry; a version "has a current
certificate" when it has an effect row). After HANG_AFTER certifications (-1: never) the next
one records itself in ``hangs`` and blocks forever mid-job — the test kills the process there.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psycopg

from robust_cert.jobqueue import open_queue
from robust_cert.mlflow_plugin.webhooks import Certified, Receiver
from robust_cert.policy import load_policy

POLICY = Path(__file__).resolve().parents[1] / "examples" / "policies" / "digits.yaml"
VERSION_CREATED = 1000  # the fake registry: every version was created at this time


def setup_tables(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (name TEXT, version TEXT, "
                     "worker TEXT, at DOUBLE PRECISION)")
        conn.execute("CREATE TABLE IF NOT EXISTS hangs (name TEXT, worker TEXT)")


def main(argv: list[str]) -> int:
    url, worker, lease_s, hang_after = argv[0], argv[1], float(argv[2]), int(argv[3])
    db = psycopg.connect(url, autocommit=True)
    lock = threading.Lock()  # the heartbeat thread does not use this connection; be safe
    done = [0]

    def is_current(name: str, version: str) -> bool:
        with lock:
            return db.execute("SELECT 1 FROM effects WHERE name=%s AND version=%s",
                              (name, version)).fetchone() is not None

    def certify(job) -> Certified:
        if done[0] == hang_after:
            with lock:
                db.execute("INSERT INTO hangs VALUES (%s, %s)", (job.name, worker))
            while True:  # mid-job until SIGKILL
                time.sleep(1)
        time.sleep(0.02)  # the "work"
        with lock:
            db.execute("INSERT INTO effects VALUES (%s, %s, %s, %s)",
                       (job.name, job.version, worker, time.time()))
        done[0] += 1
        return Certified("PASS", f"run-{job.name}")

    receiver = Receiver(policy=load_policy(str(POLICY)), policy_source=str(POLICY),
                        queue=open_queue(url, lease_s=lease_s), secret="unused",
                        worker_id=worker, lookup=lambda name, version: VERSION_CREATED,
                        is_current=is_current, certify=certify)
    print(f"worker {worker} ready", flush=True)
    receiver.work_forever(poll_s=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
