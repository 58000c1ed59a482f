"""`robust-cert serve`: webhook verification, the durable queue, and the flow end to end."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest

from robust_cert.errors import RobustCertError
from robust_cert.jobqueue import JobQueue
from robust_cert.mlflow_plugin.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    expected_signature,
    make_http_server,
    make_receiver,
    register_webhook,
    verify_delivery,
)

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


def _wait_for(condition, within_s: float, poll_s: float = 0.2) -> None:
    """Poll ``condition`` (work happens in other threads/processes) until true or the time
    is up; the assertions after it say what was expected."""
    end = time.monotonic() + within_s
    while not condition() and time.monotonic() < end:
        time.sleep(poll_s)


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_CERT_WEBHOOK_SECRET", SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    rec = make_receiver(str(policy), tmp_path / "jobs.db", certify_on_alias="candidate",
                        out_dir=tmp_path / "reports", backoff_s=0.01, max_attempts=2)
    yield rec
    rec.queue.close()


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


def test_redelivery_is_idempotent_and_rejections_queue_nothing(receiver):
    headers, body = _delivery(_created("m", "3"))
    assert receiver.handle(headers, body) == (202, {"status": "queued", "model": "m",
                                                    "version": "3"})
    assert receiver.handle(headers, body)[1]["status"] == "duplicate"
    # a new delivery of the same event (new id) is still one job per (version, policy)
    assert receiver.handle(*_delivery(_created("m", "3")))[1]["status"] == "duplicate"
    assert receiver.handle(*_delivery(_created("m", "3"), secret="wrong"))[0] == 401
    assert receiver.handle(headers, b"{not json")[0] == 401  # body no longer matches
    assert len(receiver.queue.jobs()) == 1


def test_which_events_become_jobs(receiver):
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


def test_a_crash_leaves_jobs_to_retry(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    assert q.enqueue("m", "1", "p")
    assert q.claim().state == "running"
    q.close()  # the process dies mid-certification
    q = JobQueue(tmp_path / "q.db")
    assert q.recovered == 1
    job = q.claim()
    assert (job.name, job.version, job.attempts) == ("m", "1", 2)
    q.close()


def test_unreachable_tracking_server_retries_then_fails(receiver):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    receiver.tracking_uri = f"http://127.0.0.1:{port}"
    receiver.handle(*_delivery(_created("m", "1")))
    assert receiver.work_once()
    (job,) = receiver.queue.jobs()
    assert job.state == "queued"
    assert "cannot reach" in job.error
    time.sleep(0.05)
    assert receiver.work_once()
    (job,) = receiver.queue.jobs()
    assert job.state == "failed"
    assert "gave up after 2 attempts" in job.error


@pytest.mark.integration
def test_new_version_is_certified_automatically(mlflow_server, demo, client, receiver,
                                                tmp_path):
    """Register a version → MLflow delivers the webhook → certified → alias allowed."""
    import mlflow

    from robust_cert.digits_cnn import train_digits_cnn

    receiver.tracking_uri = mlflow_server.url
    server = make_http_server(receiver, "127.0.0.1", 0)
    threads = [threading.Thread(target=server.serve_forever, daemon=True),
               threading.Thread(target=receiver.work_forever, kwargs={"poll_s": 0.1},
                                daemon=True)]
    for t in threads:
        t.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert json.load(r)["status"] == "ok"
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
                  client.get_model_version("auto-certified", version).tags, within_s=90)
        tags = client.get_model_version("auto-certified", version).tags
        assert tags.get("robust_cert.status") == "passed", receiver.queue.jobs()
        client.set_registered_model_alias("auto-certified", "production", version)
        # a redelivered webhook does not certify twice
        status, payload = receiver.handle(*_delivery(_created("auto-certified", version)))
        assert payload["status"] == "duplicate"
        time.sleep(0.5)
        runs = client.search_runs(
            [r.experiment_id for r in [client.get_run(tags["robust_cert.run_id"]).info]],
            filter_string=f"tags.`robust_cert.model` = 'auto-certified' and "
                          f"tags.`robust_cert.version` = '{version}'")
        assert len(runs) == 1
        # an event for a model that no longer exists fails its job, never passes
        receiver.handle(*_delivery(_created("deleted-model", "1")))
        def ghost_jobs():
            return [j for j in receiver.queue.jobs() if j.name == "deleted-model"]

        _wait_for(lambda: ghost_jobs()[0].state in ("done", "failed"), within_s=30)
        ghost = ghost_jobs()
        assert ghost[0].state == "failed"
        assert "deleted-model" in ghost[0].error
    finally:
        receiver.stop()
        server.shutdown()
        server.server_close()
