"""The worked registry of docs/deployment.md §3b (examples/registry/), end to end: a real gated
`mlflow server` started with ROBUST_CERT_ROUTES and a real `robust-cert serve --routes`
process. A digits CNN is certified under one policy, a scikit-learn scorer on CSV data under
another, a regressor is exempt; a burst of duplicate, concurrent deliveries makes one job and
one certification per version; a changed policy re-certifies its rule's versions, and only
those, when the certifier restarts."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from mlflow.exceptions import MlflowException

from robust_cert.cli import main
from robust_cert.mlflow_plugin.names import CERT_TAG, DATA_TAG, POLICY_TAG
from robust_cert.routes import data_digest, load_routes
from robust_cert.signing import Keyring, verify_claim
from tests.conftest import REPO, gate_env, start_mlflow_server, stop_mlflow_server
from tests.helpers import wait_for
from tests.test_webhooks import SECRET, _created, _delivery, _post

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "registry"
CERTIFIED = ("vision-digits", "credit-scorer")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Certifier:
    """`robust-cert serve --routes` as a user starts it (a subprocess), on a fixed port."""

    def __init__(self, folder: Path, url: str, port: int):
        self.folder, self.url, self.port = folder, url, port
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, *, register: bool) -> None:
        self.starts += 1
        cmd = [sys.executable, "-m", "robust_cert.cli", "serve",
               "--routes", str(self.folder / "routes.yaml"), "--tracking-uri", self.url,
               "--port", str(self.port), "--queue-url", str(self.folder / "jobs.db"),
               "--out", str(self.folder / "reports"), "--reconcile-every", "600"]
        if register:
            cmd += ["--register", f"http://127.0.0.1:{self.port}/webhook"]
        env = {**os.environ, "ROBUST_CERT_WEBHOOK_SECRET": SECRET, "PYTHONPATH": str(REPO)}
        log = (self.folder / f"serve-{self.starts}.log").open("w")
        self.proc = subprocess.Popen(cmd, cwd=self.folder, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        assert wait_for(lambda: "listening on" in self.log() or self.proc.poll() is not None,
                        within_s=180, poll_s=0.2)
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return (self.folder / f"serve-{self.starts}.log").read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def jobs(self) -> list[tuple]:
        """(name, version, version_created, key, state) of every job in the queue."""
        with sqlite3.connect(f"file:{self.folder / 'jobs.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT name, version, version_created, policy_sha256, state "
                              "FROM robust_cert_jobs").fetchall()


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example's folder (routes, policies, generated data), the gated server and the
    certifier, with v1 of the three models registered (examples/registry/register.py) and
    the two required ones certified through the server's webhooks."""
    folder = tmp_path_factory.mktemp("registry")
    shutil.copy(EXAMPLE / "routes.yaml", folder)
    shutil.copytree(EXAMPLE / "policies", folder / "policies")
    assert _load(EXAMPLE / "make_data.py").main(["--out", str(folder / "data")]) == 0
    env = gate_env(**{"ROBUST_CERT_ROUTES": str(folder / "routes.yaml"),
                      "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                      "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                      "MLFLOW_WEBHOOK_CACHE_TTL": "0",
                      "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()})
    db = folder / "mlflow.db"
    proc, url = start_mlflow_server(folder, f"sqlite:///{db}", f"robustcert+sqlite:///{db}",
                                    env)
    certifier = Certifier(folder, url, _free_port())
    try:
        certifier.start(register=True)
        versions = _load(EXAMPLE / "register.py").register(url, folder / "data")
        assert versions == dict.fromkeys(("vision-digits", "credit-scorer", "forecast-sales"),
                                         "1")
        client = _client(url)
        for name in CERTIFIED:
            assert wait_for(lambda n=name: CERT_TAG in client.get_model_version(n, "1").tags,
                            within_s=240, poll_s=0.5), certifier.log()
        yield folder, url, certifier
    finally:
        certifier.stop()
        stop_mlflow_server(proc)


def _client(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _claim(client, name: str, version: str) -> dict:
    token = client.get_model_version(name, version).tags[CERT_TAG]
    return verify_claim(token, Keyring.from_env(), name=name, version=version)


def _policy_sha256(client, name: str, version: str) -> str | None:
    """The policy hash of the version's certificate; None while it has none (a
    re-certification withdraws the old one just before writing the new one)."""
    token = client.get_model_version(name, version).tags.get(CERT_TAG)
    return verify_claim(token, Keyring.from_env(), name=name, version=version)[
        "policy_sha256"] if token else None


def _certification_runs(client, name: str, version: str) -> int:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, f"tags.`robust_cert.model` = '{name}' and "
                                               f"tags.`robust_cert.version` = '{version}'"))


def test_each_model_gets_its_rules_policy_data_and_gate(example, capsys):
    folder, url, _ = example
    client = _client(url)
    routes = load_routes(folder / "routes.yaml")
    for name in CERTIFIED:
        route = routes.route_for(name)
        tags = client.get_model_version(name, "1").tags
        claim = _claim(client, name, "1")
        assert (claim["verdict"], claim["policy"], claim["policy_sha256"]) == \
            ("PASS", route.policies[0].name, route.policies[0].sha256), name
        assert tags[POLICY_TAG] == route.policies[0].name
        assert tags[DATA_TAG] == data_digest(route.data)  # the rule's data, as hashed
        assert _certification_runs(client, name, "1") == 1
    assert client.get_model_version("vision-digits", "1").tags[POLICY_TAG] == "registry-vision"
    assert client.get_model_version("credit-scorer", "1").tags[POLICY_TAG] == "registry-credit"
    # the regressor is exempt: never certified, promoted without a certificate
    assert not any(k.startswith("robust_cert.")
                   for k in client.get_model_version("forecast-sales", "1").tags)
    client.set_registered_model_alias("forecast-sales", "production", "1")
    # the certified ones pass the gate: through promote (policy from the routes) and directly
    assert main(["promote", "vision-digits", "1", "--routes", str(folder / "routes.yaml"),
                 "--tracking-uri", url, "--no-progress"]) == 0
    assert "vision-digits v1 is now @production" in capsys.readouterr().out
    client.set_registered_model_alias("credit-scorer", "production", "1")
    assert {n: client.get_registered_model(n).aliases.get("production")
            for n in (*CERTIFIED, "forecast-sales")} == dict.fromkeys(
                (*CERTIFIED, "forecast-sales"), "1")


def test_a_burst_of_duplicate_deliveries_makes_one_job_and_one_certificate_each(example):
    """Two new versions per required model (MLflow delivers their events as they are
    created, usually before the burst), then 16 clients deliver each version's event (old
    and new) once each, at the same time: at most one `queued` per new version, the rest
    `duplicate`, and in the end one job and one certification run per version identity — 0
    lost, 0 duplicated. (Concurrent *first* deliveries: test_webhooks.py's bursts.)"""
    folder, url, certifier = example
    client = _client(url)
    fresh = []
    for name in CERTIFIED:
        v1 = client.get_model_version(name, "1")
        for _ in range(2):
            mv = client.create_model_version(name, v1.source, run_id=v1.run_id,
                                             model_id=v1.source.removeprefix("models:/"))
            fresh.append((name, str(mv.version)))
    assert sorted(fresh) == [("credit-scorer", "2"), ("credit-scorer", "3"),
                             ("vision-digits", "2"), ("vision-digits", "3")]
    every = [(n, "1") for n in CERTIFIED] + fresh
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def deliver(batch):
        for name, version in batch:
            try:
                status, body = _post(certifier.port, *_delivery(_created(name, version)),
                                     timeout=60)
                answer = (status, body.get("status", body.get("error", "")))
            except OSError as exc:
                answer = (0, f"{type(exc).__name__}: {exc}")
            with lock:
                answers.append(answer)

    # each client delivers every version's event once, starting at a different one
    batches = [every[i % len(every):] + every[:i % len(every)] for i in range(16)]
    events = [e for batch in batches for e in batch]
    threads = [threading.Thread(target=deliver, args=(batch,)) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(answers) == len(events)
    # (503: the receiver's registry look-up timed out — on a loaded machine; MLflow would
    # redeliver — which queues nothing and so cannot lose or duplicate a job)
    assert set(answers) <= {(202, "queued"), (200, "duplicate"),
                            (503, "the registry cannot be reached; retry later")}, \
        sorted(set(answers))
    assert answers.count((202, "queued")) <= len(fresh)  # MLflow's own delivery may be first
    assert wait_for(lambda: all(CERT_TAG in client.get_model_version(n, v).tags
                                for n, v in fresh), within_s=300, poll_s=0.5), \
        certifier.log()
    assert wait_for(lambda: all(j[4] == "done" for j in certifier.jobs()), within_s=60)
    jobs = certifier.jobs()
    identities = {(n, v, c) for n, v, c, _, _ in jobs}
    created = {(n, v, client.get_model_version(n, v).creation_timestamp) for n, v in every}
    print(f"\nregistry burst: {len(events)} deliveries "
          f"({answers.count((200, 'duplicate'))} duplicate, "
          f"{sum(a[0] == 503 for a in answers)} 503), {len(jobs)} jobs for "
          f"{len(every)} versions")
    assert identities == created  # none lost
    assert len(jobs) == len(identities)  # none duplicated
    routes = load_routes(folder / "routes.yaml")
    for name, version in every:
        route = routes.route_for(name)
        assert _certification_runs(client, name, version) == 1, (name, version)
        claim = _claim(client, name, version)
        assert claim["policy_sha256"] == route.policies[0].sha256
        assert client.get_model_version(name, version).tags[DATA_TAG] == data_digest(route.data)


def test_a_changed_policy_recertifies_its_rules_versions_at_restart(example):
    """The credit policy changes and the certifier restarts: its reconciliation re-certifies
    every credit-scorer version (new policy hash), none of vision-digits'. The gate read the
    routes when it started, so it still requires the old credit policy until it restarts too
    (docs/deployment.md §3b: read at start)."""
    folder, url, certifier = example
    client = _client(url)
    versions = {name: sorted(mv.version for mv in client.search_model_versions(
        f"name='{name}'")) for name in CERTIFIED}
    before = {(n, v): _claim(client, n, v) for n in CERTIFIED for v in versions[n]}
    old_sha = load_routes(folder / "routes.yaml").route_for("credit-scorer").policies[0].sha256
    certifier.stop()
    policy = folder / "policies" / "credit.yaml"
    policy.write_text(policy.read_text().replace('version: "1.0"', 'version: "1.1"'))
    new_sha = load_routes(folder / "routes.yaml").route_for("credit-scorer").policies[0].sha256
    assert new_sha != old_sha
    certifier.start(register=False)  # the webhook exists; reconciliation runs at start
    assert wait_for(lambda: all(_policy_sha256(client, "credit-scorer", v) == new_sha
                                for v in versions["credit-scorer"]), within_s=300,
                    poll_s=0.5), certifier.log()
    for v in versions["vision-digits"]:  # another rule's versions: untouched
        assert _claim(client, "vision-digits", v) == before[("vision-digits", v)]
        assert _certification_runs(client, "vision-digits", v) == 1
    for v in versions["credit-scorer"]:
        assert _certification_runs(client, "credit-scorer", v) == 2
    jobs = certifier.jobs()
    # one new job per credit version (a new key: the policy's hash is in it), none for vision
    credit = [j for j in jobs if j[0] == "credit-scorer"]
    assert len(credit) == 2 * len(versions["credit-scorer"])
    assert len({j[3] for j in credit}) == 2
    assert len([j for j in jobs if j[0] == "vision-digits"]) == len(versions["vision-digits"])
    # the running gate still holds the routes it started with: the old credit policy
    with pytest.raises(MlflowException) as info:
        client.set_registered_model_alias("credit-scorer", "production",
                                          versions["credit-scorer"][-1])
    assert "falls under rule 2 ('credit-*') of the routes file" in info.value.message
    assert f"sha256 {old_sha[:12]}" in info.value.message
