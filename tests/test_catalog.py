"""The metric catalog: one torch-free entry per family, which the registry, the report, the
MLflow summary and comparisons read (issue "One place for each fact", item 2)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import catalog, metrics
from robust_cert.catalog import CATALOG, KINDS, MetricEntry
from robust_cert.certificate import Certificate
from robust_cert.comparison import paired_outcomes
from robust_cert.metrics import FACTS, REGISTRY
from robust_cert.metrics.base import Metric, MetricConfig, Proportion, batches
from robust_cert.mlflow_plugin.summary import curve_points, headline_metrics, short_name
from robust_cert.mlflow_plugin.versions import _summary_tag
from robust_cert.report.charts import ChartInputs, charts_for
from robust_cert.report.comparison import quantity_label
from robust_cert.report.html import render_html
from robust_cert.report.threats import threat_model

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ catalog == registry


def test_catalog_and_registry_name_the_same_families_in_the_same_order():
    assert list(CATALOG) == list(REGISTRY)
    assert len(CATALOG) == 13


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_each_class_states_the_facts_of_its_entry(name):
    cls, entry = REGISTRY[name], CATALOG[name]
    assert cls.name == entry.name == name
    assert f"{cls.__module__}:{cls.__qualname__}" == entry.impl
    for attr, field in FACTS:
        assert getattr(cls, attr) == getattr(entry, field), attr
    assert entry.kind in KINDS
    # forward-only: every configuration, or (needs_gradients) some configuration
    if not entry.needs_gradients:
        assert entry.forward_only


def test_forward_only_family_that_needs_gradients_by_default_has_a_forward_only_config():
    from robust_cert.metrics.analytical import AnalyticalConfig, AnalyticalRobustness

    assert CATALOG["analytical_robustness"].needs_gradients
    assert CATALOG["analytical_robustness"].forward_only
    only = AnalyticalRobustness(AnalyticalConfig(sigma=0.1, estimators=["softmax"],
                                                 primary="softmax"))
    assert only.needs_gradients is False
    from robust_cert.metrics.adversarial import RobustAccuracy, RobustAccuracyConfig

    assert CATALOG["robust_accuracy"].forward_only
    square = RobustAccuracy(RobustAccuracyConfig(eps=[0.1], attacks=["square"]))
    assert square.needs_gradients is False
    mixed = RobustAccuracy(RobustAccuracyConfig(eps=[0.1], attacks=["square", "pgd"]))
    assert mixed.needs_gradients is True
    gradient_families = [n for n, e in CATALOG.items() if e.needs_gradients and e.forward_only]
    assert gradient_families == ["robust_accuracy", "analytical_robustness"]


def test_short_names_and_curves_are_those_mlflow_runs_recorded():
    # the values robust_cert wrote to MLflow before the catalog: tags and histories keep them
    assert {n: e.short for n, e in CATALOG.items()} == {
        "accuracy": "acc", "robust_accuracy": "robust_acc",
        "probabilistic_robustness": "fail_rate", "randomized_smoothing": "cert_acc",
        "parity": "parity", "corruptions": "corr_acc",
        "local_probabilistic_robustness": "local_robust", "calibration": "sel_risk",
        "analytical_robustness": "analytic_robust", "rare_event_probability": "rare_event",
        "safe_radius": "safe_frac", "divergence": "div_bounded", "surrogates": "surrogates"}
    assert {n: tuple(e.curve) for n, e in CATALOG.items() if e.curve} == {
        "robust_accuracy": ("eps", "curve.robust_accuracy"),
        "randomized_smoothing": ("radius", "curve.certified_accuracy"),
        "probabilistic_robustness": ("eps", "curve.failure_rate")}
    assert quantity_label("accuracy") == "clean accuracy"
    assert quantity_label("probabilistic_robustness.eps_0.1") == (
        "failure rate under random noise, ε = 0.1")


def test_a_class_that_disagrees_with_its_entry_is_refused(monkeypatch):
    monkeypatch.setattr(metrics, "REGISTRY", dict(REGISTRY))

    class Drifted(REGISTRY["accuracy"]):
        higher_is_better = False

    with pytest.raises(TypeError, match="higher_is_better = False, but the catalog entry"):
        metrics.register(Drifted)
    assert metrics.REGISTRY["accuracy"] is REGISTRY["accuracy"]

    class Nameless(Metric):
        name = "not_in_the_catalog"

    with pytest.raises(TypeError, match="no catalog entry named 'not_in_the_catalog'"):
        metrics.register(Nameless)


def test_entries_refuse_inconsistent_facts():
    with pytest.raises(ValueError, match="kind 'proven'"):
        MetricEntry("x", "x", "proven", "x", short="x", higher_is_better=True,
                    needs_gradients=False, forward_only=True, shardable=False)
    with pytest.raises(ValueError, match="needs no gradients is forward-only"):
        MetricEntry("x", "x", "estimate", "x", short="x", higher_is_better=True,
                    needs_gradients=False, forward_only=False, shardable=False)
    with pytest.raises(ValueError, match="needs an axis"):
        MetricEntry("x", "x", "estimate", "x", short="x", higher_is_better=True,
                    needs_gradients=True, forward_only=False, shardable=False,
                    history="curve.x")


def test_unknown_family_gets_a_generic_entry():
    e = catalog.entry("someone_elses_metric")
    assert (e.label, e.short, e.curve, e.unit, e.impl) == (
        "someone elses metric", "someone_elses_metric", None, "", "")
    assert "someone_elses_metric" not in CATALOG
    assert catalog.label("someone_elses_metric", {"eps": 0.1}) == "someone elses metric"


def test_quantities_of_a_family_are_told_apart_by_their_parameters():
    assert catalog.label("safe_radius", {"norm": "l2", "radius": 0.1}) == (
        "certified fraction (L2)")
    assert CATALOG["safe_radius"].quantity_for({"norm": "linf", "radius": 0.1}).unit == (
        "L∞ radius, data units")
    assert catalog.label("corruptions", {"corruption": "mean"}).startswith("mean corruption")
    assert catalog.label("corruptions", {"corruption": "noise", "severity": 1}) == (
        "corruption accuracy")


def test_catalog_module_imports_only_the_standard_library():
    tree = ast.parse((ROOT / "robust_cert" / "catalog.py").read_text(encoding="utf-8"))
    roots = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots


# ------------------------------------------------------------------ a new family


class ToyConfig(MetricConfig):
    eps: list[float] = [0.0, 0.1, 0.2, 0.4]


class ToyShift(Metric):
    """Prediction unchanged when every input coordinate is shifted by +ε (deterministic).
    States none of the catalog facts: they come from its entry."""

    name = "toy_shift"
    description = "P[argmax f(x + ε·1) = argmax f(x)]"
    Config = ToyConfig

    def selectors(self):
        return [{"eps": e} for e in self.config.eps]

    def cost(self, n_points: int) -> int:
        return n_points

    def run(self, model, data, ctx):
        same = []
        for sl, x, _ in batches(data, ctx.batch_size, ctx.device):
            clean = model.logits(x).argmax(1)
            same.append(torch.stack([model.logits(x + e).argmax(1) == clean
                                     for e in self.config.eps], 1).cpu())
            ctx.advance(sl.stop - sl.start)
        kept = torch.cat(same).numpy()
        return self.result([Proportion({"eps": e}, int(kept[:, j].sum()), len(data))
                            for j, e in enumerate(self.config.eps)],
                           per_point={"same": kept})


TOY_ENTRY = MetricEntry(
    "toy_shift", "fraction kept under a shift", "empirical", "fraction kept under a shift",
    short="toy", higher_is_better=True, needs_gradients=False, forward_only=True,
    shardable=False, axis="eps", unit="shift of every coordinate, data units",
    history="curve.toy_shift", impl=f"{__name__}:ToyShift")


@pytest.fixture
def toy_family(monkeypatch):
    """The toy family registered (catalog entry + registry), removed again afterwards. The
    registry first: it lists every catalog name, so once the entry is in the catalog the name
    would count as present and be restored, not removed, afterwards."""
    monkeypatch.setitem(REGISTRY, TOY_ENTRY.name, ToyShift)
    monkeypatch.setitem(CATALOG, TOY_ENTRY.name, TOY_ENTRY)
    metrics.register(ToyShift)
    return ToyShift


@pytest.fixture
def toy_certificate(toy_family):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, 4, generator=gen)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1, 0, 0], [0, 1, -1, 0], [-1, 0, 1, 0.5]]))
        model.bias.zero_()
    y = model(x).argmax(1)
    policy = {"name": "toy", "metrics": {"accuracy": {}, "toy_shift": {}},
              "requirements": [{"metric": "toy_shift", "eps": 0.1, "at_least": 0.5}]}
    cert = robust_cert.certify(model, (x.numpy(), y.numpy()), policy, progress=False)
    assert cert is not None
    return cert


def test_a_new_family_is_its_module_and_one_entry(toy_certificate):
    cert = toy_certificate
    assert ToyShift.kind == "empirical"
    assert ToyShift.higher_is_better is True
    res = next(r for r in cert.results if r["metric"] == "toy_shift")
    assert (res["kind"], res["quantity"]) == ("empirical", "fraction kept under a shift")
    # MLflow summary: headline by its short name, its curve by its history name
    head = headline_metrics(cert)
    assert "toy_0.1" in head
    assert head["pass"] in (0.0, 1.0)
    assert short_name("toy_shift", {"eps": 0.4}) == "toy_0.4"
    assert _summary_tag("robust_cert.toy_0.1")
    curves = curve_points(cert)
    assert [step for step, _ in curves["curve.toy_shift"]] == [0, 100, 200, 400]
    # the report: its section with a generic curve, a threat row, its label
    charts = charts_for("toy_shift", ChartInputs(cert.body, {}))
    assert [c.id for c in charts] == ["chart-toy-shift-curve"]
    assert charts[0].title == "Fraction kept under a shift over eps"
    (row,) = [t for t in threat_model(cert.results) if t.metric == "toy_shift"]
    assert row.radii == ("ε = 0, ε = 0.1, ε = 0.2, ε = 0.4 (shift of every coordinate, "
                         "data units)")
    html = render_html(cert)
    assert '<section class="metric" id="metric-toy_shift">' in html
    assert 'id="chart-toy-shift-curve"' in html
    assert quantity_label("toy_shift.eps_0.1") == "fraction kept under a shift, ε = 0.1"


def test_report_of_a_family_this_installation_lacks_renders(toy_certificate, monkeypatch):
    body = json.loads(json.dumps(toy_certificate.body))
    monkeypatch.delitem(CATALOG, "toy_shift")
    cert = Certificate(body=body)
    html = render_html(cert)  # generic entry: no KeyError, no chart, raw parameters
    assert '<section class="metric" id="metric-toy_shift">' in html
    assert charts_for("toy_shift", ChartInputs(body, {})) == []
    (row,) = [t for t in threat_model(body["results"]) if t.metric == "toy_shift"]
    assert row.radii == "–"
    assert row.perturbation.startswith("as configured: eps=")
    assert short_name("toy_shift", {"eps": 0.1}) == "toy_shift_0.1"
    assert curve_points(cert) == {}
    assert "toy_shift_0.1" in headline_metrics(cert)


# ------------------------------------------------------------------ comparisons


def test_paired_outcomes_take_the_direction_from_the_catalog():
    body = {"results": [{"metric": "robust_accuracy", "config": {"eps": [0.1]}}]}
    per_point = {"accuracy/correct": np.array([1, 0, 1]),
                 "robust_accuracy/robust": np.array([[1], [0], [0]]),
                 "probabilistic_robustness/failed@0.1": np.array([0, 1, 0])}
    out = paired_outcomes(per_point, body)
    assert {k: v[1] for k, v in out.items()} == {
        "accuracy": CATALOG["accuracy"].higher_is_better,
        "robust_accuracy.eps_0.1": CATALOG["robust_accuracy"].higher_is_better,
        "probabilistic_robustness.eps_0.1": CATALOG["probabilistic_robustness"].higher_is_better}
    assert out["probabilistic_robustness.eps_0.1"][1] is False


# ------------------------------------------------------------------ torch-free report


def test_reading_the_catalog_and_rendering_a_report_import_no_torch(toy_certificate, tmp_path):
    path = toy_certificate.save(tmp_path / "certificate.json")
    out = tmp_path / "report"
    code = (
        "import sys\n"
        "import robust_cert.catalog, robust_cert.report\n"
        "assert 'torch' not in sys.modules, 'torch imported by the catalog or report'\n"
        "from robust_cert.cli import main\n"
        f"rc = main(['report', {str(path)!r}, '--pdf', 'off', '--out', {str(out)!r}])\n"
        "assert 'torch' not in sys.modules, 'torch imported by robust-cert report'\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported by robust-cert report'\n"
        "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<section class="metric" id="metric-toy_shift">' in html  # the unknown family
    assert '<section class="metric" id="metric-accuracy">' in html
