"""The demo: digits CNNs registered in MLflow, certified, compared by verdict.

Version 1 is trained normally; version 2 with adversarial augmentation (FGSM), so it is
visibly more robust. Version 1 is saved in MLflow's pickle format and version 2 in pt2
(torch.export), so the demo exercises both loaders. Version 3 is version 2 exported to ONNX
(MLflow's onnx flavor, what a deployment would serve), certified with version 2 as its
gradient twin: attacks are crafted on the PyTorch model and judged on the graph, after a
logit parity check, and the ONNX policy adds a parity requirement.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from robust_cert.data import digits_split
from robust_cert.digits_cnn import train_digits_cnn
from robust_cert.mlflow_plugin.tracking import Certification, certify_version

log = logging.getLogger(__name__)

MODEL_NAME = "digits-cnn"
EXPERIMENT = "digits-demo"
_MARKER = ".robust_cert_demo"
#: The policy for the ONNX version, looked up beside the demo's policy.
ONNX_POLICY = "digits-onnx.yaml"


@dataclass
class DemoVersion:
    version: str
    training: str  # "standard" | "adversarial" | "onnx export"
    certification: Certification
    label: str = ""  # how the printout names the version

    def __post_init__(self):
        self.label = self.label or f"{self.training} training"


def prepare_workdir(workdir: Path) -> None:
    """Create the demo directory; a previous demo's store in it is replaced (never other data)."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / _MARKER).exists():
            raise FileExistsError(f"{workdir} exists and was not made by the demo; "
                                  "choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / _MARKER).write_text("made by robust-cert demo; safe to delete\n")


def register(model, *, training: str, fmt: str, experiment_id: str) -> str:
    """Log ``model`` in a training run and register it; return the new version number."""
    import mlflow

    x, _ = digits_split("train")
    # version 1 is pickled on purpose (both loaders are exercised); MLflow's warning about
    # pickle at save time is for the user's own models, not this demo's
    mlflow_pytorch_log = logging.getLogger("mlflow.pytorch")
    level = mlflow_pytorch_log.level
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"train {training}"):
        mlflow.log_params({"augmentation": training, "architecture": "DigitsCNN"})
        mlflow_pytorch_log.setLevel(logging.ERROR if fmt == "pickle" else level)
        try:
            # (mlflow loads its flavours lazily; its Literal formats: fmt is one of them)
            info = mlflow.pytorch.log_model(  # pyright: ignore[reportPrivateImportUsage]
                model, name="model", input_example=x[:4], serialization_format=fmt,  # pyright: ignore[reportArgumentType]
                registered_model_name=MODEL_NAME, pip_requirements=["torch"])
        finally:
            mlflow_pytorch_log.setLevel(level)
    return str(info.registered_model_version)


def register_onnx(model, *, source_version: str, experiment_id: str) -> str:
    """Export ``model`` to ONNX (TorchScript exporter, dynamic batch axis), log it with
    MLflow's onnx flavor and register it; return the new version number."""
    import mlflow
    import onnx
    import torch
    from mlflow.models import infer_signature

    x, _ = digits_split("train")
    example = torch.from_numpy(x[:4])
    model = model.cpu().eval()
    with torch.no_grad():
        logits = model(example)
    with tempfile.TemporaryDirectory(prefix="robust_cert_onnx_") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        graph = onnx.load(str(path))
    with mlflow.start_run(experiment_id=experiment_id, run_name="export onnx"):
        mlflow.log_params({"exported_from": f"models:/{MODEL_NAME}/{source_version}",
                           "format": "onnx", "opset": 17})
        info = mlflow.onnx.log_model(  # pyright: ignore[reportPrivateImportUsage]  (lazy)
            graph, name="model", signature=infer_signature(example.numpy(), logits.numpy()),
            onnx_execution_providers=["CPUExecutionProvider"],
            registered_model_name=MODEL_NAME, pip_requirements=["onnxruntime"])
    return str(info.registered_model_version)


def demo_signing_key(workdir: Path) -> Path | None:
    """Without a configured signing key, make a throw-away Ed25519 key pair in the demo
    directory so the demo's certificates are signed (and their reports verify): the private
    key ``demo-signing.key`` (mode 0600, set as ``ROBUST_CERT_SIGNING_KEY_FILE``) and its
    public half ``demo-public.pem`` (what a gated MLflow server would be given as
    ``ROBUST_CERT_PUBLIC_KEYS``). A real key always wins."""
    from robust_cert.signing import (
        KEY_ENV,
        KEY_FILE_ENV,
        Keyring,
        generate_private_key_pem,
        public_pem,
    )

    if os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV):
        return None
    path = workdir / "demo-signing.key"
    pem = generate_private_key_pem()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    keyring = Keyring.from_private_pem(pem)
    assert keyring.private is not None  # from a private key
    (workdir / "demo-public.pem").write_text(public_pem(keyring.private.public_key()))
    os.environ[KEY_FILE_ENV] = str(path)
    log.info("no signing key configured: the demo signs with %s (key id %s)", path,
             keyring.signing_kid)
    return path


def run_demo(
    workdir: str | Path,
    policy: str | Path,
    *,
    tracking_uri: str | None = None,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
    onnx_policy: str | Path | None = None,
) -> list[DemoVersion]:
    """Train, register and certify versions 1 and 2, then export version 2 to ONNX as
    version 3 and certify it with version 2 as its gradient twin; return the certifications.

    ``onnx_policy`` is version 3's policy: default ``digits-onnx.yaml`` beside ``policy``
    when it exists (it adds a parity requirement), else ``policy``.
    """
    import mlflow

    workdir = Path(workdir).resolve()
    prepare_workdir(workdir)
    demo_signing_key(workdir)
    uri = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        experiment_id = exp.experiment_id
    elif tracking_uri:  # a server stores artifacts where it is configured to
        experiment_id = mlflow.create_experiment(EXPERIMENT)
    else:
        experiment_id = mlflow.create_experiment(
            EXPERIMENT, artifact_location=(workdir / "artifacts").as_uri())
    out = []
    for training, augment, fmt in (("standard", "none", "pickle"),
                                   ("adversarial", "adversarial", "pt2")):
        log.info("training version with %s training", training)
        model = train_digits_cnn(augment=augment, epochs=epochs, seed=seed)
        version = register(model, training=training, fmt=fmt, experiment_id=experiment_id)
        cert = certify_version(
            f"models:/{MODEL_NAME}/{version}", policy, "digits", out_dir=workdir /
            "reports" / f"{MODEL_NAME}-v{version}", seed=seed, progress=progress,
            command=f"robust-cert certify models:/{MODEL_NAME}/{version} --policy {policy}")
        assert cert is not None  # one process: the certification
        out.append(DemoVersion(version, training, cert))

    source = out[-1].version  # the adversarially trained model, exported as it would ship
    if onnx_policy is None:
        beside = Path(policy).with_name(ONNX_POLICY)
        onnx_policy = beside if beside.is_file() else policy
    log.info("exporting version %s to ONNX", source)
    version = register_onnx(model, source_version=source, experiment_id=experiment_id)
    twin = f"models:/{MODEL_NAME}/{source}"
    cert = certify_version(
        f"models:/{MODEL_NAME}/{version}", onnx_policy, "digits", out_dir=workdir / "reports"
        / f"{MODEL_NAME}-v{version}", seed=seed, progress=progress, gradient_twin=twin,
        command=f"robust-cert certify models:/{MODEL_NAME}/{version} --policy {onnx_policy} "
                f"--gradient-twin {twin}")
    assert cert is not None  # one process: the certification
    out.append(DemoVersion(version, "onnx export", cert,
                           label=f"ONNX export of version {source}"))
    return out
