"""Shared fixtures: one thread, a trained digits CNN per session, one real MLflow server."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from robust_cert.signing import private_pem, public_pem

torch.set_num_threads(1)
os.environ.setdefault("ROBUST_CERT_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
#: The certifier's Ed25519 private key in the tests (PEM, fixed so runs are comparable); the
#: test servers' gates hold only its public half, PUBLIC_KEY (ROBUST_CERT_PUBLIC_KEYS).
_TEST_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"robust_cert test signing key").digest())
SIGNING_KEY = private_pem(_TEST_KEY)
PUBLIC_KEY = public_pem(_TEST_KEY.public_key())
os.environ["ROBUST_CERT_SIGNING_KEY"] = SIGNING_KEY
#: Policies the test server's gate allows for production.
ALLOWED_POLICIES = "digits-production"

REPO = Path(__file__).resolve().parents[1]
DIGITS_POLICY = REPO / "examples" / "policies" / "digits.yaml"


#: Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``), the folder where the workers
#: write the group of each test they collected (tests/conftest.py's own scheduler reads it).
_GROUPS_ENV = "ROBUST_CERT_TEST_GROUPS"


def _group(item) -> str | None:
    """The scheduling unit of a test: ``demo`` for every test that uses the `demo` fixture (a
    demo run on a real server, minutes, built once per worker that needs it); its file for any
    other test that uses a module- or class-scoped fixture (built once); None (on its own) for
    the rest. Session fixtures such as `digits_model` or `postgres` are built once per worker."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    if "demo" in info.names_closure:
        return "demo"
    if any(d.scope in ("module", "class") for defs in info.name2fixturedefs.values()
           for d in defs):
        return item.nodeid.split("::")[0]
    return None


def pytest_configure(config):
    # the xdist controller (its workers have a workerinput attribute) makes the folder
    # before it starts the workers, which inherit the environment
    if getattr(config.option, "dist", "no") == "loadgroup" and \
            not hasattr(config, "workerinput"):
        import tempfile

        folder = tempfile.mkdtemp(prefix="robust-cert-test-groups-")
        os.environ[_GROUPS_ENV] = folder
        config.add_cleanup(lambda: __import__("shutil").rmtree(folder, ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    """On an xdist worker under ``--dist loadgroup``: write {test id: group} (see `_group`)
    for the controller's scheduler. (xdist's own loadgroup marks rename the test ids, which
    pytest 9's ids no longer allow; this does the same through a file.)"""
    folder = os.environ.get(_GROUPS_ENV)
    worker = getattr(config, "workerinput", {}).get("workerid")
    if folder and worker:
        import json

        groups = {item.nodeid: g for item in items if (g := _group(item)) is not None}
        tmp = Path(folder) / f".{worker}.json"
        tmp.write_text(json.dumps(groups))
        tmp.replace(Path(folder) / f"{worker}.json")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups the workers wrote: each group is one unit of
    work sent to one worker, every other test is a unit of its own; the units go out largest
    first (xdist's LoadScopeScheduling)."""
    folder = os.environ.get(_GROUPS_ENV)
    if getattr(config.option, "dist", "no") != "loadgroup" or not folder:
        return None
    import json

    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        _groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # every worker collected the same tests: read one
                files = sorted(Path(folder).glob("gw*.json"))
                self._groups = json.loads(files[0].read_text()) if files else {}
            return self._groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def digits_model():
    """A standard-trained digits CNN (a few seconds on one thread)."""
    from robust_cert.digits_cnn import train_digits_cnn

    return train_digits_cnn(epochs=15, seed=0)


@dataclass(frozen=True)
class Server:
    url: str
    root: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gate_env(**extra) -> dict:
    """Environment of a gated test server: public key only (the private key is removed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUST_CERT_SIGNING_KEY")}
    env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                "ROBUST_CERT_PUBLIC_KEYS": PUBLIC_KEY,
                "ROBUST_CERT_ALLOWED_POLICIES": ALLOWED_POLICIES})
    env.update(extra)
    return env


def start_mlflow_server(root: Path, backend: str, registry: str, env: dict):
    """Start `mlflow server` (one worker) on a free loopback port; return (process, url) once
    /health answers. Its output goes to root/server.log."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend, "--registry-store-uri", registry,
           "--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)


def stop_mlflow_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, sqlite store, registry behind the robust_cert gate.

    Yields an object with ``url`` and ``root`` (where the store and artifacts live)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    env = gate_env(**{
        # webhooks to a receiver on loopback (tests/test_webhooks.py)
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "0",  # see a webhook created mid-session at once
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()})
    db = root / "mlflow.db"
    proc, url = start_mlflow_server(root, f"sqlite:///{db}", f"robustcert+sqlite:///{db}", env)
    yield Server(url, root)
    stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def pg_mlflow_server(postgres, tmp_path_factory):
    """A second real `mlflow server` whose stores live in PostgreSQL (a database of the
    session's `postgres` server), registry behind ``robustcert+postgresql://``. Same
    settings (public key, allowed policies) as `mlflow_server`."""
    root = tmp_path_factory.mktemp("pg_mlflow_server")
    db = postgres.create_database("gate_battery")
    proc, url = start_mlflow_server(root, db, "robustcert+" + db, gate_env())
    yield Server(url, root)
    stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def demo(mlflow_server, tmp_path_factory):
    """`robust-cert demo` run once against the server: (url, workdir, exit code).

    Version 1 of digits-cnn fails the digits policy, version 2 passes with a signed certificate;
    version 3 (version 2 exported to ONNX, version 2 as gradient twin) passes digits-onnx.yaml.
    """
    from robust_cert.cli import main

    workdir = tmp_path_factory.mktemp("demo") / "out"
    code = main(["demo", "--workdir", str(workdir), "--tracking-uri", mlflow_server.url,
                 "--no-progress"])
    return mlflow_server.url, workdir, code


@pytest.fixture(scope="session")
def client(demo):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=demo[0], registry_uri=demo[0])


#: MLflow's exported variables as the session found them (see _fresh_mlflow_uris).
_EXPORTED_AT_START = {k: os.environ.get(k) for k in ("MLFLOW_EXPERIMENT_ID",
                                                     "MLFLOW_EXPERIMENT_NAME",
                                                     "MLFLOW_TRACKING_URI",
                                                     "MLFLOW_REGISTRY_URI")}


@pytest.fixture(autouse=True)
def _fresh_mlflow_uris():
    """Each test starts with no process-wide tracking/registry URI and no active experiment
    set by an earlier test (mlflow.set_tracking_uri / set_registry_uri / set_experiment are
    global, and each also exports its value: MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI,
    MLFLOW_EXPERIMENT_ID. An exported registry URI outlives the global: a later fixture that
    sets only the tracking URI would register models on an earlier test's server, stopped
    by then; an experiment id of one store does not exist in another)."""
    yield
    # back to the session's own values: a module- or session-scoped fixture that set an
    # experiment ran before this test's set-up, so the values at set-up may already be its
    for key, value in _EXPORTED_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    import mlflow.tracking._model_registry.utils as registry
    import mlflow.tracking._tracking_service.utils as tracking
    import mlflow.tracking.fluent as fluent

    tracking._tracking_uri = None
    registry._registry_uri = None
    fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (15, via initdb/pg_ctl) for the session, on 127.0.0.1.

    Yields the URL of its default database, ``postgresql://postgres@127.0.0.1:PORT/postgres``
    (a str); ``postgres.create_database(name)`` creates an empty database and returns its URL.
    Skips, with the reason, only where PostgreSQL or the psycopg driver is not installed."""
    from tests.postgres import PostgresServer, PostgresURL, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"PostgreSQL tests need a local server: {reason}")
    server = PostgresServer.start()
    try:
        yield PostgresURL(server)
    finally:
        server.stop()
