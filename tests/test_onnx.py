"""ONNX models: onnxruntime parity with PyTorch, fixed batch sizes, certification without
gradients and with a gradient twin, the parity metric, the MLflow onnx flavor and the CLI,
and clear errors for bad graphs."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import robust_cert
from robust_cert.data import digits_split
from robust_cert.errors import ModelError, PolicyError
from robust_cert.models.onnx import from_onnx

CPU = torch.device("cpu")
#: Two float32 evaluations of the same network that may use different kernels (batch shape,
#: thread count, load path): each logit sums a few hundred products, so they may differ by
#: a few hundred units in the last place of the largest term (float32 ulp ~ 1.2e-7 relative).
F32 = {"rtol": 1e-5, "atol": 1e-5}


def export(model: torch.nn.Module, path, *, batch: int | None = None) -> str:
    """Export with the TorchScript exporter (no onnxscript needed); ``batch=None``: dynamic."""
    example = torch.zeros(batch or 2, 1, 8, 8)
    dynamic = None if batch else {"x": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes=dynamic)
    return str(path)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def digits_onnx(digits_model, onnx_dir) -> str:
    return export(digits_model, onnx_dir / "digits.onnx")


@pytest.fixture(scope="module")
def digits_test():
    x, y = digits_split("test")
    return torch.from_numpy(x), torch.from_numpy(y)


def tiny_model(*, inputs=(("x", TensorProto.FLOAT, [None, 4]),), out_shape=(None, 4),
               opset: int = 17) -> onnx.ModelProto:
    """A one-node graph (Identity, or Add over two inputs) declared with the given types."""
    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    node = (helper.make_node("Add", [i.name for i in ins], ["y"]) if len(ins) == 2
            else helper.make_node("Identity", [ins[0].name], ["y"]))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))
    graph = helper.make_graph([node], "tiny", ins, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# --- loading and running -------------------------------------------------------------------


def test_logits_match_torch(digits_model, digits_onnx, digits_test):
    x, _ = digits_test
    clf = from_onnx(digits_onnx, device=CPU)
    assert clf.format == "onnx"
    assert clf.differentiable is False
    assert clf.input_shape == (1, 8, 8)
    assert clf.num_classes == 10
    assert clf.extra["opset"] == 17
    with open(digits_onnx, "rb") as f:
        assert clf.sha256 == hashlib.sha256(f.read()).hexdigest()
    with torch.no_grad():
        expected = digits_model(x)
    got = clf.logits(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    # split into chunks of at most max_batch rows: the same logits
    small = from_onnx(digits_onnx, device=CPU, max_batch=50)
    # other batch shapes may use other kernels: equal to float32 rounding, not bit for bit
    torch.testing.assert_close(small.logits(x), got, **F32)
    assert small.logits(x[:0]).shape == (0, 10)


def test_bytes_and_modelproto_load(digits_onnx, digits_test):
    x, _ = digits_test
    with open(digits_onnx, "rb") as f:
        data = f.read()
    by_path = from_onnx(digits_onnx, device=CPU)
    by_bytes = from_onnx(data, device=CPU, name="b")
    by_proto = from_onnx(onnx.load(digits_onnx), device=CPU, sha256="given")
    assert by_bytes.sha256 == by_path.sha256
    assert by_bytes.name == "b"
    assert by_proto.sha256 == "given"
    torch.testing.assert_close(by_bytes.logits(x[:20]), by_path.logits(x[:20]), **F32)
    torch.testing.assert_close(by_proto.logits(x[:20]), by_path.logits(x[:20]), **F32)


def test_external_weights_are_hashed(digits_onnx, digits_test, tmp_path):
    """Weights saved beside the graph (as mlflow.onnx does) are found and part of the hash."""
    path = tmp_path / "ext.onnx"
    onnx.save(onnx.load(digits_onnx), str(path), save_as_external_data=True,
              location="ext.weights", size_threshold=0)
    clf = from_onnx(path, device=CPU)
    x = digits_test[0][:20]
    torch.testing.assert_close(clf.logits(x), from_onnx(digits_onnx, device=CPU).logits(x), **F32)
    weights = tmp_path / "ext.weights"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert from_onnx(path, device=CPU).sha256 != clf.sha256


def test_fixed_batch_of_one_runs_any_batch(digits_model, onnx_dir, digits_test):
    x = digits_test[0][:37]
    path = export(digits_model, onnx_dir / "batch1.onnx", batch=1)
    clf = from_onnx(path, device=CPU)
    assert clf.forward.batch_dim == 1
    dynamic = from_onnx(export(digits_model, onnx_dir / "dyn.onnx"), device=CPU)
    got = clf.logits(x)
    assert got.shape == (37, 10)
    assert torch.allclose(got, dynamic.logits(x), atol=1e-6, rtol=0)


def test_fixed_batch_pads_the_last_chunk(digits_model, onnx_dir, digits_test):
    x = digits_test[0][:37]
    clf = from_onnx(export(digits_model, onnx_dir / "batch8.onnx", batch=8), device=CPU)
    assert clf.forward.batch_dim == 8
    with torch.no_grad():
        expected = digits_model(x)
    assert torch.allclose(clf.logits(x), expected, atol=1e-4, rtol=0)


def test_load_model_dispatches_onnx_paths(digits_onnx):
    clf = robust_cert.load_model(digits_onnx, device="cpu")
    assert clf.format == "onnx"
    assert clf.name == "digits"
    with pytest.raises(ModelError, match=r"no model loader accepts it; .*a path to an \.onnx file"):
        robust_cert.load_model("no/such/thing.pt", device="cpu")


# --- certification without gradients -------------------------------------------------------


def _policy(**extra_metrics) -> dict:
    return {
        "name": "onnx-test",
        "confidence": 0.95,
        "metrics": {
            "accuracy": {},
            "robust_accuracy": {"eps": [0.1], "attacks": ["fgsm"]},
            "probabilistic_robustness": {"eps": 0.1, "samples": 400},
            **extra_metrics,
        },
        "requirements": [
            {"metric": "accuracy", "at_least": 0.8},
            {"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.1},
            {"metric": "probabilistic_robustness", "eps": 0.1, "at_most": 0.2},
        ],
    }


def _values(cert, metric: str) -> list[tuple]:
    res = next(r for r in cert.results if r["metric"] == metric)
    return [(v["params"], v["k"], v["n"]) for v in res["values"]]


def test_certify_onnx_matches_torch_without_gradients(digits_model, digits_onnx):
    cert = robust_cert.certify(digits_onnx, "digits", _policy(), seed=7, progress=False)
    torch_policy = _policy()
    del torch_policy["metrics"]["robust_accuracy"]
    torch_policy["requirements"].pop(1)
    ref = robust_cert.certify(digits_model, "digits", torch_policy, seed=7, progress=False)

    assert cert.body["model"]["format"] == "onnx"
    assert cert.body["model"]["gradients"] is False
    assert cert.body["model"]["gradient_twin"] is None
    assert cert.body["model"]["opset"] == 17
    robust = next(r for r in cert.results if r["metric"] == "robust_accuracy")
    assert robust["status"] == "not_applicable"
    assert "gradients" in robust["reason"]
    for metric in ("accuracy", "probabilistic_robustness"):
        assert _values(cert, metric) == _values(ref, metric)
    outcomes = {o["metric"]: o for o in cert.requirements}
    assert outcomes["robust_accuracy"]["verdict"] == "INCONCLUSIVE"
    assert "gradients" in outcomes["robust_accuracy"]["reason"]
    assert outcomes["accuracy"]["verdict"] == "PASS"
    assert cert.verdict == "INCONCLUSIVE"


# --- the gradient twin ---------------------------------------------------------------------


def test_twin_gives_gradient_metrics_to_onnx(digits_model, digits_onnx):
    """Attacks crafted on the PyTorch twin, judged on the graph: the same per-point results as
    the PyTorch model alone (the models agree on every point, attacks are seeded the same)."""
    from robust_cert.models.torch import state_sha256

    policy = _policy()
    cert = robust_cert.certify(digits_onnx, "digits", policy, seed=7, progress=False,
                               gradient_twin=digits_model)
    ref = robust_cert.certify(digits_model, "digits", policy, seed=7, progress=False)

    robust = next(r for r in cert.results if r["metric"] == "robust_accuracy")
    assert robust["status"] == "ok"
    assert "transfer from the PyTorch twin" in robust["description"]
    assert robust["diagnostics"]["attack_source"].startswith("transfer from the PyTorch twin")
    ref_robust = next(r for r in ref.results if r["metric"] == "robust_accuracy")
    assert ref_robust["diagnostics"]["attack_source"] == "white-box on the model"
    assert np.array_equal(cert.per_point["robust_accuracy/robust"],
                          ref.per_point["robust_accuracy/robust"])
    for metric in ("accuracy", "robust_accuracy", "probabilistic_robustness"):
        assert _values(cert, metric) == _values(ref, metric)
    assert cert.verdict == ref.verdict
    model = cert.body["model"]
    assert model["format"] == "onnx"  # the graph is what was certified
    assert model["gradients"] is True
    twin = model["gradient_twin"]
    assert twin["format"] == "pytorch-module"
    assert twin["sha256"] == state_sha256(digits_model)
    assert twin["uri"] is None
    assert twin["agreement"] == "359/359"
    assert 0 <= twin["max_abs_logit_diff"] < 1e-4
    assert twin["tolerance"] == 1e-3
    assert ref.body["model"]["gradient_twin"] is None


def test_twin_keeps_predictions_on_the_deployed_model(digits_model, digits_onnx, digits_test):
    from robust_cert.models.twin import with_gradient_twin

    x = digits_test[0]
    deployed = from_onnx(digits_onnx, device=CPU)
    twin = robust_cert.load_model(digits_model, input_shape=(1, 8, 8), device="cpu")
    clf, record = with_gradient_twin(deployed, twin, x)
    assert clf.forward is deployed.forward
    assert torch.equal(clf.logits(x), deployed.logits(x))
    assert (clf.format, clf.sha256, clf.differentiable) == ("onnx", deployed.sha256, True)
    assert deployed.differentiable is False  # the original is left as it was
    view = clf.attack_module()
    u = x[:5].clone().requires_grad_(True)
    view(u).sum().backward()
    w = x[:5].clone().requires_grad_(True)
    digits_model(w).sum().backward()
    digits_model.zero_grad(set_to_none=True)  # the session's model is shared
    torch.testing.assert_close(u.grad, w.grad, **F32)  # the twin's own gradients
    assert u.grad.abs().sum() > 0
    assert record["agreement"] == f"{len(x)}/{len(x)}"


class _AddConstant(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, z):
        return z + self.c


def test_twin_that_disagrees_is_refused(digits_model, digits_onnx, monkeypatch):
    from robust_cert import engine
    from robust_cert.digits_cnn import train_digits_cnn

    def must_not_run(*args, **kwargs):
        raise AssertionError("a metric ran with a refused twin")

    monkeypatch.setattr(engine, "run_suite", must_not_run)
    other = train_digits_cnn(epochs=1)
    with pytest.raises(ModelError, match=r"gradient twin .* does not match the model on the "
                       r"evaluation data: [1-9]\d* of 359 points predict another class, "
                       r"max \|Δ logit\| [0-9.e+-]+ \(tolerance 0.001\)"):
        robust_cert.certify(digits_onnx, "digits", _policy(), progress=False,
                            gradient_twin=other)
    # a twin that predicts the same class everywhere but whose logits differ by more than the
    # tolerance (every logit shifted by 0.01: the argmax is unchanged): refused too. Built
    # explicitly, since the export's own float error may be exactly 0 on some CPUs.
    shifted = nn.Sequential(digits_model, _AddConstant(0.01))
    with pytest.raises(ModelError, match=r"0 of 359 points predict another class, max "
                                         r"\|Δ logit\| 0\.01\d* \(tolerance 0.001\)"):
        robust_cert.certify(digits_onnx, "digits", _policy(), progress=False,
                            gradient_twin=shifted)
    with pytest.raises(ModelError, match=r"twin_tolerance must be a finite number >= 0"):
        robust_cert.certify(digits_onnx, "digits", _policy(), progress=False,
                            gradient_twin=digits_model, twin_tolerance=-1)
    with pytest.raises(ModelError, match=r"gradient twin .*\(onnx\) has no input gradients"):
        robust_cert.certify(digits_onnx, "digits", _policy(), progress=False,
                            gradient_twin=digits_onnx)
    with pytest.raises(ModelError, match=r"^gradient twin: ONNX model file not found"):
        robust_cert.certify(digits_onnx, "digits", _policy(), progress=False,
                            gradient_twin="no/such/twin.onnx")


def test_parity_with_the_twin(digits_model, digits_onnx):
    policy = _policy(parity={"reference": "twin", "eps": 0.05})
    policy["requirements"].append({"metric": "parity", "at_least": 0.9})
    cert = robust_cert.certify(digits_onnx, "digits", policy, seed=2, progress=False,
                               gradient_twin=digits_model)
    res = next(r for r in cert.results if r["metric"] == "parity")
    assert [(v["k"], v["n"]) for v in res["values"]] == [(359, 359), (359, 359)]
    assert res["diagnostics"]["reference"]["format"] == "pytorch-module"
    assert res["diagnostics"]["reference"]["uri"] == "twin"
    assert res["diagnostics"]["max_abs_logit_diff"]["clean"] == pytest.approx(
        cert.body["model"]["gradient_twin"]["max_abs_logit_diff"])
    assert {o["metric"]: o["verdict"] for o in cert.requirements}["parity"] == "PASS"
    # a PyTorch model keeps its own gradients; an ONNX twin is then only the parity reference
    torch_cert = robust_cert.certify(digits_model, "digits", _parity_policy("twin"),
                                     progress=False, gradient_twin=digits_onnx)
    assert torch_cert.body["model"]["gradient_twin"] is None
    res = next(r for r in torch_cert.results if r["metric"] == "parity")
    assert res["values"][0]["k"] == res["values"][0]["n"]
    assert res["diagnostics"]["reference"]["format"] == "onnx"


def test_parity_with_the_twin_needs_a_twin(digits_onnx, monkeypatch):
    from robust_cert.metrics import parity

    def must_not_run(*args, **kwargs):
        raise AssertionError("a metric ran")

    monkeypatch.setattr(parity.Parity, "run", must_not_run)
    with pytest.raises(ModelError, match="parity: reference 'twin' needs a gradient twin, but "
                                         "none was given"):
        robust_cert.certify(digits_onnx, "digits", _parity_policy("twin"), progress=False)


def test_cli_certify_has_gradient_twin(capsys):
    from robust_cert.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["certify", "--help"])
    assert exit_info.value.code == 0
    assert "--gradient-twin models:/NAME/VERSION" in capsys.readouterr().out


# --- the parity metric ---------------------------------------------------------------------


def _parity_policy(reference: str, *, eps=None) -> dict:
    metrics = {"parity": {"reference": reference} | ({"eps": eps} if eps else {})}
    reqs = [{"metric": "parity", "at_least": 0.999}]
    if eps:
        reqs.append({"metric": "parity", "eps": eps, "at_least": 0.99})
    return {"name": "parity", "metrics": metrics, "requirements": reqs}


def test_parity_of_torch_and_its_onnx_export(digits_model, digits_onnx):
    cert = robust_cert.certify(digits_model, "digits", _parity_policy(digits_onnx, eps=0.05),
                               seed=1, progress=False)
    res = next(r for r in cert.results if r["metric"] == "parity")
    assert res["status"] == "ok"
    for v in res["values"]:
        assert v["k"] == v["n"] == len(cert.per_point["parity/agree"]) > 300
    assert {tuple(v["params"].items()) for v in res["values"]} == {(), (("eps", 0.05),)}
    diag = res["diagnostics"]
    assert diag["reference"]["format"] == "onnx"
    assert diag["max_abs_logit_diff"]["clean"] < 1e-4
    assert diag["max_abs_logit_diff"]["eps=0.05"] < 1e-4
    assert cert.per_point["parity/agree"].all()
    assert cert.per_point["parity/agree@0.05"].all()
    # no requirement is refuted by perfect agreement (~360 points cannot demonstrate 0.999)
    assert {o["verdict"] for o in cert.requirements} <= {"PASS", "INCONCLUSIVE"}


def test_parity_of_two_identical_onnx_files_is_exact(digits_model, digits_onnx, onnx_dir):
    twin = export(digits_model, onnx_dir / "twin.onnx")
    cert = robust_cert.certify(digits_onnx, "digits", _parity_policy(twin), progress=False)
    res = next(r for r in cert.results if r["metric"] == "parity")
    assert res["values"][0]["k"] == res["values"][0]["n"]
    assert res["diagnostics"]["max_abs_logit_diff"] == {"clean": 0.0}


def test_parity_with_a_different_model_fails(digits_onnx, onnx_dir):
    from robust_cert.digits_cnn import train_digits_cnn

    other = export(train_digits_cnn(epochs=1), onnx_dir / "other.onnx")
    cert = robust_cert.certify(digits_onnx, "digits", _parity_policy(other, eps=0.05),
                               progress=False)
    res = next(r for r in cert.results if r["metric"] == "parity")
    clean = res["values"][0]
    assert clean["k"] < clean["n"]
    assert res["diagnostics"]["max_abs_logit_diff"]["clean"] > 0.1
    verdicts = {o["id"]: o["verdict"] for o in cert.requirements}
    assert verdicts["parity"] in ("FAIL", "INCONCLUSIVE")
    assert cert.verdict in ("FAIL", "INCONCLUSIVE")


def test_parity_policy_validation(digits_onnx):
    with pytest.raises(PolicyError, match="reference"):
        robust_cert.Policy.from_dict({"name": "p", "metrics": {"parity": {}},
                                      "requirements": [{"metric": "parity", "at_least": 0.9}]})
    with pytest.raises(PolicyError, match="ε must be > 0"):
        robust_cert.Policy.from_dict(_parity_policy(digits_onnx, eps=-0.1))
    with pytest.raises(PolicyError, match="no result for parameters"):
        robust_cert.Policy.from_dict({
            "name": "p", "metrics": {"parity": {"reference": digits_onnx}},
            "requirements": [{"metric": "parity", "eps": 0.1, "at_least": 0.9}]})


def test_parity_reference_that_does_not_fit(digits_onnx, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "flat", [x], [y])
    flat = tmp_path / "flat.onnx"  # a "64-class" model on the right inputs
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(flat))
    with pytest.raises(ModelError, match="64 classes; the model has"):
        robust_cert.certify(digits_onnx, "digits", _parity_policy(str(flat)), progress=False)
    with pytest.raises(ModelError, match="parity reference: ONNX model file not found"):
        robust_cert.certify(digits_onnx, "digits", _parity_policy(str(tmp_path / "no.onnx")),
                            progress=False)


# --- MLflow onnx flavor --------------------------------------------------------------------


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    """A sqlite tracking + registry store in tmp_path; the previous tracking URI comes back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri  # None unless some code called set_tracking_uri
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # monkeypatch restores the variable
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


def test_mlflow_onnx_flavor(digits_model, digits_onnx, digits_test, local_mlflow, tmp_path):
    import mlflow
    from mlflow.models import infer_signature

    x = digits_test[0]
    with torch.no_grad():
        expected = digits_model(x)
    signature = infer_signature(x[:2].numpy(), expected[:2].numpy())
    exp_id = mlflow.create_experiment("onnx", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=exp_id):
        mlflow.onnx.log_model(onnx.load(digits_onnx), name="model", signature=signature,
                              registered_model_name="digits-onnx",
                              onnx_execution_providers=["CPUExecutionProvider"])
    clf = robust_cert.load_model("models:/digits-onnx/1", device="cpu")
    assert clf.format == "onnx"
    assert clf.differentiable is False
    assert clf.version == "1"
    assert clf.uri == "models:/digits-onnx/1"
    assert clf.input_shape == (1, 8, 8)
    assert clf.extra["opset"] == 17
    assert clf.extra["run_id"]
    assert torch.allclose(clf.logits(x), expected, atol=1e-4, rtol=0)
    # the registered version can be the parity reference of the live module
    cert = robust_cert.certify(digits_model, "digits", _parity_policy("models:/digits-onnx/1"),
                               progress=False)
    res = next(r for r in cert.results if r["metric"] == "parity")
    assert res["values"][0]["k"] == res["values"][0]["n"]
    assert res["diagnostics"]["reference"]["uri"] == "models:/digits-onnx/1"


def test_cli_certifies_onnx_version_with_its_torch_twin(digits_model, digits_onnx, digits_test,
                                                       local_mlflow, tmp_path, capsys):
    """`robust-cert certify models:/…onnx… --gradient-twin models:/…torch…`, end to end."""
    import json

    import mlflow
    from mlflow.models import infer_signature

    from robust_cert.cli import main

    x = digits_test[0][:4]
    with torch.no_grad():
        signature = infer_signature(x.numpy(), digits_model(x).numpy())
    exp_id = mlflow.create_experiment("twin", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=exp_id):
        mlflow.pytorch.log_model(digits_model, name="torch", input_example=x.numpy(),
                                 serialization_format="pickle", pip_requirements=["torch"],
                                 registered_model_name="digits-twin")
        mlflow.onnx.log_model(onnx.load(digits_onnx), name="onnx", signature=signature,
                              registered_model_name="digits-twin",
                              onnx_execution_providers=["CPUExecutionProvider"])
    policy = tmp_path / "p.yaml"
    policy.write_text("name: onnx-twin\nmetrics:\n  accuracy: {}\n"
                      "  robust_accuracy: {eps: 0.1, attacks: [fgsm]}\n"
                      "  parity: {reference: twin}\n"
                      "requirements:\n  - {metric: accuracy, at_least: 0.8}\n"
                      "  - {metric: parity, at_least: 0.9}\n")
    capsys.readouterr()
    code = main(["certify", "models:/digits-twin/2", "--policy", str(policy), "--tracking-uri",
                 local_mlflow, "--gradient-twin", "models:/digits-twin/1", "--out",
                 str(tmp_path / "out"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    body = json.loads((tmp_path / "out" / "certificate.json").read_text())["certificate"]
    assert body["model"]["format"] == "onnx"
    twin = body["model"]["gradient_twin"]
    assert (twin["uri"], twin["format"], twin["agreement"]) == (
        "models:/digits-twin/1", "pytorch-pickle", "359/359")
    robust = next(r for r in body["results"] if r["metric"] == "robust_accuracy")
    assert robust["status"] == "ok"
    # a twin that is not there: one-line error, nothing certified
    code = main(["certify", "models:/digits-twin/2", "--policy", str(policy), "--tracking-uri",
                 local_mlflow, "--gradient-twin", "models:/digits-twin/9", "--out",
                 str(tmp_path / "out9"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "gradient twin: registered model 'digits-twin' has no version 9" in err
    assert not (tmp_path / "out9").exists()


# --- bad input -----------------------------------------------------------------------------


def test_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n")
    with pytest.raises(ModelError, match="not an ONNX model"):
        from_onnx(path, device=CPU)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="ONNX model file not found"):
        from_onnx(tmp_path / "absent.onnx", device=CPU)
    with pytest.raises(ModelError, match="not found"):
        robust_cert.load_model(str(tmp_path / "absent.onnx"), device="cpu")


def test_two_inputs():
    model = tiny_model(inputs=(("a", TensorProto.FLOAT, [None, 4]),
                               ("b", TensorProto.FLOAT, [None, 4])))
    with pytest.raises(ModelError, match=r"2 inputs \(a, b\).*exactly one"):
        from_onnx(model, device=CPU)


def test_integer_input():
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                              "cast", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"tensor\(int64\); a float tensor is needed"):
        from_onnx(model, device=CPU)


def test_three_dimensional_output():
    model = tiny_model(inputs=(("x", TensorProto.FLOAT, [None, 2, 3]),), out_shape=(None, 2, 3))
    with pytest.raises(ModelError, match=r"shape \(\?, 2, 3\); expected \(batch, classes\), 2-D"):
        from_onnx(model, device=CPU)


def test_opset_onnxruntime_cannot_run():
    with pytest.raises(ModelError, match="cannot run opset 99"):
        from_onnx(tiny_model(opset=99), device=CPU)


def test_ir_version_onnxruntime_cannot_run():
    model = tiny_model()
    model.ir_version = 99
    with pytest.raises(ModelError, match="IR version"):
        from_onnx(model, device=CPU)


def test_symbolic_sample_dims_need_input_shape():
    model = tiny_model(inputs=(("x", TensorProto.FLOAT, [None, "features"]),),
                       out_shape=(None, "features"))
    with pytest.raises(ModelError, match="pass input_shape"):
        from_onnx(model, device=CPU)
    clf = from_onnx(model, device=CPU, input_shape=(3,))
    assert clf.input_shape == (3,)
    assert clf.num_classes == 3
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(clf.logits(x), x)
    with pytest.raises(ModelError, match="does not fit"):
        from_onnx(tiny_model(), device=CPU, input_shape=(5,))


def test_single_logit_is_not_a_classifier():
    model = tiny_model(inputs=(("x", TensorProto.FLOAT, [None, 1]),), out_shape=(None, 1))
    with pytest.raises(ModelError, match="at least 2 logits"):
        from_onnx(model, device=CPU)


def test_bad_arguments():
    with pytest.raises(ModelError, match="expected an .onnx path"):
        from_onnx(42, device=CPU)
    with pytest.raises(ModelError, match="max_batch"):
        from_onnx(tiny_model(), device=CPU, max_batch=0)


def test_gradient_view_refused(digits_onnx):
    clf = from_onnx(digits_onnx, device=CPU)
    with pytest.raises(ModelError, match="no input gradients"):
        clf.attack_module()
    assert np.isfinite(clf.logits(torch.zeros(3, 1, 8, 8)).numpy()).all()


def test_cuda_request_uses_cuda_provider_only_when_present(digits_onnx):
    import onnxruntime as ort

    clf = from_onnx(digits_onnx, device=torch.device("cuda"))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert clf.extra["providers"][0] == "CUDAExecutionProvider"
    else:  # falls back to the CPU, and says so in the device it reports
        assert clf.device == CPU
        assert clf.extra["providers"] == ["CPUExecutionProvider"]
