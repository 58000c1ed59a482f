"""The model-loader registry (robust_cert.loaders): core loaders, third-party loaders in code
and from entry points, and the errors a user sees."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import robust_cert
from robust_cert.errors import ModelError
from robust_cert.loaders import REGISTRY, Loader, load_model, register_loader
from robust_cert.models.base import Classifier
from robust_cert.plugins import PluginError

REPO = Path(__file__).resolve().parents[1]


def test_core_loaders():
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    clf = load_model(module, input_shape=(4,), device="cpu")
    assert isinstance(clf, Classifier)
    assert (clf.num_classes, clf.input_shape, clf.format) == (3, (4,), "pytorch-module")
    assert load_model(clf) is clf  # a Classifier is returned unchanged
    with pytest.raises(ModelError, match="input_shape is needed"):
        load_model(module)


def test_onnx_path(tmp_path):
    module = nn.Sequential(nn.Linear(4, 3)).eval()
    path = tmp_path / "small.onnx"
    torch.onnx.export(module, (torch.zeros(2, 4),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    clf = load_model(str(path))
    assert (clf.format, clf.name, clf.num_classes) == ("onnx", "small", 3)
    x = torch.rand(5, 4)
    assert torch.allclose(clf.logits(x), module(x), atol=1e-5)


def test_unknown_reference_lists_every_registered_form():
    with pytest.raises(ModelError) as info:
        load_model("zoo://resnet")
    message = str(info.value)
    assert message.startswith("cannot load model 'zoo://resnet': no model loader accepts it")
    # the core's loaders and the MLflow plugin's, registered through its entry point
    for form in ("nn.Module", ".onnx", "models:/NAME/VERSION", "models:/NAME@ALIAS",
                 "models:/m-ID", "runs:/RUN_ID/PATH"):
        assert form in message
    with pytest.raises(ModelError, match="an object of type int"):
        load_model(3)


def test_a_registered_loader_serves_certify_and_parity():
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    calls = []

    def load(ref, *, input_shape, device):
        calls.append((ref, input_shape, device.type))
        return load_model(module, input_shape=input_shape, device=device)

    loader = register_loader(Loader("zoo://NAME", lambda r: str(r).startswith("zoo://"), load))
    try:
        policy = {"name": "zoo", "metrics": {"accuracy": {}, "parity": {"reference": "zoo://same"}},
                  "requirements": [{"metric": "parity", "at_least": 0.9}]}
        cert = robust_cert.certify("zoo://digits", "digits", policy, progress=False)
    finally:
        REGISTRY.unregister(loader)
    assert cert.verdict == "PASS"  # the reference is the same module: every prediction agrees
    assert [c[0] for c in calls] == ["zoo://digits", "zoo://same"]
    assert all(c[1:] == ((1, 8, 8), "cpu") for c in calls)
    with pytest.raises(ModelError, match="no model loader accepts it"):
        load_model("zoo://digits", input_shape=(1, 8, 8))


def test_a_loader_that_raises_is_named():
    def broken(ref, *, input_shape, device):
        raise RuntimeError("weights corrupted")

    loader = register_loader(Loader("zoo://NAME", lambda r: str(r).startswith("zoo://"), broken))
    try:
        with pytest.raises(ModelError, match=r"the model loader for zoo://NAME failed on "
                                             r"'zoo://x': RuntimeError: weights corrupted"):
            load_model("zoo://x")
    finally:
        REGISTRY.unregister(loader)
    with pytest.raises(TypeError, match="register a robust_cert.loaders.Loader"):
        register_loader(lambda ref: None)


def _plugin_dir(tmp_path: Path, target: str) -> Path:
    """A folder on sys.path holding an installed distribution whose only content is one
    entry point in robust_cert.model_loaders (what a third-party package declares)."""
    site = tmp_path / "site"
    info = site / "zoo_loader-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-loader\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[robust_cert.model_loaders]\nzoo = {target}\n")
    (site / "zoo_loader.py").write_text(textwrap.dedent("""
        from torch import nn
        from robust_cert.loaders import Loader, load_model

        def _load(ref, *, input_shape, device):
            return load_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                              input_shape=input_shape, device=device)

        LOADER = Loader("zoo://NAME", lambda r: str(r).startswith("zoo://"), _load)
    """))
    return site


def _run(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "ROBUST_CERT_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=site)


def test_entry_point_loader(tmp_path):
    site = _plugin_dir(tmp_path, "zoo_loader:LOADER")
    done = _run("from robust_cert.loaders import load_model\n"
                "print(load_model('zoo://x', input_shape=(1, 8, 8)).num_classes)", site)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "10"


def test_entry_point_that_fails_to_import(tmp_path):
    site = _plugin_dir(tmp_path, "zoo_missing_module:LOADER")
    done = _run("from robust_cert.loaders import load_model\n"
                "from robust_cert.plugins import PluginError\n"
                "try:\n    load_model('zoo://x', input_shape=(1, 8, 8))\n"
                "except PluginError as exc:\n    print(exc)\n", site)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("plugin 'zoo' (robust_cert.model_loaders = "
                                  "zoo_missing_module:LOADER) failed to import: "
                                  "ModuleNotFoundError")
    # the core's own references still load: plugins are read only when needed
    done = _run("import torch\nfrom robust_cert.loaders import load_model\n"
                "print(load_model(torch.nn.Linear(3, 2), input_shape=(3,)).num_classes)", site)
    assert done.stdout.strip() == "2", done.stderr


def test_cli_names_a_broken_plugin(tmp_path):
    site = _plugin_dir(tmp_path, "zoo_missing_module:LOADER")
    policy = REPO / "examples" / "policies" / "digits.yaml"
    done = _run("import sys\nfrom robust_cert.cli import main\n"
                f"sys.exit(main(['certify', 'zoo://x', '--policy', {str(policy)!r}]))", site)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "robust-cert: error: plugin 'zoo' (robust_cert.model_loaders = zoo_missing_module:"
        "LOADER) failed to import: ModuleNotFoundError: No module named 'zoo_missing_module'"]
    assert sorted(p.name for p in site.iterdir()) == ["zoo_loader-1.0.dist-info",
                                                      "zoo_loader.py"]  # nothing written


def test_plugin_error_is_a_robust_cert_error():
    assert issubclass(PluginError, robust_cert.RobustCertError)
