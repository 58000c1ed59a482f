"""`robust-cert serve`: certify registry versions automatically — level-triggered.

Edges: MLflow POSTs a registry event → the signature and timestamp are checked → the version's
identity (name, version, the registry's creation timestamp) is looked up → the job is written to
the durable queue (:mod:`robust_cert.jobqueue`) → 202 at once. Nothing is queued for a delivery
that fails verification.

Level: webhooks can be lost (the certifier was down, the tracking server was down, MLflow gave
up retrying), so a *reconciliation loop* lists the watched models' versions every
``reconcile_every_s`` and queues every version without a current certificate (as
:func:`robust_cert.mlflow_plugin.promotion.has_current_certificate` decides: a certificate that
verifies under the certifier's keys *and* was issued under the receiver's policy — same
SHA-256 — so changing the policy re-certifies every version). Work is delayed by an outage,
never lost.

Work: workers (threads here, or other processes and machines sharing a PostgreSQL queue)
claim jobs under a renewed lease and certify each with :func:`certify_version`. A transient
error (tracking server unreachable) is retried quickly (``max_attempts`` per round, backoff
``backoff_s``·2ⁿ), then the job is marked failed with a capped exponential retry
(``retry_base_s``·2ⁿ, at most ``retry_cap_s``); a new delivery re-queues a failed job at once.
Any other failure (bad model, data or policy; a crash; a CUDA out-of-memory surfacing as a model
error) is also retried with that backoff: the certifier cannot tell a permanent error from a
transient one, and a permanent one costs one attempt per ``retry_cap_s``. Only a job whose
version identity no longer exists (deleted, or re-created: a new identity, a new job) is not
retried.
A job whose version already carries a current certificate ends without a new certification
unless it was asked for on demand (``--certify-on-alias``). Guarantee: at-least-once delivery
and reconciliation + idempotent certification = exactly one certification per version identity
(plus one per explicit on-demand request).

HTTP: uvicorn + Starlette. ``POST /webhook`` (bodies up to ``max_body`` bytes; a malformed or
negative Content-Length is refused with 400, a larger one with 413; a body that does not arrive
within ``body_timeout_s`` gets 408), ``GET /health`` (``{"status": "ok"}``, nothing else).
Connections are bounded (``limit_concurrency``: beyond it uvicorn answers 503); a connection
that sends no complete request headers within ``timeout_s`` is closed; handlers run in a
bounded thread pool.

Settings: ``ROBUST_CERT_WEBHOOK_SECRET`` (the secret given to MLflow when the webhook was
created; required) and the signing key (``ROBUST_CERT_SIGNING_KEY`` /
``ROBUST_CERT_SIGNING_KEY_FILE``; required, so every certificate can pass the gate).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from robust_cert.errors import RobustCertError, TrackingError
from robust_cert.jobqueue import Job, JobQueue, QueueError, default_worker_id, open_queue
from robust_cert.mlflow_plugin.promotion import PROBE_PREFIX
from robust_cert.policy import Policy, load_policy
from robust_cert.routes import Routes, data_digest, load_routes
from robust_cert.signing import Keyring, canonical_version

if TYPE_CHECKING:  # mlflow is imported where it is used
    from mlflow.entities.webhook import WebhookEvent, WebhookEventStr

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
    if not hmac.compare_digest(expected_signature(secret, delivery_id, timestamp, text).encode(),
                               signature.encode()):
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


# -- the registry ----------------------------------------------------------------------------

def registry_lookup(tracking_uri: str | None, timeout_s: float = 5.0
                    ) -> Callable[[str, str], int | None]:
    """A function (name, version) → the version's creation timestamp (ms) in the registry, or
    None when no such version exists; TrackingError when the registry cannot be asked. One
    request, no retries, ``timeout_s``: the webhook handler must answer fast (MLflow redelivers
    on 5xx, and the reconciliation loop catches up anyway)."""

    def lookup(name: str, version: str) -> int | None:
        import mlflow

        uri = tracking_uri or mlflow.get_registry_uri()
        if uri.startswith(("http://", "https://")):
            from mlflow.utils.credentials import get_default_host_creds
            from mlflow.utils.rest_utils import http_request

            try:
                resp = http_request(get_default_host_creds(uri),
                                    "/api/2.0/mlflow/model-versions/get", "GET",
                                    max_retries=0, timeout=timeout_s, raise_on_status=False,
                                    params={"name": name, "version": str(version)})
            except Exception as exc:  # requests/urllib3 errors, MlflowException on timeouts
                raise TrackingError(f"cannot reach the MLflow registry at {uri}: "
                                    f"{exc}") from None
            assert resp is not None  # an http(s) registry: requests' response
            if resp.status_code == 200:
                try:
                    return int(resp.json()["model_version"]["creation_timestamp"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise TrackingError(f"the MLflow registry at {uri} answered an unexpected "
                                        f"model version for {name} v{version}: {exc}") from None
            try:
                code = resp.json().get("error_code", "")
            except ValueError:
                code = ""
            if resp.status_code == 404 or code in ("RESOURCE_DOES_NOT_EXIST",
                                                   "INVALID_PARAMETER_VALUE"):
                return None
            raise TrackingError(f"the MLflow registry at {uri} answered {resp.status_code} "
                                f"for {name} v{version}: {resp.text[:200]}")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(
                name, str(version))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise TrackingError(f"registry {uri}: {exc.message}") from None
        return int(mv.creation_timestamp)

    return lookup


def _version(version) -> str:
    """The event's version in its one canonical spelling (:func:`canonical_version`: MLflow
    writes "1"; "01", " 1" or "1\\n" are refused), so one version has one job."""
    try:
        return str(canonical_version(version))
    except ValueError:
        raise ValueError(f"bad model version {str(version)[:20]!r}") from None


def next_round_in(failures: int, base_s: float, cap_s: float) -> float:
    """Seconds until a failed job's next round: ``base_s``·2^failures, at most ``cap_s``."""
    return min(cap_s, base_s * 2 ** min(max(failures, 0), 64))  # no float overflow


@dataclass
class Certified:
    verdict: str | None
    run_id: str | None


# -- the receiver, workers and reconciliation ------------------------------------------------

@dataclass(frozen=True)
class Assignment:
    """What a model's versions are certified with: the policy, the data, the gradient twin,
    and the job key (the policy's SHA-256; with a routes file, the SHA-256 of the policy's and
    the data's, so a changed policy or data file makes new jobs)."""

    policy: Policy
    policy_source: str
    data: Any  # what load_data takes: a reference, or a DataSpec with its options
    data_sha256: str | None
    key: str
    gradient_twin: str | None = None
    rule: str | None = None


@dataclass
class Receiver:
    """Decides which events become jobs, runs them, and reconciles with the registry.

    One ``policy`` (and ``data``) for every watched model, or a ``routes`` file
    (:mod:`robust_cert.routes`): each model's rule names its policy, data and gradient twin;
    models of exempt rules, and those no rule matches, are not certified."""

    policy: Policy | None
    policy_source: str
    queue: JobQueue
    secret: str
    data: Any = "digits"  # a data reference, or a DataSpec with its options
    routes: Routes | None = None
    certify_on_alias: str | None = None
    tracking_uri: str | None = None
    out_dir: Path = Path("robust_cert_reports")
    window_s: float = 300
    max_attempts: int = 4
    backoff_s: float = 5.0
    retry_base_s: float = 60.0
    retry_cap_s: float = 3600.0
    reconcile_every_s: float = 300.0
    watch: tuple[str, ...] = ()
    seed: int = 0
    worker_id: str = field(default_factory=default_worker_id)
    #: (name, version) -> registry creation timestamp (ms) or None; TrackingError if down
    lookup: Callable[[str, str], int | None] | None = None
    #: (name, version) -> whether it carries a current certificate (default: as `verify` and
    #: the gate decide, promotion.has_current_certificate with the certifier's keys and this
    #: receiver's policy SHA-256)
    is_current: Callable[[str, str], bool] | None = None
    #: (job) -> Certified; the real certification unless a test injects another
    certify: Callable[[Job], Certified] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _keyring: Keyring | None = field(default=None, repr=False)
    _assignments: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.lookup is None:
            self.lookup = registry_lookup(self.tracking_uri)
        if self.is_current is None:
            from robust_cert.mlflow_plugin.tracking import signing_keyring

            self._keyring = signing_keyring()
            self.is_current = self._has_current_certificate
        if self.certify is None:
            self.certify = self._certify_version
        if (self.policy is None) == (self.routes is None):
            raise RobustCertError("a receiver certifies with one policy or with a routes file")
        if self.routes is not None:  # every rule's policy and data, loaded and hashed now
            for index, _rule in self.routes.required_rules():
                self._rule_assignment(index)

    def _rule_assignment(self, index: int) -> Assignment:
        if index not in self._assignments:
            assert self.routes is not None  # asked of a routes file's rules only
            route = self.routes.route_for_rule(index)
            # a rule's route, and a required rule's (as the callers ask): it names its data
            assert route.rule is not None
            assert route.data is not None
            first = route.policies[0]
            policy = load_policy(first.path)
            options = route.rule.data.options if route.rule.data is not None else {}
            data_sha = route.data_sha256 or data_digest(
                route.data, input_range=policy.data_range, **options)
            key = hashlib.sha256(f"{policy.sha256}:{data_sha}".encode()).hexdigest()
            self._assignments[index] = Assignment(
                policy, str(first.path), route.data_spec, data_sha, key,
                route.rule.gradient_twin, route.label)
        return self._assignments[index]

    def assignment(self, name: str) -> Assignment | None:
        """How ``name``'s versions are certified; None when they are not (an exempt rule, or
        no rule matches)."""
        if self.routes is None:
            assert self.policy is not None  # one policy or a routes file: __post_init__
            return Assignment(self.policy, self.policy_source, self.data, None,
                              self.policy.sha256)
        route = self.routes.route_for(name)
        if route.rule is None or route.gate == "exempt":
            return None
        assert route.index is not None  # a rule's route
        return self._rule_assignment(route.index)

    # -- edges: webhook deliveries --------------------------------------------------------
    def job_for(self, event: dict) -> tuple[str, str, bool] | None:
        """(name, version, on_demand) to certify for this event, or None if it is not for us."""
        kind = (event["entity"], event["action"])
        data = event["data"]
        if kind == ("model_version", "created"):
            return str(data["name"]), _version(data["version"]), False
        if (kind == ("model_version_alias", "created") and self.certify_on_alias
                and str(data.get("alias", "")).lower() == self.certify_on_alias.lower()):
            return str(data["name"]), _version(data["version"]), True
        return None

    def handle(self, headers, body: bytes) -> tuple[int, dict]:
        """Verify, look up the version's identity, queue, answer. Never certifies itself.

        202 queued/requeued, 200 duplicate or ignored, 401/400 rejected, 503 when the registry
        or the queue cannot be reached (MLflow redelivers; reconciliation catches up)."""
        try:
            event = verify_delivery(headers, body, self.secret, window_s=self.window_s)
        except WebhookRejected as exc:
            log.warning("webhook rejected (%d): %s", exc.status, exc)
            return exc.status, {"error": str(exc)}
        try:
            target = self.job_for(event)
        except KeyError as exc:
            return 400, {"error": f"event data lacks {exc}"}
        except ValueError as exc:
            return 400, {"error": str(exc)}
        if target is None:
            return 200, {"status": "ignored", "event": f"{event['entity']}.{event['action']}"}
        name, version, on_demand = target
        if name.startswith(PROBE_PREFIX):  # `robust-cert doctor`'s throw-away probe model
            return 200, {"status": "ignored", "reason": "doctor probe", "model": name}
        plan = self.assignment(name)
        if plan is None:
            assert self.routes is not None  # a single policy certifies every model
            label = self.routes.route_for(name).label
            return 200, {"status": "ignored", "model": name,
                         "reason": f"not certified under the routes ({label})"}
        assert self.lookup is not None  # set in __post_init__
        try:
            created = self.lookup(name, version)
        except RobustCertError as exc:
            log.warning("cannot look up %s v%s: %s", name, version, exc)
            return 503, {"error": "the registry cannot be reached; retry later"}
        if created is None:
            log.info("ignored %s v%s: no such version in the registry", name, version)
            return 200, {"status": "ignored", "reason": "no such version",
                         "model": name, "version": version}
        try:
            status = self.queue.enqueue(name, version, created, plan.key,
                                        event["_delivery_id"], force=on_demand)
        except QueueError as exc:
            log.error("cannot queue %s v%s: %s", name, version, exc)
            return 503, {"error": "the job queue cannot be reached; retry later"}
        log.info("%s %s v%s", status, name, version)
        return (202 if status != "duplicate" else 200), {"status": status, "model": name,
                                                         "version": version}

    # -- level: reconciliation ----------------------------------------------------------------
    def _client(self):
        """An MlflowClient for the tracking server, after checking (in seconds, not the
        client's minutes of retries) that it answers; TrackingError when it does not."""
        import mlflow
        from mlflow.tracking import MlflowClient

        from robust_cert.mlflow_plugin.client import check_server

        uri = self.tracking_uri or mlflow.get_tracking_uri()
        check_server(uri)
        return MlflowClient(tracking_uri=uri, registry_uri=self.tracking_uri or None)

    def _has_current_certificate(self, name: str, version: str, client=None) -> bool:
        """A certificate verifying under the certifier's keys, issued under the model's policy
        (its SHA-256): one under another policy is not current; with a routes file, also made
        on the rule's data (the version's data tag, written by the certification). ``client``:
        reuse one (the reconciliation pass) instead of building and health-checking a new
        one."""
        from robust_cert.mlflow_plugin.names import DATA_TAG
        from robust_cert.mlflow_plugin.promotion import has_current_certificate

        plan = self.assignment(name)
        if plan is None:
            return True  # nothing to certify
        client = client if client is not None else self._client()
        if plan.data_sha256 is not None and \
                client.get_model_version(name, version).tags.get(DATA_TAG) != plan.data_sha256:
            return False
        return has_current_certificate(client, name, version, self._keyring,
                                       policy_sha256=plan.policy.sha256)

    def _current_check(self, client) -> Callable[[str, str], bool]:
        """``is_current`` for one reconciliation pass: the default check on ``client``."""
        if self.is_current == self._has_current_certificate:  # not replaced (by a test)
            return lambda name, version: self._has_current_certificate(name, version, client)
        assert self.is_current is not None  # set in __post_init__
        return self.is_current

    def _watched_versions(self, client):
        names = list(self.watch)
        if not names:
            token = None
            while True:
                page = client.search_registered_models(max_results=1000, page_token=token)
                names += [m.name for m in page]
                token = page.token
                if not token:
                    break
        for name in names:
            if name.startswith(PROBE_PREFIX):  # `robust-cert doctor`'s probe: never certified
                continue
            if self.assignment(name) is None:  # exempt, or no rule names its policy
                continue
            escaped = name.replace("'", "\\'")
            token = None
            while True:
                page = client.search_model_versions(f"name='{escaped}'", max_results=1000,
                                                    page_token=token)
                yield from page
                token = page.token
                if not token:
                    break

    def reconcile_once(self) -> dict[str, int]:
        """Queue every watched version without a current certificate; returns counts.

        Per version: no job yet and no current certificate → queued; a finished job whose
        certificate is no longer current (removed, key rotated away) and that finished more than
        one period ago → re-queued; queued/running jobs and failed ones with a retry time are
        left to the workers (a failed one comes back at its retry time); a failed job without
        one (a queue written by an older certifier) → re-queued. One MLflow client (and one
        server check) serves the whole pass."""
        from mlflow.exceptions import MlflowException

        counts = {"versions": 0, "queued": 0, "requeued": 0, "current": 0, "pending": 0,
                  "failed": 0}
        try:
            client = self._client()
            versions = list(self._watched_versions(client))
        except MlflowException as exc:
            raise TrackingError(f"cannot list registry versions: {exc.message}") from None
        now = time.time()
        is_current = self._current_check(client)
        for mv in versions:
            counts["versions"] += 1
            name, version = mv.name, str(mv.version)
            created = int(mv.creation_timestamp)
            key = cast(Assignment, self.assignment(name)).key  # watched: it has one
            job = self.queue.find(name, version, created, key)
            if job is not None and job.state in ("queued", "running"):
                counts["pending"] += 1
                continue
            if job is not None and job.state == "failed" and job.retry_at is not None:
                counts["failed"] += 1
                continue
            if is_current(name, version):
                counts["current"] += 1
                continue
            if job is None or job.state == "failed":  # new, or failed with no retry time
                status = self.queue.enqueue(name, version, created, key)
            elif now - (job.updated_at or 0) > self.reconcile_every_s:
                status = self.queue.enqueue(name, version, created, key, force=True)
            else:
                counts["pending"] += 1
                continue
            if status != "duplicate":
                counts[status] += 1
                log.info("reconcile: %s %s v%s (no current certificate)", status, name,
                         version)
        return counts

    def reconcile_forever(self) -> None:
        """Reconcile now and then every ``reconcile_every_s`` until `stop`; errors are logged
        and the next period tries again."""
        while not self._stop.is_set():
            try:
                counts = self.reconcile_once()
                if counts["queued"] or counts["requeued"]:
                    log.info("reconcile: %s", counts)
            except RobustCertError as exc:
                log.warning("reconcile: %s; next try in %.0f s", exc, self.reconcile_every_s)
            except Exception:
                log.exception("reconcile crashed; next try in %.0f s", self.reconcile_every_s)
            self._stop.wait(self.reconcile_every_s)

    # -- work -----------------------------------------------------------------------------------
    def _certify_version(self, job: Job) -> Certified:
        from robust_cert.mlflow_plugin.tracking import certify_version

        plan = self.assignment(job.name)
        if plan is None:
            raise RobustCertError(f"{job.name} is no longer certified under the routes")
        twin = plan.gradient_twin.replace("{version}", str(job.version)) \
            if plan.gradient_twin else None
        where = f"policy {plan.policy_source}" + (f", {plan.rule}" if plan.rule else "")
        res = certify_version(f"models:/{job.name}/{job.version}", plan.policy, plan.data,
                              tracking_uri=self.tracking_uri,
                              out_dir=self.out_dir / f"{job.name}-v{job.version}",
                              seed=self.seed, progress=False, gradient_twin=twin,
                              command=f"robust-cert serve ({where})")
        assert res is not None  # one process: the certification
        return Certified(res.certificate.verdict, res.run_id)

    def _heartbeat(self, job: Job, done: threading.Event) -> None:
        every = max(self.queue.lease_s / 3, 0.05)
        while not done.wait(every):
            try:
                if not self.queue.renew(job.id, self.worker_id):
                    log.warning("job %d (%s v%s): lease lost to another worker", job.id,
                                job.name, job.version)
                    return
            except QueueError as exc:
                log.warning("job %d: cannot renew the lease: %s", job.id, exc)

    def work_once(self) -> bool:
        """Run one due job; False when there was none."""
        job = self.queue.claim(self.worker_id)
        if job is None:
            return False
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, done), daemon=True,
                                name=f"lease-{job.id}")
        beat.start()
        try:
            self._run(job)
        finally:
            done.set()
            beat.join()
        return True

    def _run(self, job: Job) -> None:
        uri = f"models:/{job.name}/{job.version}"
        q, me = self.queue, self.worker_id
        retry_in = next_round_in(job.failures, self.retry_base_s, self.retry_cap_s)
        # set in __post_init__
        assert self.lookup is not None
        assert self.is_current is not None
        assert self.certify is not None
        if job.attempts > self.max_attempts:  # only lease expiries push it past: workers died
            q.fail(job.id, me, f"attempt {job.attempts} of at most {self.max_attempts}: "
                               "earlier workers stopped mid-job (killed, out of memory?); "
                               f"next round in {retry_in:.0f} s", retry_in=retry_in)
            log.error("job %s: workers keep dying on it; next round in %.0f s", uri, retry_in)
            return
        try:
            created = self.lookup(job.name, job.version)
            if created != job.version_created:
                why = ("no longer exists" if created is None else
                       "was deleted and re-created since (a newer job covers the new one)")
                # not retried: this identity cannot come back (a re-created version is a new
                # identity, a new job); should the look-up have been wrong, the reconciliation
                # pass, which lists the version, re-queues the job
                q.fail(job.id, me, f"{job.name} v{job.version} {why}")
                log.error("job %s: %s %s", uri, uri, why)
                return
            if not job.force and self.is_current(job.name, job.version):
                q.finish(job.id, me, None, None, "already carries a current certificate")
                log.info("job %s: already certified", uri)
                return
            res = self.certify(job)
        except TrackingError as exc:  # the server may come back: retry with backoff
            if job.attempts >= self.max_attempts:
                q.fail(job.id, me, f"gave up after {job.attempts} attempts: {exc}",
                       retry_in=retry_in)
                log.error("job %s failed: %s; next round in %.0f s", uri, exc, retry_in)
            else:
                delay = self.backoff_s * 2 ** (job.attempts - 1)
                q.retry_later(job.id, me, delay, str(exc))
                log.warning("job %s: %s; retrying in %.0f s", uri, exc, delay)
        except RobustCertError as exc:
            # bad model, data or policy — or a transient error surfacing as one (CUDA out of
            # memory as a ModelError): retried at the next round, never dropped
            q.fail(job.id, me, str(exc), retry_in=retry_in)
            log.error("job %s failed: %s; next round in %.0f s", uri, exc, retry_in)
        except Exception as exc:  # a bug (or a transient fault): record it, keep serving
            q.fail(job.id, me, f"{type(exc).__name__}: {exc}", retry_in=retry_in)
            log.exception("job %s crashed; next round in %.0f s", uri, retry_in)
        else:
            if q.finish(job.id, me, res.verdict, res.run_id):
                log.info("certified %s: %s", uri, res.verdict)
            else:
                log.warning("certified %s, but the job had been handed to another worker", uri)

    def work_forever(self, poll_s: float = 0.5) -> None:
        while not self._stop.is_set():
            try:
                busy = self.work_once()
            except QueueError as exc:  # the queue's database is down: wait, then try again
                log.warning("job queue: %s", exc)
                busy = False
            if not busy:
                self._stop.wait(poll_s)

    def stop(self) -> None:
        self._stop.set()


def make_receiver(policy_path: str | None, queue_url: str | Path, *,
                  lease_s: float | None = None, receive: bool = True,
                  routes_path: str | None = None, **kw) -> Receiver:
    """Build a Receiver, refusing to start (naming the setting) without its secrets.

    ``queue_url``: a sqlite file path (the embedded default) or ``postgresql://…``.
    ``receive=False``: a worker that takes no webhooks (no webhook secret needed)."""
    secret = os.environ.get(SECRET_ENV, "")
    if not secret and receive:
        raise RobustCertError(f"{SECRET_ENV} is not set: it must hold the secret given to "
                              "MLflow when the webhook was created (robust-cert serve "
                              "--register creates one with it)")
    # a certifier signs: raises naming ROBUST_CERT_SIGNING_KEY[_FILE] without a private key
    Keyring.from_env(require_private=True)
    if (policy_path is None) == (routes_path is None):
        raise RobustCertError("give the certifier a policy (--policy) or a routes file "
                              "(--routes), not both")
    policy = load_policy(policy_path) if policy_path is not None else None
    routes = load_routes(routes_path) if routes_path is not None else None
    queue = open_queue(queue_url, **({} if lease_s is None else {"lease_s": lease_s}))
    try:
        return Receiver(policy=policy, policy_source=str(policy_path or routes_path),
                        queue=queue, secret=secret, routes=routes, **kw)
    except BaseException:
        queue.close()
        raise


# -- HTTP: uvicorn + Starlette ------------------------------------------------------------------

class _BodyTooLarge(Exception):
    pass


def make_app(receiver: Receiver, *, max_body: int = MAX_BODY, body_timeout_s: float = 10.0):
    """The Starlette app: POST /webhook, GET /health."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def read_body(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def webhook(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.isdigit():
                return JSONResponse({"error": f"bad Content-Length {length[:20]!r}"}, 400)
            if int(length) > max_body:
                return JSONResponse({"error": f"body larger than {max_body} bytes"}, 413)
        try:
            body = await asyncio.wait_for(read_body(request), timeout=body_timeout_s)
        except _BodyTooLarge:
            return JSONResponse({"error": f"body larger than {max_body} bytes"}, 413)
        except (asyncio.TimeoutError, TimeoutError):
            return JSONResponse({"error": f"body not received within {body_timeout_s:.0f} s"},
                                408, headers={"Connection": "close"})
        except ClientDisconnect:
            return JSONResponse({"error": "client disconnected"}, 400)
        status, payload = await run_in_threadpool(receiver.handle, request.headers, body)
        return JSONResponse(payload, status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})  # no policy, no counts: anyone can ask

    return Starlette(routes=[Route("/webhook", webhook, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def _protocol_with_header_timeout(timeout_s: float):
    """uvicorn's h11 protocol, plus: a connection that has no request in progress (fresh, or
    idle between keep-alive requests, or trickling its headers) is closed after
    ``timeout_s`` — uvicorn itself times out only idle keep-alive connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None

        def _arm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _header_timeout(self):
            in_request = self.cycle is not None and not self.cycle.response_complete
            if not in_request and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


class WebhookServer:
    """uvicorn serving :func:`make_app` with bounded connections and read timeouts.

    ``run()`` serves in the calling (main) thread until SIGINT/SIGTERM; ``start()`` serves in
    a background thread (tests, embedding) and returns once it listens; ``stop()`` ends it."""

    def __init__(self, receiver: Receiver, host: str = "127.0.0.1", port: int = 8765, *,
                 limit_concurrency: int = 64, timeout_s: float = 10.0, max_body: int = MAX_BODY,
                 backlog: int = 128, log_level: str = "warning"):
        import uvicorn

        app = make_app(receiver, max_body=max_body, body_timeout_s=timeout_s)
        self.config = uvicorn.Config(
            app, host=host, port=port, http=_protocol_with_header_timeout(timeout_s),
            limit_concurrency=limit_concurrency, timeout_keep_alive=max(1, int(timeout_s)),
            backlog=backlog, lifespan="off", access_log=False, log_level=log_level,
            h11_max_incomplete_event_size=64 * 1024, server_header=False)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def run(self) -> None:
        self.server.run()

    def start(self, timeout_s: float = 15.0) -> WebhookServer:
        self._thread = threading.Thread(target=self.server.run, name="webhook-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RobustCertError(f"the webhook server did not start on "
                                      f"{self.config.host}:{self.config.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)


def register_webhook(url: str, secret: str, *, certify_on_alias: str | None,
                     name: str = "robust-cert") -> str:
    """Create the webhook on the MLflow server (events: version created, alias created)."""
    from mlflow.tracking import MlflowClient

    events: list[WebhookEventStr | WebhookEvent] = ["model_version.created"]
    if certify_on_alias:
        events.append("model_version_alias.created")
    hook = MlflowClient().create_webhook(name=name, url=url, events=events, secret=secret,
                                         description="robust_cert automatic certification")
    return hook.webhook_id
