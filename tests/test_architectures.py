"""Real architectures certified end to end with every metric family (issue 14, part 1).

A CIFAR-style ResNet-18 (BatchNorm, residual additions, functional ops), a small ViT
(patch embedding, attention, LayerNorm, GELU), a tabular MLP and a CNN written with
functional pooling each run the whole suite on a handful of points: every metric either runs
or says in one line why it does not apply, and certification leaves the model as it was.
The ResNet is narrow (width 4; the published network is width 64) so the suite stays fast on
one CPU thread; the topology is the published one. Each is also exported to ONNX and
certified on onnxruntime with the PyTorch model as its gradient twin.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import robust_cert
from robust_cert.models.torch import state_sha256
from tests.architectures import FunctionalCNN, ResNet18, TabularMLP, TinyViT, stripes, tabular
from tests.architectures import train as train_briefly

POINTS = 12


def _suite(image: bool) -> dict:
    """Every metric family, with budgets for a handful of points."""
    metrics = {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.0, 2 / 255, 8 / 255], "attacks": ["apgd_ce", "square"],
                            "steps": 5, "square_queries": 50},
        "probabilistic_robustness": {"eps": 0.05, "samples": 60},
        "local_probabilistic_robustness": {"eps": 0.05, "max_draws": 64, "p0": 0.1,
                                           "p1": 0.01},
        "randomized_smoothing": {"sigma": 0.25, "n0": 8, "n": 64, "radii": [0.0, 0.1]},
        "analytical_robustness": {"sigma": 0.05, "estimators": ["taylor"], "primary": "taylor",
                                  "validate_points": 2, "validate_draws": 64,
                                  "qmc_points": 64},
        "rare_event_probability": {"sigma": 0.1, "points": 2, "runs": 2, "particles": 20,
                                   "mcmc_steps": 2, "max_levels": 5},
        "safe_radius": {"norms": ["l2", "linf"], "radii": [0.01], "clever_batches": 2,
                        "clever_samples": 4, "bisection_steps": 4, "attack_steps": 3,
                        "power_iterations": 5},
        "divergence": {"eps": [0.03], "steps": 3, "surface_points": 1, "surface_grid": 3},
        "surrogates": {"power_iterations": 3},
        "calibration": {"bins": 5, "bootstrap": 20},
    }
    if image:
        metrics["corruptions"] = {"corruptions": ["gaussian_noise", "fog"], "severities": [3]}
    else:
        metrics["corruptions"] = {"corruptions": ["gaussian_noise"], "severities": [3]}
    return {"name": "architecture-matrix", "confidence": 0.95, "batch_size": 16,
            "metrics": metrics,
            "requirements": [{"metric": "accuracy", "at_least": 0.1}]}


def _cases():
    x32, y32 = stripes(POINTS + 64, seed=3)
    xt, yt = tabular(POINTS + 64, seed=3)
    rng = np.random.default_rng(3)
    x8 = rng.random((POINTS + 64, 1, 8, 8), dtype=np.float32)
    y8 = rng.integers(0, 10, POINTS + 64)
    return {
        "resnet18": (lambda: ResNet18(width=4), x32, y32),
        "vit": (lambda: TinyViT(), x32, y32),
        "tabular_mlp": (lambda: TabularMLP(), xt, yt),
        "functional_cnn": (lambda: FunctionalCNN(), x8, y8),
    }


CASES = _cases()


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request):
    make, x, y = CASES[request.param]
    torch.manual_seed(0)
    model = train_briefly(make(), x[POINTS:], y[POINTS:], epochs=1)
    return request.param, model, (x[:POINTS], y[:POINTS])


def test_every_family_runs_or_says_why_not(trained):
    name, model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sha = state_sha256(model)
    cert = robust_cert.certify(model, data, _suite(image=name != "tabular_mlp"), seed=0,
                               progress=False)
    statuses = {r["metric"]: r for r in cert.results}
    assert set(statuses) == set(_suite(True)["metrics"])
    for metric, r in statuses.items():
        if r["status"] != "ok":
            reason = r.get("reason", "")
            assert reason, (metric, r)
            assert "\n" not in reason, (metric, reason)
            # only these limits are acceptable: corruptions need images; a sound Lipschitz
            # bound through attention is out of reach (the reason names the operation)
            assert (metric, name) in {("corruptions", "tabular_mlp"),
                                      ("safe_radius", "vit")}, (metric, reason)
    assert cert.verdict in ("PASS", "FAIL", "INCONCLUSIVE")
    # certification leaves the model as it was: eval mode, same weights and buffers
    assert not model.training
    assert state_sha256(model) == sha
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batchnorm_buffers_and_mode_are_restored(trained):
    name, model, data = trained
    model.train()
    try:
        policy = {"name": "acc", "metrics": {"accuracy": {}},
                  "requirements": [{"metric": "accuracy", "at_least": 0.1}]}
        snapshot = copy.deepcopy(model.state_dict())
        robust_cert.certify(model, data, policy, progress=False)
        assert model.training  # the caller's mode is restored
        for k, v in model.state_dict().items():
            assert torch.equal(v, snapshot[k]), k  # BatchNorm running stats did not move
    finally:
        model.eval()


def test_onnx_export_certifies_with_its_twin(trained, tmp_path):
    name, model, data = trained
    x = torch.from_numpy(data[0][:2])
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    policy = {"name": "onnx", "metrics": {
        "accuracy": {},
        "robust_accuracy": {"eps": [8 / 255], "attacks": ["apgd_ce"], "steps": 3},
        "parity": {"reference": "twin", "eps": [0.02]}},
        "requirements": [{"metric": "parity", "at_least": 0.5}]}
    cert = robust_cert.certify(str(path), data, policy, progress=False, gradient_twin=model)
    results = {r["metric"]: r for r in cert.results}
    assert results["robust_accuracy"]["status"] == "ok"
    assert cert.body["model"]["format"] == "onnx"
    parity = results["parity"]["values"][0]
    assert parity["k"] == parity["n"] == POINTS


def _importable(module: str) -> bool:
    """True when ``module`` imports here (torchvision from the registry raises RuntimeError
    beside this machine's CPU torch wheel: ``operator torchvision::nms does not exist``)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # any import failure means: not usable here
        return False
    return True


def _zoo_models():
    """Constructors of zoo ResNet-18s, random weights (nothing is downloaded)."""
    out = []
    if _importable("torchvision"):
        out.append(pytest.param("torchvision", id="torchvision-resnet18"))
    else:
        out.append(pytest.param("torchvision", id="torchvision-resnet18", marks=pytest.mark.skip(
            reason="torchvision does not import beside this torch")))
    if _importable("timm"):
        out.append(pytest.param("timm", id="timm-resnet18"))
    else:
        out.append(pytest.param("timm", id="timm-resnet18", marks=pytest.mark.skip(
            reason="timm is not installed (or does not import) here")))
    return out


@pytest.mark.parametrize("zoo", _zoo_models())
def test_zoo_models_certify_like_any_module(zoo):
    """A torchvision or timm model is an ordinary nn.Module: certified as it is, left as it
    was (BatchNorm buffers, eval mode)."""
    if zoo == "torchvision":
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=10)
    else:
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x, y = stripes(8, seed=5)
    sha = state_sha256(model)
    policy = {"name": "zoo", "batch_size": 8, "metrics": {
        "accuracy": {}, "robust_accuracy": {"eps": [2 / 255], "attacks": ["fgsm"]}},
        "requirements": [{"metric": "accuracy", "at_least": 0.0}]}
    cert = robust_cert.certify(model, (x, y), policy, progress=False)
    assert [r["status"] for r in cert.results] == ["ok", "ok"]
    assert cert.body["model"]["num_classes"] == 10
    assert state_sha256(model) == sha
