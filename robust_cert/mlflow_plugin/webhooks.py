"""`robust-cert serve`: receive MLflow registry webhooks and certify versions automatically.

Flow: MLflow POSTs an event → the signature and timestamp are checked → the job is written to
the durable queue (:mod:`robust_cert.jobqueue`) → 200 at once → a worker thread certifies the
version with :func:`certify_version`, which writes the results and the signed certificate back
to the version (status tag last). Nothing is queued for a request that fails verification.

Settings: ``ROBUST_CERT_WEBHOOK_SECRET`` (the secret given to MLflow when the webhook was
created; required) and the signing key (``ROBUST_CERT_SIGNING_KEY`` /
``ROBUST_CERT_SIGNING_KEY_FILE``; required, so every certificate can pass the gate).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from robust_cert.errors import RobustCertError, TrackingError
from robust_cert.jobqueue import JobQueue
from robust_cert.policy import Policy, load_policy
from robust_cert.signing import Keyring

log = logging.getLogger(__name__)

SECRET_ENV = "ROBUST_CERT_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_BODY = 1 << 20


class WebhookRejected(RobustCertError):
    """A delivery that must not be acted on; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def expected_signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's v1 signature: base64(HMAC-SHA256(secret, "{delivery_id}.{timestamp}.{body}"))."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify_delivery(headers, body: bytes, secret: str, *, window_s: float = 300,
                    now: float | None = None) -> dict:
    """Return the parsed event if the delivery is authentic and fresh; else WebhookRejected
    (401 for signature/timestamp problems, 400 for a malformed body)."""
    delivery_id = headers.get(DELIVERY_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not (delivery_id and timestamp and signature):
        raise WebhookRejected(401, "missing signature, timestamp or delivery id header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise WebhookRejected(401, f"bad timestamp {timestamp!r}") from None
    now = time.time() if now is None else now
    if abs(now - ts) > window_s:
        raise WebhookRejected(401, f"stale timestamp ({int(now - ts)} s off; window "
                                   f"{int(window_s)} s)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected(400, "body is not UTF-8") from None
    if not hmac.compare_digest(expected_signature(secret, delivery_id, timestamp, text),
                               signature):
        raise WebhookRejected(401, "signature does not verify")
    try:
        event = json.loads(text)
        if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
            raise ValueError("no data object")
        if not isinstance(event.get("entity"), str) or not isinstance(event.get("action"), str):
            raise ValueError("no entity/action")
    except (ValueError, KeyError) as exc:
        raise WebhookRejected(400, f"malformed event body: {exc}") from None
    event["_delivery_id"] = delivery_id
    return event


@dataclass
class Receiver:
    """Decides which events become jobs, and runs them."""

    policy: Policy
    policy_source: str
    queue: JobQueue
    secret: str
    data: str = "digits"
    certify_on_alias: str | None = None
    tracking_uri: str | None = None
    out_dir: Path = Path("robust_cert_reports")
    window_s: float = 300
    max_attempts: int = 4
    backoff_s: float = 5.0
    seed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def job_for(self, event: dict) -> tuple[str, str] | None:
        """(name, version) to certify for this event, or None if it is not for us."""
        kind = (event["entity"], event["action"])
        data = event["data"]
        if kind == ("model_version", "created"):
            return str(data["name"]), str(data["version"])
        if (kind == ("model_version_alias", "created") and self.certify_on_alias
                and str(data.get("alias", "")).lower() == self.certify_on_alias.lower()):
            return str(data["name"]), str(data["version"])
        return None

    def handle(self, headers, body: bytes) -> tuple[int, dict]:
        """Verify, queue, answer. Never runs the certification itself."""
        try:
            event = verify_delivery(headers, body, self.secret, window_s=self.window_s)
        except WebhookRejected as exc:
            log.warning("webhook rejected (%d): %s", exc.status, exc)
            return exc.status, {"error": str(exc)}
        try:
            target = self.job_for(event)
        except KeyError as exc:
            return 400, {"error": f"event data lacks {exc}"}
        if target is None:
            return 200, {"status": "ignored", "event": f"{event['entity']}.{event['action']}"}
        name, version = target
        new = self.queue.enqueue(name, version, self.policy.sha256, event["_delivery_id"])
        log.info("%s %s v%s", "queued" if new else "already queued", name, version)
        return (202 if new else 200), {"status": "queued" if new else "duplicate",
                                       "model": name, "version": version}

    def work_once(self) -> bool:
        """Run one due job; False when there was none."""
        from robust_cert.mlflow_plugin.tracking import certify_version

        job = self.queue.claim()
        if job is None:
            return False
        uri = f"models:/{job.name}/{job.version}"
        try:
            res = certify_version(uri, self.policy, self.data, tracking_uri=self.tracking_uri,
                                  out_dir=self.out_dir / f"{job.name}-v{job.version}",
                                  seed=self.seed, progress=False,
                                  command=f"robust-cert serve (policy {self.policy_source})")
        except TrackingError as exc:  # the server may come back: retry with backoff
            if job.attempts >= self.max_attempts:
                self.queue.fail(job.id, f"gave up after {job.attempts} attempts: {exc}")
                log.error("job %s failed for good: %s", uri, exc)
            else:
                delay = self.backoff_s * 2 ** (job.attempts - 1)
                self.queue.retry_later(job.id, delay, str(exc))
                log.warning("job %s: %s; retrying in %.0f s", uri, exc, delay)
        except RobustCertError as exc:  # bad model, data, policy: retrying will not help
            self.queue.fail(job.id, str(exc))
            log.error("job %s failed: %s", uri, exc)
        except Exception as exc:  # a bug: record it, keep serving
            self.queue.fail(job.id, f"{type(exc).__name__}: {exc}")
            log.exception("job %s crashed", uri)
        else:
            self.queue.finish(job.id, res.certificate.verdict, res.run_id)
            log.info("certified %s: %s", uri, res.certificate.verdict)
        return True

    def work_forever(self, poll_s: float = 0.5) -> None:
        while not self._stop.is_set():
            if not self.work_once():
                self._stop.wait(poll_s)

    def stop(self) -> None:
        self._stop.set()


def make_receiver(policy_path: str, queue_path: str | Path, **kw) -> Receiver:
    """Build a Receiver, refusing to start (naming the setting) without its secrets."""
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise RobustCertError(f"{SECRET_ENV} is not set: it must hold the secret given to "
                              "MLflow when the webhook was created (robust-cert serve "
                              "--register creates one with it)")
    Keyring.from_env()  # raises naming ROBUST_CERT_SIGNING_KEY[_FILE] when missing
    return Receiver(policy=load_policy(policy_path), policy_source=str(policy_path),
                    queue=JobQueue(queue_path), secret=secret, **kw)


def make_http_server(receiver: Receiver, host: str, port: int) -> ThreadingHTTPServer:
    """POST /webhook (MLflow deliveries) and GET /health (queue counts)."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._answer(200, {"status": "ok", "jobs": receiver.queue.counts(),
                                   "policy": receiver.policy.name})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self):
            if self.path.rstrip("/") != "/webhook":
                self._answer(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._answer(413, {"error": "body too large"})
                return
            status, payload = receiver.handle(self.headers, self.rfile.read(length))
            self._answer(status, payload)

        def log_message(self, fmt, *args):
            log.info("%s %s", self.address_string(), fmt % args)

    return ThreadingHTTPServer((host, port), Handler)


def register_webhook(url: str, secret: str, *, certify_on_alias: str | None,
                     name: str = "robust-cert") -> str:
    """Create the webhook on the MLflow server (events: version created, alias created)."""
    from mlflow.tracking import MlflowClient

    events = ["model_version.created"]
    if certify_on_alias:
        events.append("model_version_alias.created")
    hook = MlflowClient().create_webhook(name=name, url=url, events=events, secret=secret,
                                         description="robust_cert automatic certification")
    return hook.webhook_id
