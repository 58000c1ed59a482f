"""Shared fixtures: one thread, a trained digits CNN per session, one real MLflow server."""

from __future__ import annotations

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

torch.set_num_threads(1)
os.environ.setdefault("ROBUST_CERT_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
#: The certifier's key in the tests; the shared server's gate verifies with the same key.
SIGNING_KEY = "test-signing-key-0123456789abcdef"
os.environ["ROBUST_CERT_SIGNING_KEY"] = SIGNING_KEY
#: Policies the test server's gate allows for production.
ALLOWED_POLICIES = "digits-production"

REPO = Path(__file__).resolve().parents[1]
DIGITS_POLICY = REPO / "examples" / "policies" / "digits.yaml"


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, sqlite store, registry behind the robust_cert gate.

    Yields an object with ``url`` and ``root`` (where the store and artifacts live)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "ROBUST_CERT_SIGNING_KEY": SIGNING_KEY,
           "ROBUST_CERT_ALLOWED_POLICIES": ALLOWED_POLICIES,
           # webhooks to a receiver on loopback (tests/test_webhooks.py)
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_CACHE_TTL": "0",  # see a webhook created mid-session at once
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    db = root / "mlflow.db"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
           "--registry-store-uri", f"robustcert+sqlite:///{db}",
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
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    yield Server(url, root)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


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


@pytest.fixture(autouse=True)
def _fresh_mlflow_uris():
    """Each test starts with no process-wide tracking/registry URI set by an earlier test
    (mlflow.set_tracking_uri / set_registry_uri are global)."""
    yield
    import mlflow.tracking._model_registry.utils as registry
    import mlflow.tracking._tracking_service.utils as tracking

    tracking._tracking_uri = None
    registry._registry_uri = None
