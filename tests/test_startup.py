"""Start-up cost of the commands: what the report and the statistics import, and that the
light-weight quantile functions give the same numbers as the scipy.stats ones they replace."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from robust_cert import stats


@pytest.mark.parametrize("n", [1, 2, 7, 40, 359, 2995, 100_000])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99, 0.999])
@pytest.mark.parametrize("side", ["two-sided", "lower", "upper"])
def test_clopper_pearson_is_scipy_beta_ppf_bit_for_bit(n, confidence, side):
    """The Clopper-Pearson bounds come from scipy.special.betaincinv; they are the exact
    quantiles scipy.stats.beta.ppf gives (the textbook definition), to the last bit."""
    alpha = 1.0 - confidence
    tail = alpha / 2 if side == "two-sided" else alpha
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        lo, hi = stats.clopper_pearson(k, n, confidence, side=side)
        want_lo = scipy_stats.beta.ppf(tail, k, n - k + 1) if side != "upper" and k > 0 else 0.0
        want_hi = (scipy_stats.beta.ppf(1 - tail, k + 1, n - k)
                   if side != "lower" and k < n else 1.0)
        assert (lo, hi) == (float(want_lo), float(want_hi)), (k, n)


def test_tango_interval_uses_the_normal_quantile():
    """z = Φ⁻¹(0.5 + confidence/2): at the interval's ends the score statistic is ±z."""
    lo, hi = stats.tango_interval(30, 12, 200, 0.95)
    z = float(scipy_stats.norm.ppf(0.975))
    assert stats.tango_score(30, 12, 200, lo) == pytest.approx(z, abs=1e-6)
    assert stats.tango_score(30, 12, 200, hi) == pytest.approx(-z, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 359, 2995, 100_000])
def test_binomial_tails_are_scipy_binom_bit_for_bit(n):
    """The one-sided binomial tests and McNemar's test read the binomial tails from the
    ufuncs scipy.stats.binom calls: its sf and cdf, to the last bit, at every k (and outside
    the support) and every p0, the ends 0 and 1 included."""
    ks = range(-1, n + 2) if n <= 40 else sorted({-1, 0, 1, 2, n // 3, n // 2, n - 1, n, n + 1})
    for p in (0.0, 1e-12, 0.02, 0.1, 0.123456789, 0.5, 0.9, 0.99, 1 - 1e-12, 1.0):
        for k in ks:
            assert stats._binom_sf(k, n, p) == float(scipy_stats.binom.sf(k, n, p)), (k, n, p)
            assert stats._binom_cdf(k, n, p) == float(scipy_stats.binom.cdf(k, n, p)), (k, n, p)
            if 0 <= k <= n:
                assert stats.binom_test_pvalue(k, n, p, "greater") == min(
                    1.0, float(scipy_stats.binom.sf(k - 1, n, p))), (k, n, p)
                assert stats.binom_test_pvalue(k, n, p, "less") == min(
                    1.0, float(scipy_stats.binom.cdf(k, n, p))), (k, n, p)


def test_one_sided_binomial_tests_do_not_import_scipy_stats():
    """A certification's verdict (one-sided tests) and McNemar's test do not import
    scipy.stats (about a second of start-up); the two-sided test still does."""
    loaded = _modules_after("from robust_cert import stats\n"
                            "stats.binom_test_pvalue(7, 20, 0.2, 'greater')\n"
                            "stats.binom_test_pvalue(7, 20, 0.2, 'less')\n"
                            "stats.mcnemar_exact(3, 11)")
    assert "scipy.special" in loaded
    assert "scipy.stats" not in loaded
    assert "scipy.stats" in _modules_after(
        "from robust_cert import stats\nstats.binom_test_pvalue(7, 20, 0.2, 'two-sided')")


def test_binomial_tests_still_match_scipy():
    """The binomial tests give scipy.stats' values."""
    assert stats.binom_test_pvalue(7, 20, 0.2, "greater") == pytest.approx(
        scipy_stats.binom.sf(6, 20, 0.2), rel=1e-12)
    assert stats.binom_test_pvalue(7, 20, 0.2, "two-sided") == pytest.approx(
        scipy_stats.binomtest(7, 20, 0.2).pvalue, rel=1e-12)
    assert stats.mcnemar_exact(3, 11) == pytest.approx(
        min(1.0, 2 * scipy_stats.binom.cdf(3, 14, 0.5)), rel=1e-12)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_report_imports_neither_torch_nor_mlflow_nor_scipy_stats():
    """``robust-cert report`` renders from the certificate JSON: importing what it uses (the
    CLI, the report, the certificate, signatures, statistics) loads none of the heavy
    modules, which a certification needs and a report does not."""
    loaded = _modules_after("import robust_cert.cli, robust_cert.report, robust_cert.stats, "
                            "robust_cert.certificate, robust_cert.signing, "
                            "robust_cert.verification, robust_cert.report.files")
    for heavy in ("torch", "mlflow", "scipy.stats", "weasyprint"):
        assert heavy not in loaded, heavy
    assert np.__name__ in loaded  # (the check does see what was imported)


def test_an_accuracy_only_policy_imports_no_other_family():
    """The registry imports a family's module on its first look-up: validating and planning
    an accuracy-only policy loads the accuracy module alone (not the attacks, smoothing or
    Han et al. modules, nor scipy.stats)."""
    loaded = _modules_after(
        "import robust_cert, robust_cert.engine\n"
        "from robust_cert.metrics import REGISTRY\n"
        "p = robust_cert.load_policy({'name': 'a', 'metrics': {'accuracy': {}}, "
        "'requirements': [{'metric': 'accuracy', 'at_least': 0.5}]})\n"
        "assert 'accuracy' in REGISTRY and 'robust_accuracy' in REGISTRY and len(REGISTRY) > 2")
    families = {m for m in loaded if m.startswith("robust_cert.metrics.")} - {
        "robust_cert.metrics.base"}
    assert families == {"robust_cert.metrics.accuracy"}
    assert "scipy.stats" not in loaded
    assert "torchattacks" not in loaded


def test_a_family_class_imported_directly_has_its_catalog_facts():
    """Imported without the registry, a family's class still states its entry's facts (it
    registers itself as it is defined), and the registry then returns that same class."""
    code = ("from robust_cert.metrics.smoothing import RandomizedSmoothing as C\n"
            "from robust_cert.catalog import CATALOG\n"
            "e = CATALOG['randomized_smoothing']\n"
            "assert (C.kind, C.quantity, C.shardable) == (e.kind, e.quantity, e.shardable)\n"
            "from robust_cert.metrics import REGISTRY\n"
            "assert REGISTRY['randomized_smoothing'] is C")
    assert "robust_cert.metrics.smoothing" in _modules_after(code)
