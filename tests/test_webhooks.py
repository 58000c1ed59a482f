"""`robust-cert serve`: webhook verification, the durable queue, and the flow end to end."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from robust_cert.errors import ModelError, PolicyError, RobustCertError, TrackingError
from robust_cert.mlflow_plugin.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Certified,
    WebhookServer,
    expected_signature,
    make_receiver,
    register_webhook,
    verify_delivery,
)
from tests.helpers import wait_for as _wait_for

SECRET = "webhook-secret-for-tests"
LENIENT = "name: digits-production\nmetrics: {accuracy: {}}\n" \
          "requirements: [{metric: accuracy, at_least: 0.5}]\n"


def _delivery(event: dict, *, secret: str = SECRET, ts: int | None = None,
              delivery_id: str | None = None) -> tuple[dict, bytes]:
    body = json.dumps(event)
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if ts is None else ts)
    headers = {DELIVERY_HEADER: delivery_id, TIMESTAMP_HEADER: ts,
               SIGNATURE_HEADER: expected_signature(secret, delivery_id, ts, body)}
    return headers, body.encode()


def _created(name: str, version: str) -> dict:
    return {"entity": "model_version", "action": "created", "timestamp": "now",
            "data": {"name": name, "version": version, "source": "x", "run_id": None,
                     "tags": {}, "description": None}}


class FakeRegistry:
    """The registry as the receiver sees it: (name, version) -> creation timestamp (ms).

    ``down`` > 0: the next that many look-ups fail as if the tracking server were down."""

    def __init__(self):
        self.versions: dict[tuple[str, str], int] = {}
        self.down = 0
        self.lookups = 0
        self.clock = 1_000  # creation timestamps, strictly increasing like the registry's

    def create(self, name: str, version: str) -> int:
        self.clock += 1
        self.versions[(name, str(version))] = self.clock
        return self.clock

    def delete(self, name: str) -> None:
        self.versions = {k: v for k, v in self.versions.items() if k[0] != name}

    def lookup(self, name: str, version: str) -> int | None:
        self.lookups += 1
        if self.down > 0:
            self.down -= 1
            raise TrackingError("cannot reach the MLflow tracking server at http://x: down")
        return self.versions.get((name, str(version)))


@pytest.fixture
def registry():
    return FakeRegistry()


@pytest.fixture
def certified():
    """The fake certification's effects: (name, version) of every certification, in order."""
    return []


@pytest.fixture
def receiver(tmp_path, monkeypatch, registry, certified):
    """A receiver on a sqlite queue whose registry and certification are fakes (fast)."""
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)

    def certify(job):
        certified.append((job.name, job.version))
        return Certified("PASS", f"run-{len(certified)}")

    rec = make_receiver(str(policy), tmp_path / "jobs.db", certify_on_alias="candidate",
                        out_dir=tmp_path / "reports", backoff_s=0.01, max_attempts=2,
                        retry_base_s=0.2, retry_cap_s=0.4, lookup=registry.lookup,
                        is_current=lambda name, version: (name, version) in certified,
                        certify=certify)
    yield rec
    rec.queue.close()


def _drain(rec, within_s: float = 10.0) -> None:
    """Run due jobs until none is queued, running or due for retry (poll with a deadline)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if rec.work_once():
            continue
        counts = rec.queue.counts()
        retrying = [j for j in rec.queue.jobs() if j.state == "failed" and j.retry_at]
        if not counts.get("queued") and not counts.get("running") and not retrying:
            return
        time.sleep(0.02)
    raise AssertionError(f"jobs still pending after {within_s} s: {rec.queue.jobs()}")


def test_signature_and_timestamp_are_checked():
    headers, body = _delivery(_created("m", "1"))
    assert verify_delivery(headers, body, SECRET)["data"]["version"] == "1"
    with pytest.raises(RobustCertError, match="does not verify") as exc:
        verify_delivery(headers, body, "another-secret")
    assert exc.value.status == 401
    with pytest.raises(RobustCertError, match="does not verify"):
        verify_delivery(headers, body.replace(b'"1"', b'"2"'), SECRET)
    stale_headers, stale_body = _delivery(_created("m", "1"), ts=int(time.time()) - 3600)
    with pytest.raises(RobustCertError, match="stale timestamp"):
        verify_delivery(stale_headers, stale_body, SECRET)
    with pytest.raises(RobustCertError, match="missing signature"):
        verify_delivery({}, body, SECRET)
    bad_headers, bad_body = _delivery({"entity": "model_version"})  # no data/action
    with pytest.raises(RobustCertError, match="malformed") as exc:
        verify_delivery(bad_headers, bad_body, SECRET)
    assert exc.value.status == 400


def test_redelivery_is_idempotent_and_rejections_queue_nothing(receiver, registry):
    registry.create("m", "3")
    headers, body = _delivery(_created("m", "3"))
    assert receiver.handle(headers, body) == (202, {"status": "queued", "model": "m",
                                                    "version": "3"})
    assert receiver.handle(headers, body)[1]["status"] == "duplicate"
    # a new delivery of the same event (new id) is still one job per version identity
    assert receiver.handle(*_delivery(_created("m", "3")))[1]["status"] == "duplicate"
    assert receiver.handle(*_delivery(_created("m", "3"), secret="wrong"))[0] == 401
    assert receiver.handle(headers, b"{not json")[0] == 401  # body no longer matches
    # the version as a JSON number is the same job; any other spelling is refused (one
    # spelling per version, as robust_cert.signing.canonical_version decides)
    assert receiver.handle(*_delivery(_created("m", 3)))[1]["status"] == "duplicate"
    for spelling in ("3x", "03", " 3", "3\n", "+3", "0"):
        status, payload = receiver.handle(*_delivery(_created("m", spelling)))
        assert status == 400, spelling
        assert "bad model version" in payload["error"]
    # a version the registry does not have (deleted since) queues nothing
    assert receiver.handle(*_delivery(_created("gone", "1")))[1]["reason"] == "no such version"
    assert len(receiver.queue.jobs()) == 1


def test_doctor_probe_models_are_never_certified(receiver, registry):
    from robust_cert.mlflow_plugin.promotion import PROBE_PREFIX

    registry.create(PROBE_PREFIX + "abc", "1")
    status, payload = receiver.handle(*_delivery(_created(PROBE_PREFIX + "abc", "1")))
    assert (status, payload["reason"]) == (200, "doctor probe")
    assert receiver.queue.jobs() == []


def test_registry_down_at_delivery_answers_503_so_mlflow_redelivers(receiver, registry):
    registry.create("m", "1")
    registry.down = 1
    status, payload = receiver.handle(*_delivery(_created("m", "1")))
    assert status == 503
    assert "registry" in payload["error"]
    assert receiver.queue.jobs() == []
    assert receiver.handle(*_delivery(_created("m", "1")))[0] == 202


def test_which_events_become_jobs(receiver, registry):
    for v in ("4", "5", "6"):
        registry.create("m", v)
    alias = {"entity": "model_version_alias", "action": "created", "timestamp": "now",
             "data": {"name": "m", "alias": "Candidate", "version": "4"}}
    assert receiver.handle(*_delivery(alias))[1]["status"] == "queued"
    other = {**alias, "data": {**alias["data"], "alias": "staging", "version": "5"}}
    assert receiver.handle(*_delivery(other))[1]["status"] == "ignored"
    tag = {"entity": "model_version_tag", "action": "set", "timestamp": "now",
           "data": {"name": "m", "version": "6", "key": "k", "value": "v"}}
    assert receiver.handle(*_delivery(tag))[1]["status"] == "ignored"
    assert [(j.name, j.version) for j in receiver.queue.jobs()] == [("m", "4")]


def test_refuses_to_start_without_secrets(tmp_path, monkeypatch):
    policy = tmp_path / "p.yaml"
    policy.write_text(LENIENT)
    monkeypatch.delenv("ROBUST_CERT_WEBHOOK_SECRET", raising=False)
    with pytest.raises(RobustCertError, match="ROBUST_CERT_WEBHOOK_SECRET"):
        make_receiver(str(policy), tmp_path / "q.db")
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("ROBUST_CERT_SIGNING_KEY", raising=False)
    with pytest.raises(RobustCertError, match="ROBUST_CERT_SIGNING_KEY"):
        make_receiver(str(policy), tmp_path / "q.db")


# -- the four lost-work cases (before: never certified; after: certified) ------------------------

def test_recreated_model_gets_its_new_v1_certified(receiver, registry, certified):
    """Before: jobs keyed (name, version, policy) — the re-created model's v1 was `duplicate`."""
    registry.create("m", "1")
    assert receiver.handle(*_delivery(_created("m", "1")))[1]["status"] == "queued"
    _drain(receiver)
    registry.delete("m")
    registry.create("m", "1")  # deleted and re-created: a new v1, a new creation time
    certified.clear()  # the new v1 carries no certificate
    assert receiver.handle(*_delivery(_created("m", "1")))[1]["status"] == "queued"
    _drain(receiver)
    assert certified == [("m", "1")]
    assert [j.state for j in receiver.queue.jobs()] == ["done", "done"]


def test_job_for_a_version_recreated_meanwhile_is_not_run_on_the_new_one(receiver, registry,
                                                                        certified):
    registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))
    registry.delete("m")
    registry.create("m", "1")
    _drain(receiver)
    assert certified == []  # the old identity's job must not certify the new version
    (job,) = receiver.queue.jobs()
    assert job.state == "failed"
    assert "re-created" in job.error


def test_on_demand_alias_recertifies_a_certified_version(receiver, registry, certified):
    """Before: `--certify-on-alias` on an already-certified version answered `duplicate`."""
    registry.create("m", "2")
    receiver.handle(*_delivery(_created("m", "2")))
    _drain(receiver)
    alias = {"entity": "model_version_alias", "action": "created", "timestamp": "now",
             "data": {"name": "m", "alias": "candidate", "version": "2"}}
    status, payload = receiver.handle(*_delivery(alias))
    assert (status, payload["status"]) == (202, "requeued")
    _drain(receiver)
    assert certified == [("m", "2"), ("m", "2")]  # certified again although it had one
    # a plain redelivery of the created event still does nothing
    assert receiver.handle(*_delivery(_created("m", "2")))[1]["status"] == "duplicate"
    _drain(receiver)
    assert len(certified) == 2


def test_outage_longer_than_quick_retries_is_retried_later(receiver, registry, certified):
    """Before: 4 quick attempts, then `failed` for good and redeliveries ignored. Now the
    failed job comes back after a capped backoff, and a new delivery re-queues it at once."""
    registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))
    registry.down = 2  # longer than max_attempts=2 quick attempts
    assert receiver.work_once()
    assert receiver.work_once() or _wait_for(receiver.work_once, within_s=5)
    (job,) = receiver.queue.jobs()
    assert job.state == "failed"
    assert "gave up after 2 attempts" in job.error
    assert job.retry_at is not None
    assert certified == []
    _drain(receiver)  # the server is back: the retry certifies it
    assert certified == [("m", "1")]
    # a new delivery re-queues a failed job at once (no waiting for the backoff)
    registry.create("m", "2")
    receiver.handle(*_delivery(_created("m", "2")))
    registry.down = 2
    receiver.work_once()
    _wait_for(receiver.work_once, within_s=5)
    assert receiver.queue.jobs()[1].state == "failed"
    assert receiver.handle(*_delivery(_created("m", "2")))[1]["status"] == "requeued"
    assert receiver.work_once()
    assert certified[-1] == ("m", "2")


def test_backoff_is_exponential_and_capped(receiver, registry):
    registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))
    registry.down = 10**6  # down for good
    delays = []
    for _ in range(4):  # four rounds of 2 quick attempts
        for _ in range(2):
            assert _wait_for(receiver.work_once, within_s=5)
        (job,) = receiver.queue.jobs()
        assert job.state == "failed"
        delays.append(job.retry_at - job.updated_at)  # set in one statement
    # retry_base_s=0.2 doubling per failed round, capped at retry_cap_s=0.4
    assert delays == pytest.approx([0.2, 0.4, 0.4, 0.4], abs=0.02)


def test_already_certified_version_is_not_certified_again(receiver, registry, certified):
    registry.create("m", "1")
    certified.append(("m", "1"))  # e.g. `robust-cert certify` ran by hand
    receiver.handle(*_delivery(_created("m", "1")))
    _drain(receiver)
    assert certified == [("m", "1")]
    (job,) = receiver.queue.jobs()
    assert (job.state, job.error) == ("done", "already carries a current certificate")


def test_a_job_that_keeps_killing_its_workers_is_parked_with_backoff(tmp_path, monkeypatch,
                                                                     registry, certified):
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    rec = make_receiver(str(policy), tmp_path / "jobs.db", lease_s=0.05, max_attempts=2,
                        retry_base_s=30, lookup=registry.lookup,
                        is_current=lambda n, v: False,
                        certify=lambda job: certified.append(job.name))
    try:
        registry.create("m", "1")
        rec.handle(*_delivery(_created("m", "1")))
        for _ in range(2):  # two workers claim it and die (their leases run out)
            assert rec.queue.claim("doomed")
            assert _wait_for(lambda: rec.queue.jobs()[0].lease_until < time.time(), 5)
        assert _wait_for(rec.work_once, within_s=5)
        (job,) = rec.queue.jobs()
        assert job.state == "failed"
        assert "stopped mid-job" in job.error
        assert job.retry_at - job.updated_at == pytest.approx(30, abs=0.1)
        assert certified == []
    finally:
        rec.queue.close()


@pytest.mark.parametrize("error", [ModelError("CUDA out of memory"), RuntimeError("boom")],
                         ids=["robust_cert_error", "crash"])
def test_a_failed_certification_is_retried_with_backoff(receiver, registry, certified, error):
    """Before: a RobustCertError (a CUDA OOM surfaces as a ModelError) or a crash left the
    job failed with no retry time — never certified again ("delayed, never lost")."""
    registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))
    fake, calls = receiver.certify, []

    def flaky(job):
        calls.append(job.id)
        if len(calls) == 1:
            raise error
        return fake(job)

    receiver.certify = flaky
    assert receiver.work_once()
    (job,) = receiver.queue.jobs()
    assert job.state == "failed"
    assert str(error) in job.error
    assert job.retry_at is not None, "a failed job must always come back"
    assert job.retry_at - job.updated_at == pytest.approx(0.2, abs=0.02)  # retry_base_s
    _drain(receiver)
    assert certified == [("m", "1")]
    assert receiver.queue.jobs()[0].state == "done"


def test_a_permanent_error_is_retried_at_the_cap(receiver, registry, certified):
    registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))

    def bad_policy(job):
        raise PolicyError("the policy names an unknown metric")

    receiver.certify = bad_policy
    delays = []
    for _ in range(4):
        assert _wait_for(receiver.work_once, within_s=5)
        (job,) = receiver.queue.jobs()
        assert job.state == "failed"
        delays.append(job.retry_at - job.updated_at)
    assert delays == pytest.approx([0.2, 0.4, 0.4, 0.4], abs=0.02)


def test_next_round_is_capped_without_overflow():
    from robust_cert.mlflow_plugin.webhooks import next_round_in

    assert [next_round_in(n, 60, 3600) for n in range(8)] == [60, 120, 240, 480, 960, 1920,
                                                                3600, 3600]
    # a job failing every hour for 43 days: 60.0 * 2**1030 would overflow a float
    assert next_round_in(5000, 60.0, 3600.0) == 3600.0


class _Page(list):
    token = None


class FakeVersion:
    def __init__(self, name, version, created, tags=None):
        self.name, self.version, self.creation_timestamp = name, str(version), created
        self.tags = dict(tags or {})


class FakeClient:
    """The MlflowClient calls reconciliation and the certificate check make."""

    def __init__(self, versions):
        self.versions = {(v.name, v.version): v for v in versions}

    def search_registered_models(self, max_results=None, page_token=None):
        return _Page(type("RM", (), {"name": n})() for n in sorted({k[0] for k in
                                                                   self.versions}))

    def search_model_versions(self, filter_string, max_results=None, page_token=None):
        name = filter_string.split("'", 1)[1].rsplit("'", 1)[0]
        return _Page(v for (n, _), v in sorted(self.versions.items()) if n == name)

    def get_model_version(self, name, version):
        return self.versions[(name, str(version))]


def _certificate_tag(name: str, version: str, policy_sha256: str) -> dict:
    from robust_cert.mlflow_plugin.names import CERT_TAG
    from robust_cert.signing import Keyring, sign_claim

    claim = {"model": name, "version": int(version), "verdict": "PASS",
             "policy": "digits-production", "policy_sha256": policy_sha256,
             "model_sha256": "a" * 64, "certificate_digest": "b" * 64,
             "run_id": uuid.uuid4().hex, "issued_us": 1_700_000_000_000_000}
    return {CERT_TAG: sign_claim(claim, Keyring.from_env(require_private=True))}


def test_reconcile_requeues_a_failed_job_without_retry_time(receiver, registry, certified):
    """A queue written before failed jobs always got a retry time: reconciliation (which skipped
    every failed job) re-queues such a job instead of leaving it failed for ever."""
    created = registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))
    job = receiver.queue.claim("old-certifier")
    assert receiver.queue.fail(job.id, "old-certifier", "ModelError: bad", retry_in=None)
    receiver._client = lambda: FakeClient([FakeVersion("m", "1", created)])
    receiver.watch = ("m",)
    counts = receiver.reconcile_once()
    assert (counts["requeued"], counts["failed"]) == (1, 0), counts
    _drain(receiver)
    assert certified == [("m", "1")]
    # a failed job with a retry time is left to come back then
    registry.create("m", "2")
    receiver.handle(*_delivery(_created("m", "2")))
    job = receiver.queue.claim("w")
    assert receiver.queue.fail(job.id, "w", "ModelError: bad", retry_in=3600)
    receiver._client = lambda: FakeClient([FakeVersion("m", "1", created, {}),
                                           FakeVersion("m", "2", registry.versions[("m", "2")])])
    counts = receiver.reconcile_once()
    assert (counts["failed"], counts["requeued"], counts["current"]) == (1, 0, 1), counts


def test_reconcile_uses_one_client_per_pass_and_only_this_policy_is_current(
        tmp_path, monkeypatch):
    """Before: a new MlflowClient and an HTTP /health per version checked, and a certificate
    under any policy counted as current, so a policy change never re-certified anything."""
    import mlflow.tracking

    import robust_cert.mlflow_plugin.client as mlflow_client

    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    rec = make_receiver(str(policy), tmp_path / "jobs.db", tracking_uri="http://registry:5000",
                        lookup=lambda n, v: None, certify=lambda job: None)
    try:
        mine, other = rec.policy.sha256, "c" * 64  # same policy name, other content
        assert mine != other
        client = FakeClient([
            FakeVersion("m", "1", 1001, _certificate_tag("m", "1", mine)),
            FakeVersion("m", "2", 1002, _certificate_tag("m", "2", other)),
            FakeVersion("m", "3", 1003),
            FakeVersion("n", "1", 1004, _certificate_tag("n", "1", mine))])
        made, checked = [], []
        monkeypatch.setattr(mlflow.tracking, "MlflowClient",
                            lambda **kw: made.append(kw) or client)
        monkeypatch.setattr(mlflow_client, "check_server", checked.append)
        counts = rec.reconcile_once()
        assert (len(made), len(checked)) == (1, 1)  # one client, one server check per pass
        assert (counts["versions"], counts["current"], counts["queued"]) == (4, 2, 2), counts
        assert sorted((j.name, j.version) for j in rec.queue.jobs()) == [("m", "2"), ("m", "3")]
        # the worker's own check is policy-aware too
        assert rec.is_current("m", "1")
        assert not rec.is_current("m", "2")
    finally:
        rec.queue.close()


# -- HTTP: uvicorn + Starlette -------------------------------------------------------------------

@pytest.fixture
def web(receiver):
    server = WebhookServer(receiver, "127.0.0.1", 0, limit_concurrency=40, timeout_s=1.0,
                           max_body=4096).start()
    yield server
    server.stop()


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes or answers (within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"content-length: 0" not in out.lower():
                    head, _, rest = out.partition(b"\r\n\r\n")
                    length = [ln for ln in head.lower().split(b"\r\n")
                              if ln.startswith(b"content-length:")]
                    if length and len(rest) >= int(length[0].split(b":")[1]):
                        break
        except TimeoutError:
            return b"<timeout>" + out
    return out


def _post(port: int, headers: dict, body: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/webhook", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_health_reveals_nothing(web, receiver, registry):
    registry.create("m", "1")
    receiver.handle(*_delivery(_created("m", "1")))
    with urllib.request.urlopen(f"http://127.0.0.1:{web.port}/health", timeout=5) as r:
        assert json.load(r) == {"status": "ok"}


def test_webhook_over_http(web, registry):
    registry.create("m", "1")
    headers, body = _delivery(_created("m", "1"))
    assert _post(web.port, headers, body) == (202, {"status": "queued", "model": "m",
                                                     "version": "1"})
    assert _post(web.port, headers, body + b" ")[0] == 401
    assert _post(web.port, headers, b"x" * 5000)[0] == 413


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3", b"99999999999999999999"])
def test_bad_content_length_is_refused_without_holding_the_server(web, length):
    t0 = time.monotonic()
    answer = _raw(web.port, b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + length + b"\r\n\r\n{}")
    assert time.monotonic() - t0 < 4
    assert not answer.startswith(b"<timeout>"), answer
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"413"), answer
    with urllib.request.urlopen(f"http://127.0.0.1:{web.port}/health", timeout=5) as r:
        assert r.status == 200  # and the server still serves


def test_idle_and_slow_connections_are_closed(web):
    # nothing sent, headers trickled, body never completed: all end within ~timeout_s (1 s)
    for data, expect in ((b"", b""), (b"POST /webhook HTTP/1.1\r\nHost: x\r\n", b""),
                         (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                          b"\r\n\r\n{\"a\"", b"408")):
        t0 = time.monotonic()
        answer = _raw(web.port, data, timeout=8)
        assert not answer.startswith(b"<timeout>"), (data, answer)
        assert time.monotonic() - t0 < 6
        if expect:
            assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == expect, answer
        else:
            assert answer == b""


def test_idle_connections_hold_no_threads_and_are_dropped(receiver):
    """Before: 300 idle connections held 305 threads of the stdlib server, for ever."""
    server = WebhookServer(receiver, "127.0.0.1", 0, limit_concurrency=400,
                           timeout_s=4.0, backlog=512).start()
    threads_before = threading.active_count()
    t0 = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(300)]
    try:
        held = _wait_for(lambda: len(server.server.server_state.connections) == 300, 10)
        assert held or time.monotonic() - t0 > 4, "connections were not all accepted"
        assert threading.active_count() < threads_before + 5  # the stdlib server: +300
        # the server closes every one of them after timeout_s
        closed = 0
        for s in idle:
            s.settimeout(10)
            closed += s.recv(1) == b""
        assert closed == 300
        assert _wait_for(lambda: not server.server.server_state.connections, 5)
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_connections_are_bounded(receiver):
    server = WebhookServer(receiver, "127.0.0.1", 0, limit_concurrency=4, timeout_s=5.0).start()
    idle = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        # the server has registered the idle connections once a 5th request is refused
        assert _wait_for_status(server.port, 503)
        for s in idle:
            s.close()
        assert _wait_for_status(server.port, 200)
    finally:
        for s in idle:
            s.close()
        server.stop()


def _wait_for_status(port: int, status: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                got = r.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        if got == status:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_burst_of_100_deliveries_from_25_clients(backend, tmp_path, monkeypatch, registry,
                                                 request):
    """100 signed deliveries (100 versions) from 25 concurrent clients, then the same 100
    events redelivered: 200 answers, 100 jobs — none lost, none duplicated."""
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    if backend == "sqlite":
        url = str(tmp_path / "jobs.db")
    else:
        url = request.getfixturevalue("postgres").create_database("burst")
    rec = make_receiver(str(policy), url, lookup=registry.lookup,
                        is_current=lambda n, v: False, certify=lambda job: None)
    server = WebhookServer(rec, "127.0.0.1", 0, limit_concurrency=64).start()
    events = [_created(f"burst-{i % 10}", str(i)) for i in range(1, 101)]
    for e in events:
        registry.create(e["data"]["name"], e["data"]["version"])
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(batch):
        for event in batch:
            try:
                status, payload = _post(server.port, *_delivery(event), timeout=30)
                answer = (status, payload.get("status", payload.get("error", "")))
            except OSError as exc:
                answer = (0, f"{type(exc).__name__}: {exc}")
            with lock:
                results.append(answer)

    try:
        for round_ in ("first", "redelivered"):
            results.clear()
            threads = [threading.Thread(target=client, args=(events[i::25],))
                       for i in range(25)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            elapsed = time.monotonic() - t0
            expected = (202, "queued") if round_ == "first" else (200, "duplicate")
            answered = sum(status != 0 for status, _ in results)
            print(f"\nburst {backend} {round_}: {len(results)} sent, {answered} answered, "
                  f"{sum(r == expected for r in results)} {expected[1]}, {elapsed:.2f} s")
            assert len(results) == 100
            assert results.count(expected) == 100, sorted(set(results))
        jobs = rec.queue.jobs()
        identities = {(j.name, j.version, j.version_created) for j in jobs}
        print(f"burst {backend}: jobs {len(jobs)}, lost {100 - len(identities)}, "
              f"duplicated {len(jobs) - len(identities)}")
        assert len(jobs) == len(identities) == 100
        assert identities == {(e["data"]["name"], e["data"]["version"],
                               registry.versions[(e["data"]["name"], e["data"]["version"])])
                              for e in events}
    finally:
        server.stop()
        rec.queue.close()


@pytest.fixture
def real_receiver(tmp_path, monkeypatch, mlflow_server):
    """A receiver as `robust-cert serve` builds it: real registry look-ups and certification."""
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    rec = make_receiver(str(policy), tmp_path / "jobs.db", tracking_uri=mlflow_server.url,
                        out_dir=tmp_path / "reports", backoff_s=0.01, max_attempts=2)
    yield rec
    rec.stop()
    rec.queue.close()


@pytest.mark.integration
def test_new_version_is_certified_automatically(mlflow_server, demo, client, real_receiver):
    """Register a version → MLflow delivers the webhook → certified → alias allowed."""
    import mlflow

    from robust_cert.digits_cnn import train_digits_cnn

    receiver = real_receiver
    server = WebhookServer(receiver, "127.0.0.1", 0).start()
    worker = threading.Thread(target=receiver.work_forever, kwargs={"poll_s": 0.1},
                              daemon=True)
    worker.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert json.load(r) == {"status": "ok"}
        mlflow.set_tracking_uri(mlflow_server.url)
        mlflow.set_registry_uri(mlflow_server.url)
        register_webhook(f"{url}/webhook", SECRET, certify_on_alias=None, name="rc-test")
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(
                train_digits_cnn(epochs=5), name="m", serialization_format="pickle",
                input_example=np.zeros((2, 1, 8, 8), "f4"), pip_requirements=["torch"],
                registered_model_name="auto-certified")
        version = str(info.registered_model_version)
        _wait_for(lambda: "robust_cert.status" in
                  client.get_model_version("auto-certified", version).tags, within_s=90,
                  poll_s=0.2)
        tags = client.get_model_version("auto-certified", version).tags
        assert tags.get("robust_cert.status") == "passed", receiver.queue.jobs()
        client.set_registered_model_alias("auto-certified", "production", version)
        # a redelivered webhook does not certify twice
        status, payload = receiver.handle(*_delivery(_created("auto-certified", version)))
        assert payload["status"] == "duplicate"
        # ... nor does reconciliation: the version carries a current certificate
        receiver.watch = ("auto-certified",)
        assert receiver.reconcile_once()["current"] == 1
        assert receiver.queue.counts() == {"done": 1}
        runs = client.search_runs(
            [client.get_run(tags["robust_cert.run_id"]).info.experiment_id],
            filter_string=f"tags.`robust_cert.model` = 'auto-certified' and "
                          f"tags.`robust_cert.version` = '{version}'")
        assert len(runs) == 1
        # an event for a model that does not exist in the registry queues nothing
        status, payload = receiver.handle(*_delivery(_created("deleted-model", "1")))
        assert (status, payload.get("reason")) == (200, "no such version")
        assert [j.name for j in receiver.queue.jobs()] == ["auto-certified"]
    finally:
        receiver.stop()
        server.stop()
        worker.join(30)


@pytest.mark.integration
def test_reconcile_certifies_what_the_webhooks_missed(mlflow_server, demo, client, tmp_path,
                                                     monkeypatch):
    """Versions created while no certifier listens (and a re-created model's new v1) are
    found by the reconciliation pass against the real registry and certified once."""
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    certified: list[tuple[str, str]] = []

    def certify(job):  # cheap stand-in; look-ups, listing and the certificate check are real
        certified.append((job.name, job.version))
        return Certified("PASS", None)

    source = client.get_model_version("digits-cnn", "2").source  # models:/m-<logged model id>
    model_id = source.removeprefix("models:/")
    name = f"reconciled-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    client.create_model_version(name, source, model_id=model_id)  # v1: nobody is listening
    client.create_model_version(name, source, model_id=model_id)  # v2
    rec = make_receiver(str(policy), tmp_path / "jobs.db", tracking_uri=mlflow_server.url,
                        watch=(name,), certify=certify, reconcile_every_s=3600)
    try:
        counts = rec.reconcile_once()
        # (other tests on the shared server change digits-cnn's certificates: watch only this)
        assert (counts["versions"], counts["queued"], counts["current"]) == (2, 2, 0), counts
        _wait_for(lambda: not rec.work_once() and not rec.queue.counts().get("queued"),
                  within_s=60)
        assert sorted(certified) == [(name, "1"), (name, "2")]
        # a second pass within the period does not queue them again
        assert rec.reconcile_once()["queued"] == 0
        # deleted and re-created: its new v1 is a new identity, found by the next pass
        client.delete_registered_model(name)
        client.create_registered_model(name)
        client.create_model_version(name, source, model_id=model_id)
        assert rec.reconcile_once()["queued"] == 1
        _wait_for(lambda: not rec.work_once() and not rec.queue.counts().get("queued"),
                  within_s=60)
        assert sorted(certified) == [(name, "1"), (name, "1"), (name, "2")]
        assert rec.queue.counts() == {"done": 3}
    finally:
        rec.queue.close()


def test_serve_refuses_bad_queue_urls_naming_the_problem(tmp_path, monkeypatch, capsys):
    from robust_cert.cli import main

    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for url, message in ((f"postgresql://u@127.0.0.1:{closed}/q",
                          "cannot reach the PostgreSQL job queue at postgresql 127.0.0.1:"),
                         ("postgresql://u@127.0.0.1:notaport/q", "port 'notaport'"),
                         ("redis://x/0", "unsupported queue URL")):
        code = main(["serve", "--policy", str(policy), "--queue-url", url,
                     "--reconcile-every", "0"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err


def test_serve_command_starts_answers_and_stops(tmp_path):
    """`robust-cert serve` as a user runs it: listens, /health answers, SIGINT ends it (0)."""
    import os
    import signal
    import subprocess
    import sys

    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ROBUST_CERT_WEBHOOK_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "robust_cert.cli", "serve", "--policy", str(policy),
         "--port", str(port), "--queue-url", f"sqlite:///{tmp_path}/jobs.db",
         "--reconcile-every", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        def health():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return json.load(r)
            except OSError:
                return None if proc.poll() is None else {"exited": proc.returncode}

        assert _wait_for(health, within_s=60, poll_s=0.2) == {"status": "ok"}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "listening on http://127.0.0.1:" in out
    assert "queue sqlite " in out


# -- a routes file: one certifier for a registry of many models ---------------------------------

ROUTES = """\
routes:
  - match: "vision-*"
    policy: vision.yaml
    data: vision.npz
  - match: "fraud-*"
    policy: fraud.yaml
    data: fraud.npz
  - match: "forecast-*"
    gate: exempt
default: required
"""


def test_routes_decide_policy_data_and_scope(tmp_path, monkeypatch, registry):
    """Each new version is certified with its rule's policy and data; exempt and unmatched
    models are not; jobs are keyed by policy and data, so a changed data file (or policy)
    re-queues the versions of its rule, and only those."""
    import mlflow.tracking

    import robust_cert.mlflow_plugin.client as mlflow_client
    from robust_cert.data import digits_split, load_data
    from robust_cert.mlflow_plugin.names import DATA_TAG

    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    (tmp_path / "vision.yaml").write_text(LENIENT.replace("digits-production", "vision"))
    (tmp_path / "fraud.yaml").write_text(LENIENT.replace("digits-production", "fraud"))
    x, y = digits_split("test")
    np.savez(tmp_path / "vision.npz", x=x[:30], y=y[:30])
    np.savez(tmp_path / "fraud.npz", x=x[30:60], y=y[30:60])
    (tmp_path / "routes.yaml").write_text(ROUTES)
    jobs = []

    def certify(job):
        plan = rec.assignment(job.name)
        jobs.append((job.name, plan.policy.name, Path(plan.data).name, plan.data_sha256))
        return Certified("PASS", "run")

    rec = make_receiver(None, tmp_path / "jobs.db", routes_path=str(tmp_path / "routes.yaml"),
                        lookup=registry.lookup, certify=certify,
                        is_current=lambda n, v: False)
    try:
        for name in ("vision-cnn", "fraud-gbm", "forecast-sales", "llm-prompt"):
            registry.versions[(name, "1")] = 1000
            status, body = rec.handle(*_delivery(_created(name, "1")))
            assert (status, body["status"]) == ((202, "queued") if name[0] in "vf" and
                                                name != "forecast-sales" else (200, "ignored"))
        _drain(rec)
        vision_sha = load_data(str(tmp_path / "vision.npz")).sha256
        fraud_sha = load_data(str(tmp_path / "fraud.npz")).sha256
        assert sorted(jobs) == [("fraud-gbm", "fraud", "fraud.npz", fraud_sha),
                                ("vision-cnn", "vision", "vision.npz", vision_sha)]
        assert rec.assignment("forecast-sales") is None
        assert rec.assignment("llm-prompt") is None
    finally:
        rec.queue.close()

    # the vision data changes: a new certifier (read at start) re-queues vision's versions
    np.savez(tmp_path / "vision.npz", x=x[:31], y=y[:31])
    new_sha = load_data(str(tmp_path / "vision.npz")).sha256
    rec = make_receiver(None, tmp_path / "jobs.db", routes_path=str(tmp_path / "routes.yaml"),
                        tracking_uri="http://registry:5000", lookup=registry.lookup,
                        certify=certify)
    try:
        client = FakeClient([
            FakeVersion("vision-cnn", "1", 1000, {
                **_certificate_tag("vision-cnn", "1", rec.assignment("vision-cnn").policy.sha256),
                DATA_TAG: vision_sha}),
            FakeVersion("fraud-gbm", "1", 1000, {
                **_certificate_tag("fraud-gbm", "1", rec.assignment("fraud-gbm").policy.sha256),
                DATA_TAG: fraud_sha}),
            FakeVersion("forecast-sales", "1", 1000), FakeVersion("llm-prompt", "1", 1000)])
        monkeypatch.setattr(mlflow.tracking, "MlflowClient", lambda **kw: client)
        monkeypatch.setattr(mlflow_client, "check_server", lambda uri: None)
        counts = rec.reconcile_once()
        # exempt and unmatched models are not even looked at; fraud's certificate is current
        assert (counts["versions"], counts["current"], counts["queued"]) == (2, 1, 1), counts
        queued = [j for j in rec.queue.jobs() if j.state == "queued"]
        assert [(j.name, j.version) for j in queued] == [("vision-cnn", "1")]
        assert rec.assignment("vision-cnn").data_sha256 == new_sha
    finally:
        rec.queue.close()


def test_burst_with_routes_two_rules_two_data_sets(tmp_path, monkeypatch, registry):
    """60 versions of four models (two rules with their own policy and data, an exempt one,
    one no rule matches; 15 each), each event delivered twice from 20 concurrent clients: the
    30 versions of the two rules make 30 jobs, each certified once with its rule's policy
    and data hash (0 lost, 0 duplicated); the 30 others are ignored and queue nothing."""
    from robust_cert.data import digits_split, load_data

    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    (tmp_path / "vision.yaml").write_text(LENIENT.replace("digits-production", "vision"))
    (tmp_path / "fraud.yaml").write_text(LENIENT.replace("digits-production", "fraud"))
    x, y = digits_split("test")
    np.savez(tmp_path / "vision.npz", x=x[:30], y=y[:30])
    np.savez(tmp_path / "fraud.npz", x=x[30:60], y=y[30:60])
    (tmp_path / "routes.yaml").write_text(ROUTES)
    expected = {"vision": ("vision", load_data(str(tmp_path / "vision.npz")).sha256),
                "fraud": ("fraud", load_data(str(tmp_path / "fraud.npz")).sha256)}
    certified: list[tuple[str, str, str, str | None]] = []
    lock = threading.Lock()

    def certify(job):
        plan = rec.assignment(job.name)
        with lock:
            certified.append((job.name, job.version, plan.policy.name, plan.data_sha256))
        return Certified("PASS", "run")

    rec = make_receiver(None, tmp_path / "jobs.db", routes_path=str(tmp_path / "routes.yaml"),
                        lookup=registry.lookup, certify=certify, is_current=lambda n, v: False)
    server = WebhookServer(rec, "127.0.0.1", 0, limit_concurrency=64).start()
    models = ("vision-cnn", "fraud-gbm", "forecast-sales", "llm-prompt")
    events = [_created(models[i % 4], str(i // 4 + 1)) for i in range(60)]
    for e in events:
        registry.create(e["data"]["name"], e["data"]["version"])
    answers: list[tuple[int, str]] = []

    def client(batch):
        for event in batch:
            try:
                status, payload = _post(server.port, *_delivery(event), timeout=30)
                answer = (status, payload.get("status", payload.get("error", "")))
            except OSError as exc:
                answer = (0, f"{type(exc).__name__}: {exc}")
            with lock:
                answers.append(answer)

    try:
        twice = events + events
        threads = [threading.Thread(target=client, args=(twice[i::20],)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(answers) == 120
        assert answers.count((202, "queued")) == 30, sorted(set(answers))
        assert answers.count((200, "duplicate")) == 30
        assert answers.count((200, "ignored")) == 60
        _drain(rec, within_s=60)
        jobs = rec.queue.jobs()
        ruled = {(e["data"]["name"], e["data"]["version"]) for e in events
                 if e["data"]["name"] in ("vision-cnn", "fraud-gbm")}
        assert {(j.name, j.version) for j in jobs} == ruled  # none lost, none for the others
        assert len(jobs) == len(ruled) == 30  # none duplicated
        assert len(certified) == 30
        assert {(n, v) for n, v, _, _ in certified} == ruled
        for name, _, policy, data_sha in certified:
            assert (policy, data_sha) == expected[name.split("-")[0]]
        keys = {j.name: set() for j in jobs}
        for j in jobs:
            keys[j.name].add(j.policy_sha256)
        assert all(len(k) == 1 for k in keys.values())  # one key per rule (policy, data)
        assert keys["vision-cnn"] != keys["fraud-gbm"]
    finally:
        server.stop()
        rec.queue.close()


def test_serve_takes_a_policy_or_routes_not_both(tmp_path, monkeypatch, capsys):
    from robust_cert.cli import main

    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "p.yaml"
    policy.write_text(LENIENT)
    with pytest.raises(SystemExit):
        main(["serve", "--policy", str(policy), "--routes", str(tmp_path / "r.yaml")])
    assert "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("routes:\n  - match: 'a-*'\n    gate: later\n")
    assert main(["serve", "--routes", str(tmp_path / "r.yaml"), "--worker-only",
                 "--queue", str(tmp_path / "q.db")]) == 2
    err = capsys.readouterr().err
    assert "r.yaml:3: routes.0.gate: Input should be 'required' or 'exempt'" in err
    assert not (tmp_path / "q.db").exists()  # refused before the queue was made
