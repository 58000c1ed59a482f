"""The report's charts: matplotlib figures as inline SVG, the same bytes for the same input.

Each chart function takes one metric's result from the certificate body and returns a
:class:`Chart`, or None when what it needs is absent. Some charts also need the run's
in-memory per-point arrays (``Certificate.per_point``) and evaluation inputs: a report
re-rendered from the certificate JSON alone has neither, so those charts are left out rather
than drawn from guesses. :data:`CHARTS` maps a metric family to its chart functions; a new
family (certified-accuracy curve, p_σ histogram, radius sandwich) slots in by adding its
functions there.

Determinism: every chart is drawn under matplotlib's default style plus :data:`_RC` (never
the caller's rcParams), with a fixed ``svg.hashsalt`` (clip-path and marker ids), no date in
the metadata, and glyphs drawn as paths from matplotlib's bundled DejaVu fonts. The PDF's
hash is then a function of the certificate (and the library versions) alone. rcParams are
process-wide: do not render reports from several threads at once.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from robust_cert import stats

#: Colours shared with report.css (verdicts) and a neutral series colour.
PASS_COLOUR, FAIL_COLOUR, INCONCLUSIVE_COLOUR = "#1b7a3a", "#b3261e", "#8a6d00"
SERIES = "#1f5fa8"
VERDICT_COLOURS = {"PASS": PASS_COLOUR, "FAIL": FAIL_COLOUR, "INCONCLUSIVE": INCONCLUSIVE_COLOUR}
#: How many vulnerable examples the report shows.
MAX_EXAMPLES = 8

_RC = {
    "svg.hashsalt": "robust_cert",
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
}
# Group ids matplotlib numbers per figure ("axes_1", "patch_2"): nothing refers to them, and
# several inline SVGs would repeat them in one HTML document.
_GROUP_ID = re.compile(r' id="[A-Za-z.]+_\d+"')


@dataclass(frozen=True)
class Chart:
    """One figure of the report: an inline SVG and what it shows."""

    id: str
    title: str
    svg: Markup
    caption: str


@dataclass(frozen=True)
class ChartInputs:
    """What chart functions read: the certificate body, the run's per-point arrays (empty
    when re-rendered from JSON), and the evaluation inputs and labels (None unless given)."""

    body: dict[str, Any]
    per_point: dict[str, np.ndarray]
    x: np.ndarray | None = None
    y: np.ndarray | None = None

    @property
    def confidence(self) -> float:
        return float(self.body["policy"]["confidence"])

    def result(self, metric: str) -> dict | None:
        return next((r for r in self.body["results"]
                     if r["metric"] == metric and r["status"] == "ok"), None)

    def requirements(self, metric: str) -> list[dict]:
        return [r for r in self.body["requirements"] if r["metric"] == metric]


@contextmanager
def _style():
    """matplotlib's defaults plus :data:`_RC`, whatever the caller's rcParams (a notebook
    style must not change a report's bytes); the caller's settings come back afterwards."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(_RC)
        yield


def to_svg(fig: Figure) -> Markup:
    """The figure as an inline ``<svg>`` element (no XML prolog, no date, stable ids)."""
    buf = io.StringIO()
    with _style():
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    return Markup(_GROUP_ID.sub("", text))


def _figure(width: float = 6.4, height: float = 3.0) -> Figure:
    fig = Figure(figsize=(width, height))
    fig.add_subplot(1, 1, 1)
    return fig


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _eps_values(result: dict | None) -> np.ndarray | None:
    """Rows (ε, estimate, CI low, CI high), sorted by ε, of the proportions indexed by ε
    alone; None when there are none."""
    if result is None:
        return None
    rows = sorted((v["params"]["eps"], v["estimate"], *v["ci"]) for v in result["values"]
                  if set(v["params"]) == {"eps"})
    return np.array(rows, dtype=float) if rows else None


def _requirement_marks(ax, reqs: list[dict], *, x_of: Callable[[dict], float | None]) -> None:
    """A short bar at each requirement's threshold, coloured by its verdict."""
    for r in reqs:
        x = x_of(r)
        if x is None:
            continue
        colour = VERDICT_COLOURS.get(r["verdict"], "#555555")
        op = "≥" if r["direction"] == "at_least" else "≤"
        ax.plot([x], [r["threshold"]], marker="_", markersize=22, markeredgewidth=2.5,
                color=colour, linestyle="none", zorder=5)
        ax.annotate(f"required {op} {r['threshold']:g}: {r['verdict']}", (x, r["threshold"]),
                    xytext=(14, -3), textcoords="offset points", fontsize=8, color=colour)


def robustness_curve(inp: ChartInputs) -> Chart | None:
    """Robust accuracy over ε with its confidence band; ε = 0 is clean accuracy."""
    res = inp.result("robust_accuracy")
    rows = _eps_values(res)
    if rows is None:
        return None
    eps, est, lo, hi = rows.T
    clean = inp.result("accuracy")
    if eps[0] > 0 and clean is not None and clean["values"]:
        v = clean["values"][0]
        eps, est = np.r_[0.0, eps], np.r_[v["estimate"], est]
        lo, hi = np.r_[v["ci"][0], lo], np.r_[v["ci"][1], hi]
    fig = _figure()
    ax = fig.axes[0]
    ax.fill_between(eps, lo, hi, color=SERIES, alpha=0.18, linewidth=0,
                    label=f"{_pct(inp.confidence)} CI (Clopper–Pearson)")
    ax.plot(eps, est, color=SERIES, marker="o", markersize=4, label="robust accuracy")
    for x, y in zip(eps, est, strict=True):
        ax.annotate(_pct(y), (x, y), xytext=(0, 6), textcoords="offset points", fontsize=8,
                    ha="center", color=SERIES)
    _requirement_marks(ax, inp.requirements("robust_accuracy"),
                       x_of=lambda r: r["params"].get("eps"))
    ax.set_xlabel("ε (L∞ radius, data units)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1.05)
    right = eps.max() or 0.1
    ax.set_xlim(-0.08 * right, right * 1.4)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    attacks = ", ".join(res["config"].get("attacks", []))
    return Chart(
        "chart-robustness-curve", "Robustness curve",
        to_svg(fig),
        f"Fraction of test points still classified correctly under every attack ({attacks}) "
        f"within ε; ε = 0 is clean accuracy. An upper bound on true robust accuracy: attacks "
        f"that fail prove nothing. The band is the two-sided {_pct(inp.confidence)} "
        f"Clopper–Pearson interval over the sampling of test points (not Holm-adjusted).")


def per_class_recall(inp: ChartInputs) -> Chart | None:
    """Recall per class with exact intervals: where the model is weakest."""
    res = inp.result("accuracy")
    per_class = (res or {}).get("diagnostics", {}).get("per_class_recall")
    if not per_class:
        return None
    classes = sorted(per_class, key=lambda c: (len(c), c))
    k = np.array([per_class[c]["k"] for c in classes])
    n = np.array([per_class[c]["n"] for c in classes])
    shown = n > 0
    est = np.where(shown, k / np.maximum(n, 1), 0.0)
    ci = np.array([stats.clopper_pearson(int(a), int(b), inp.confidence) if b else (0.0, 0.0)
                   for a, b in zip(k, n, strict=True)])
    floor = 0.0 if ci[shown, 0].min() < 0.5 else np.floor(ci[shown, 0].min() * 10) / 10 - 0.1
    fig = _figure(6.4, 2.8)
    ax = fig.axes[0]
    xs = np.arange(len(classes))
    ax.bar(xs[shown], est[shown] - floor, bottom=floor, color=SERIES, alpha=0.75, width=0.6)
    ax.errorbar(xs[shown], est[shown], yerr=[est[shown] - ci[shown, 0], ci[shown, 1] -
                est[shown]], fmt="none", ecolor="#222222", elinewidth=1, capsize=3)
    overall = res["values"][0]["estimate"] if res["values"] else None
    if overall is not None:
        ax.axhline(overall, color="#555555", linestyle="--", linewidth=1,
                   label=f"overall {_pct(overall)}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xticks(xs, [f"{c}\n{a}/{b}" for c, a, b in zip(classes, k, n, strict=True)],
                  fontsize=8)
    ax.set_ylim(floor, 1.02)
    ax.set_ylabel("recall")
    ax.set_xlabel("class (correct / points)")
    ax.grid(axis="x", visible=False)
    note = f" The y axis starts at {floor:.1f}." if floor > 0 else ""
    return Chart(
        "chart-per-class-recall", "Recall per class",
        to_svg(fig),
        f"Fraction of each class's test points classified correctly, with two-sided "
        f"{_pct(inp.confidence)} Clopper–Pearson intervals. Display only: these intervals are "
        f"not adjusted for multiplicity and no requirement is tested per class.{note}")


def failure_rate_curve(inp: ChartInputs) -> Chart | None:
    """Failure rate under random noise over ε, with intervals and the required maxima."""
    res = inp.result("probabilistic_robustness")
    rows = _eps_values(res)
    if rows is None:
        return None
    eps, est, lo, hi = rows.T
    fig = _figure()
    ax = fig.axes[0]
    if len(eps) > 1:
        ax.fill_between(eps, lo, hi, color=SERIES, alpha=0.18, linewidth=0,
                        label=f"{_pct(inp.confidence)} CI (Clopper–Pearson)")
    ax.errorbar(eps, est, yerr=[est - lo, hi - est], color=SERIES, marker="o", markersize=4,
                capsize=4, label="failure rate")
    for x, y in zip(eps, est, strict=True):
        ax.annotate(f"{100 * y:.2f}%", (x, y), xytext=(-7, 0), textcoords="offset points",
                    fontsize=8, ha="right", va="center", color=SERIES)
    reqs = inp.requirements("probabilistic_robustness")
    _requirement_marks(ax, reqs, x_of=lambda r: r["params"].get("eps"))
    top = max([*hi, *(r["threshold"] for r in reqs)]) * 1.3 or 0.01
    ax.set_ylim(0, top)
    span = eps.max() - eps.min()
    pad = span * 0.3 if span > 0 else eps.max() * 0.5  # room for the labels either side
    ax.set_xlim(eps.min() - pad, eps.max() + pad * 2)
    if len(eps) == 1:
        ax.set_xticks(eps)
    ax.set_xlabel("ε (L∞ radius of uniform noise, data units)")
    ax.set_ylabel("failure rate")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    cfg = res["config"]
    failed = ("changed the prediction" if cfg.get("failure") == "prediction_changed"
              else "were misclassified")
    return Chart(
        "chart-failure-rate", "Failure rate under random noise",
        to_svg(fig),
        f"Fraction of {cfg.get('samples', '?')} i.i.d. (point, noise) draws per ε that "
        f"{failed}, with two-sided {_pct(inp.confidence)} Clopper–Pearson intervals; the bars mark "
        f"the required maxima. Random noise, not a worst-case adversary.")


def _per_point(title: str):
    """Mark a chart function that needs the run's per-point arrays and evaluation inputs, so a
    report rendered without them can say which figure it leaves out."""
    def mark(draw):
        draw.per_point_title = title
        return draw
    return mark


@_per_point("Most vulnerable test points")
def vulnerable_examples(inp: ChartInputs) -> Chart | None:
    """The test points the attacks broke at the smallest radius, as images.

    Needs the run's per-point arrays (``robust_accuracy/robust``) and the evaluation inputs;
    images only (inputs of shape H×W, or C×H×W with 1 or 3 channels). The certificate records which
    radius broke each point and how often random noise made it fail, not the adversarial
    input itself, so each panel shows the clean image with its label and prediction."""
    res = inp.result("robust_accuracy")
    robust = inp.per_point.get("robust_accuracy/robust")
    if res is None or robust is None or inp.x is None or inp.y is None:
        return None
    if not len(inp.x) == len(inp.y) == len(robust):
        return None
    x = inp.x[:, None] if inp.x.ndim == 3 else inp.x  # H×W inputs: one channel
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        return None
    eps = np.array(sorted(res["config"]["eps"]), dtype=float)
    correct = inp.per_point.get("accuracy/correct")
    if correct is None:
        correct = robust[:, 0] if eps[0] == 0 else None
    if correct is None:
        return None
    broken = correct[:, None] & ~robust
    candidates = np.flatnonzero(broken.any(axis=1))
    if not len(candidates):
        return None
    first = broken[candidates].argmax(axis=1)  # index of the smallest ε that broke it
    noise_fail, noise_draws = _noise_failures(inp, len(x))
    rate = np.where(noise_draws > 0, noise_fail / np.maximum(noise_draws, 1), 0.0)
    order = np.lexsort((candidates, -rate[candidates], first))[:MAX_EXAMPLES]
    chosen, first = candidates[order], first[order]
    prediction = inp.per_point.get("accuracy/prediction")
    lo, hi = inp.body["data"]["input_range"]
    cols = min(len(chosen), 4)
    rows = -(-len(chosen) // cols)
    with matplotlib.rc_context({"axes.grid": False}):
        fig = Figure(figsize=(1.55 * cols, 2.0 * rows), layout="constrained")
        for i, (idx, j) in enumerate(zip(chosen, first, strict=True)):
            ax = fig.add_subplot(rows, cols, i + 1)
            img = np.clip((x[idx] - lo) / (hi - lo), 0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(np.moveaxis(img, 0, -1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("#999999")
            pred = f", pred {int(prediction[idx])}" if prediction is not None else ""
            noise = (f"\nnoise fails {int(noise_fail[idx])}/{int(noise_draws[idx])}"
                     if noise_draws[idx] else "")
            ax.set_title(f"#{idx}: label {int(inp.y[idx])}{pred}\nbroken at ε={eps[j]:g}{noise}",
                         fontsize=7.5, color=FAIL_COLOUR)
    return Chart(
        "chart-vulnerable-examples", "Most vulnerable test points",
        to_svg(fig),
        f"The {len(chosen)} correctly classified test points that the attacks broke at the "
        f"smallest radius (ties: most frequent failures under random noise), shown clean with "
        f"their label and clean prediction. The certificate keeps which radius broke each "
        f"point, not the adversarial input. Drawn from the certification run's per-point "
        f"results; a report re-rendered from the certificate JSON leaves this figure out.")


def _noise_failures(inp: ChartInputs, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per test point: failures and draws under random noise, summed over every ε."""
    fails, draws = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for key, idx in inp.per_point.items():
        if key.startswith("probabilistic_robustness/index@"):
            failed = inp.per_point.get(key.replace("/index@", "/failed@"))
            if failed is not None and len(failed) == len(idx) and idx.max(initial=-1) < n:
                draws += np.bincount(idx, minlength=n)
                fails += np.bincount(idx, weights=failed, minlength=n).astype(np.int64)
    return fails, draws


#: Chart functions per metric family, in the order the report shows them.
CHARTS: dict[str, tuple[Callable[[ChartInputs], Chart | None], ...]] = {
    "accuracy": (per_class_recall,),
    "robust_accuracy": (robustness_curve, vulnerable_examples),
    "probabilistic_robustness": (failure_rate_curve,),
}


def charts_for(metric: str, inp: ChartInputs) -> list[Chart]:
    """The charts of one metric family that its data allows (none for unknown families)."""
    charts = []
    for draw in CHARTS.get(metric, ()):
        with _style():
            chart = draw(inp)
        if chart is not None:
            charts.append(chart)
    return charts


def omitted_for(metric: str, inp: ChartInputs) -> list[str]:
    """Titles of the family's figures that need per-point data this rendering lacks."""
    if inp.per_point and inp.x is not None:
        return []
    return [draw.per_point_title for draw in CHARTS.get(metric, ())
            if hasattr(draw, "per_point_title")]
