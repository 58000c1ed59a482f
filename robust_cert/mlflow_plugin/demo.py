"""The demo: two digits CNNs registered in MLflow, certified, compared by verdict.

Version 1 is trained normally; version 2 with adversarial augmentation (FGSM), so it is
visibly more robust. Version 1 is saved in MLflow's pickle format and version 2 in pt2
(torch.export), so the demo exercises both loaders.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from robust_cert.data import digits_split
from robust_cert.digits_cnn import train_digits_cnn
from robust_cert.mlflow_plugin.tracking import Certification, certify_version

log = logging.getLogger(__name__)

MODEL_NAME = "digits-cnn"
EXPERIMENT = "digits-demo"
_MARKER = ".robust_cert_demo"


@dataclass
class DemoVersion:
    version: str
    training: str
    certification: Certification


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
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"train {training}"):
        mlflow.log_params({"augmentation": training, "architecture": "DigitsCNN"})
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=x[:4], serialization_format=fmt,
            registered_model_name=MODEL_NAME, pip_requirements=["torch"])
    return str(info.registered_model_version)


def run_demo(
    workdir: str | Path,
    policy: str | Path,
    *,
    tracking_uri: str | None = None,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> list[DemoVersion]:
    """Train, register and certify the two versions; return their certifications."""
    import mlflow

    workdir = Path(workdir).resolve()
    prepare_workdir(workdir)
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
        out.append(DemoVersion(version, training, cert))
    return out
