"""The report's charts: matplotlib figures as inline SVG, the same bytes for the same input.

Each chart function takes one metric's result from the certificate body and returns a
:class:`Chart`, or None when what it needs is absent. Some charts also need the run's
in-memory per-point arrays (``Certificate.per_point``) and evaluation inputs: a report
re-rendered from the certificate JSON alone has neither, so those charts are left out rather
than drawn from guesses. :data:`CHARTS` maps a metric family to its chart functions (a
function may return several charts, e.g. one per norm); a new family slots in by adding its
functions there. A family without functions there whose catalog entry declares a curve
(:attr:`robust_cert.catalog.MetricEntry.curve`) gets :func:`generic_curve`; otherwise none.

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
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from markupsafe import Markup
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from robust_cert import catalog, stats
from robust_cert.verdicts import Verdict

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

#: Colours shared with report.css (verdicts) and a neutral series colour.
PASS_COLOUR, FAIL_COLOUR, INCONCLUSIVE_COLOUR = "#1b7a3a", "#b3261e", "#8a6d00"
SERIES = "#1f5fa8"
VERDICT_COLOURS = {Verdict.PASS: PASS_COLOUR, Verdict.FAIL: FAIL_COLOUR,
                   Verdict.INCONCLUSIVE: INCONCLUSIVE_COLOUR}
#: How many vulnerable examples the report shows.
MAX_EXAMPLES = 8
#: The printable width of an A4 page in the PDF (210 mm less 2 × 16 mm margins), in inches.
#: A figure wider than this is scaled down to fit, and its text with it.
PRINT_WIDTH_IN = 178 / 25.4
#: Caption size of each vulnerable example (points, as printed: its figure is not scaled).
EXAMPLE_TITLE_PT = 7.5
#: Examples per row (two panels each: clean and perturbed).
EXAMPLES_PER_ROW = 3

_RC: dict[RcKeyType, Any] = {
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


def _eps_values(result: dict | None, key: str = "eps") -> np.ndarray | None:
    """Rows (ε, estimate, CI low, CI high), sorted by ε, of the proportions indexed by ε
    (or by the parameter ``key``) alone; None when there are none."""
    if result is None:
        return None
    rows = sorted((v["params"][key], v["estimate"], *v["ci"]) for v in result["values"]
                  if set(v["params"]) == {key})
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
    if rows is None or res is None:  # (no result gives no rows)
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
    if not per_class or res is None:  # (no result gives none)
        return None
    classes = sorted(per_class, key=lambda c: (len(c), c))
    k = np.array([per_class[c]["k"] for c in classes])
    n = np.array([per_class[c]["n"] for c in classes])
    shown = n > 0
    est = np.where(shown, k / np.maximum(n, 1), 0.0)
    ci = np.array([stats.clopper_pearson(int(a), int(b), inp.confidence) if b else (0.0, 0.0)
                   for a, b in zip(k, n, strict=True)])
    fig = _figure(6.0, 2.8)
    ax = fig.axes[0]
    xs = np.arange(len(classes))
    ax.bar(xs[shown], est[shown], color=SERIES, alpha=0.75, width=0.6)
    ax.errorbar(xs[shown], est[shown], yerr=[est[shown] - ci[shown, 0], ci[shown, 1] -
                est[shown]], fmt="none", ecolor="#222222", elinewidth=1, capsize=3)
    overall = res["values"][0]["estimate"] if res["values"] else None
    if overall is not None:
        ax.axhline(overall, color="#555555", linestyle="--", linewidth=1,
                   label=f"overall {_pct(overall)}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xticks(xs, [f"{c}\n{a}/{b}" for c, a, b in zip(classes, k, n, strict=True)],
                  fontsize=8)
    _unit_axis(ax)
    ax.set_ylabel("recall")
    ax.set_xlabel("class (correct / points)")
    ax.grid(axis="x", visible=False)
    return Chart(
        "chart-per-class-recall", "Recall per class",
        to_svg(fig),
        f"Fraction of each class's test points classified correctly, with two-sided "
        f"{_pct(inp.confidence)} Clopper–Pearson intervals. Display only: these intervals are "
        f"not adjusted for multiplicity and no requirement is tested per class. The y axis is "
        f"fixed at 0–1 in every report, so reports can be compared by eye.")


def _unit_axis(ax) -> None:
    """The same y axis in every report: 0 to 1 (a little headroom for the error bars)."""
    ax.set_ylim(0, 1.04)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


#: At most this many radii in the per-class robust accuracy chart (evenly chosen).
MAX_CLASS_EPS = 4
#: Bar colours for successive radii: light to dark.
_EPS_SHADES = ("#9dbbe0", "#5b8cc9", "#1f5fa8", "#0d3566")


def _per_point(title: str, *, inputs: bool = True):
    """Mark a chart function that needs the run's per-point arrays (and, with ``inputs``, the
    evaluation inputs), so a report rendered without them can say which figure it leaves out."""
    def mark(draw):
        draw.per_point_title = title
        draw.needs_inputs = inputs
        return draw
    return mark


@_per_point("Robust accuracy per class")
def per_class_robust_accuracy(inp: ChartInputs) -> Chart | None:
    """Robust accuracy of each class at each ε (up to :data:`MAX_CLASS_EPS` radii), with
    exact intervals, on the same fixed 0–1 axis as recall.

    Needs the run's per-point outcomes (``robust_accuracy/robust``: points × ε) and the
    evaluation labels."""
    res = inp.result("robust_accuracy")
    robust = inp.per_point.get("robust_accuracy/robust")
    if res is None or robust is None or inp.y is None:
        return None
    robust = np.asarray(robust, dtype=bool)
    eps_all = [float(e) for e in res["config"]["eps"]]
    if robust.ndim != 2 or robust.shape != (len(inp.y), len(eps_all)):
        return None
    cols = [j for j, e in enumerate(eps_all) if e > 0]
    if not cols:
        return None
    if len(cols) > MAX_CLASS_EPS:
        cols = [cols[int(i)] for i in np.unique(np.linspace(0, len(cols) - 1,
                                                            MAX_CLASS_EPS).round())]
    y = np.asarray(inp.y).astype(int)
    num = int(inp.body["model"].get("num_classes") or (y.max() + 1))
    classes = np.arange(num)
    counts = np.bincount(y, minlength=num)
    fig = _figure(6.0, 2.8)
    ax = fig.axes[0]
    width = 0.8 / len(cols)
    shades = [_EPS_SHADES[int(i)] for i in np.linspace(0, len(_EPS_SHADES) - 1,
                                                       len(cols)).round()]
    for s, j in enumerate(cols):
        k = np.bincount(y, weights=robust[:, j], minlength=num).astype(int)
        shown = counts > 0
        est = np.where(shown, k / np.maximum(counts, 1), 0.0)
        ci = np.array([stats.clopper_pearson(int(a), int(b), inp.confidence) if b else (0, 0)
                       for a, b in zip(k, counts, strict=True)])
        xs = classes + (s - (len(cols) - 1) / 2) * width
        ax.bar(xs[shown], est[shown], width=width * 0.92, color=shades[s],
               label=f"ε = {eps_all[j]:g}")
        ax.errorbar(xs[shown], est[shown], yerr=[est[shown] - ci[shown, 0],
                    ci[shown, 1] - est[shown]], fmt="none", ecolor="#222222", elinewidth=0.8,
                    capsize=1.5)
    ax.set_xticks(classes, [f"{c}\n{n}" for c, n in zip(classes, counts, strict=True)],
                  fontsize=8)
    _unit_axis(ax)
    ax.set_ylabel("robust accuracy")
    ax.set_xlabel("class (points)")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    picked = "" if len(cols) == len([e for e in eps_all if e > 0]) else (
        f" {len(cols)} of the {len([e for e in eps_all if e > 0])} radii, evenly chosen.")
    return Chart(
        "chart-per-class-robust-accuracy", "Robust accuracy per class",
        to_svg(fig),
        f"Fraction of each class's test points still classified correctly under every attack "
        f"within ε (an upper bound on the true robust accuracy), with two-sided "
        f"{_pct(inp.confidence)} Clopper–Pearson intervals; display only, not adjusted for "
        f"multiplicity.{picked} Same fixed 0–1 axis as the recall per class. Drawn from the "
        f"certification run's per-point results and the evaluation labels; a report "
        f"re-rendered from the certificate JSON leaves this figure out.")


def failure_rate_curve(inp: ChartInputs) -> Chart | None:
    """Failure rate under random noise over ε, with intervals and the required maxima."""
    res = inp.result("probabilistic_robustness")
    rows = _eps_values(res)
    if rows is None or res is None:  # (no result gives no rows)
        return None
    eps, est, lo, hi = rows.T
    # several draws per point: the interval is the population (betting) one, not pooled CP
    clustered = str(res["values"][0].get("interval_method", "")).startswith("betting")
    method = "betting, per-point rates" if clustered else "Clopper–Pearson"
    fig = _figure()
    ax = fig.axes[0]
    if len(eps) > 1:
        ax.fill_between(eps, lo, hi, color=SERIES, alpha=0.18, linewidth=0,
                        label=f"{_pct(inp.confidence)} CI ({method})")
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
        f"Fraction of {cfg.get('samples', '?')} (point, noise) draws per ε that "
        f"{failed}, with two-sided {_pct(inp.confidence)} "
        + ("betting intervals on the mean of the per-point failure rates (draws are clustered "
           "by point; the interval covers the population of inputs)" if clustered else
           "Clopper–Pearson intervals")
        + "; the bars mark the required maxima. Random noise, not a worst-case adversary.")


@_per_point("Most vulnerable test points")
def vulnerable_examples(inp: ChartInputs) -> Chart | None:
    """The test points the attacks broke at the smallest radius, as images.

    Needs the run's per-point arrays (``robust_accuracy/robust``) and the evaluation inputs;
    images only (inputs of shape H×W, or C×H×W with 1 or 3 channels). Where the run kept the
    adversarial inputs (``robust_accuracy/example_*``: up to 8 points), each of those points is
    shown clean and perturbed with both predictions; otherwise (an older run) the clean image
    with its label and prediction."""
    res = inp.result("robust_accuracy")
    robust = inp.per_point.get("robust_accuracy/robust")
    if res is None or robust is None or inp.x is None or inp.y is None:
        return None
    if not len(inp.x) == len(inp.y) == len(robust):
        return None
    x = _as_images(inp.x)
    if x is None:
        return None
    eps = np.array(sorted(res["config"]["eps"]), dtype=float)
    correct = inp.per_point.get("accuracy/correct")
    if correct is None:
        correct = robust[:, 0] if eps[0] == 0 else None
    if correct is None:
        return None
    broken = correct[:, None] & ~robust
    candidates = np.flatnonzero(broken.any(axis=1))
    adv_of: dict[int, tuple[np.ndarray, int]] = {}
    ex_index = inp.per_point.get("robust_accuracy/example_index")
    ex_adv = inp.per_point.get("robust_accuracy/example_adv")
    ex_pred = inp.per_point.get("robust_accuracy/example_pred")
    if ex_index is not None and ex_adv is not None and ex_pred is not None and len(ex_index):
        adv_images = _as_images(np.asarray(ex_adv))
        if adv_images is not None and adv_images.shape[1:] == x.shape[1:]:
            adv_of = {int(i): (a, int(q)) for i, a, q in
                      zip(ex_index, adv_images, ex_pred, strict=True) if i < len(x)}
            candidates = np.array(sorted(set(candidates.tolist()) & set(adv_of)), dtype=int)
    if not len(candidates):
        return None
    first = broken[candidates].argmax(axis=1)  # index of the smallest ε that broke it
    noise_fail, noise_draws = _noise_failures(inp, len(x))
    rate = np.where(noise_draws > 0, noise_fail / np.maximum(noise_draws, 1), 0.0)
    order = np.lexsort((candidates, -rate[candidates], first))[:MAX_EXAMPLES]
    chosen, first = candidates[order], first[order]
    prediction = inp.per_point.get("accuracy/prediction")
    lo, hi = inp.body["data"]["input_range"]
    per = 2 if adv_of else 1  # panels per example: clean (and perturbed)
    cols = min(len(chosen), EXAMPLES_PER_ROW if adv_of else 2 * EXAMPLES_PER_ROW)
    rows = -(-len(chosen) // cols)
    with matplotlib.rc_context({"axes.grid": False}):
        # as wide as the printed page at most, so the captions print at EXAMPLE_TITLE_PT
        fig = Figure(figsize=(min(PRINT_WIDTH_IN - 0.4, 1.1 * cols * per), 1.75 * rows),
                     layout="constrained")
        for i, (idx, j) in enumerate(zip(chosen, first, strict=True)):
            ax = fig.add_subplot(rows, cols * per, per * i + 1)
            pred = f", pred {int(prediction[idx])}" if prediction is not None else ""
            noise = (f"\nnoise fails {int(noise_fail[idx])}/{int(noise_draws[idx])}"
                     if noise_draws[idx] else "")
            if adv_of:
                _image(ax, x[idx], lo, hi, f"#{idx} clean\nlabel {int(inp.y[idx])}{pred}{noise}",
                       "#333333")
                adv, q = adv_of[int(idx)]
                _image(fig.add_subplot(rows, cols * per, per * i + 2), adv, lo, hi,
                       f"ε={eps[j]:g} attack\npred {q}", FAIL_COLOUR)
            else:
                _image(ax, x[idx], lo, hi,
                       f"#{idx}: label {int(inp.y[idx])}{pred}\nbroken at ε={eps[j]:g}{noise}",
                       FAIL_COLOUR)
    if adv_of:
        shown = (f"shown clean (with label and clean prediction) and next to it the adversarial "
                 f"input that broke it at that radius, with the model's prediction on it. The "
                 f"run keeps the adversarial inputs of the first {len(adv_of)} points broken at "
                 f"the smallest radius")
    else:
        shown = ("shown clean with their label and clean prediction. This certificate keeps "
                 "which radius broke each point, not the adversarial input")
    return Chart(
        "chart-vulnerable-examples", "Most vulnerable test points",
        to_svg(fig),
        f"The {len(chosen)} correctly classified test points that the attacks broke at the "
        f"smallest radius (ties: most frequent failures under random noise), {shown}. Drawn "
        f"from the certification run's per-point results; a report re-rendered from the "
        f"certificate JSON leaves this figure out.")


def _as_images(x: np.ndarray) -> np.ndarray | None:
    """Inputs as N×C×H×W images with 1 or 3 channels, or None when they are not images."""
    x = x[:, None] if x.ndim == 3 else x  # H×W inputs: one channel
    return x if x.ndim == 4 and x.shape[1] in (1, 3) else None


def _image(ax, img: np.ndarray, lo: float, hi: float, title: str, colour: str) -> None:
    """One C×H×W image in [lo, hi] on ``ax``, framed, without ticks."""
    img = np.clip((img - lo) / (hi - lo), 0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.moveaxis(img, 0, -1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("#999999")
    ax.set_title(title, fontsize=EXAMPLE_TITLE_PT, color=colour)


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


def certified_accuracy_curve(inp: ChartInputs) -> Chart | None:
    """Certified accuracy of the smoothed classifier over the L2 radius, with its CI band."""
    res = inp.result("randomized_smoothing")
    rows = _eps_values(res, "radius")
    if rows is None or res is None:  # (no result gives no rows)
        return None
    r, est, lo, hi = rows.T
    fig = _figure()
    ax = fig.axes[0]
    ax.fill_between(r, lo, hi, color=SERIES, alpha=0.18, linewidth=0, step="post" if
                    len(r) == 1 else None, label=f"{_pct(inp.confidence)} CI (Clopper–Pearson)")
    ax.plot(r, est, color=SERIES, marker="o", markersize=4, label="certified accuracy")
    if len(r) == 1:
        ax.errorbar(r, est, yerr=[est - lo, hi - est], color=SERIES, capsize=4, fmt="none")
    for xv, yv in zip(r, est, strict=True):
        ax.annotate(_pct(yv), (xv, yv), xytext=(0, 6), textcoords="offset points", fontsize=8,
                    ha="center", color=SERIES)
    _requirement_marks(ax, inp.requirements("randomized_smoothing"),
                       x_of=lambda q: q["params"].get("radius"))
    cfg, diag = res["config"], res["diagnostics"]
    cap = diag.get("radius_cap")
    right = max(r.max(), 0.1)
    if cap is not None and cap <= right * 1.5:
        ax.axvline(cap, color="#777777", linestyle=":", linewidth=1,
                   label=f"largest certifiable radius {cap:.3g}")
    ax.set_xlabel("L2 radius r (data units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.08 * right, right * 1.4)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return Chart(
        "chart-certified-accuracy", "Certified accuracy of the smoothed classifier",
        to_svg(fig),
        f"Fraction of test points whose Gaussian-smoothed prediction (σ = {cfg.get('sigma')}) "
        f"is correct and certified (CERTIFY, n = {cfg.get('n')} draws, α = {cfg.get('alpha')} "
        f"per point) with an L2 radius of at least r; {diag.get('abstained', '?')} points "
        f"abstained. The band is the two-sided {_pct(inp.confidence)} Clopper–Pearson interval "
        f"over the sampling of test points (not Holm-adjusted). The certificate is about the "
        f"smoothed classifier, not the base model.")


@_per_point("Histogram of p_σ", inputs=False)
def p_sigma_histogram(inp: ChartInputs) -> Chart | None:
    """Estimated p_σ per test point (the primary estimator), with the thresholds τ."""
    res = inp.result("analytical_robustness")
    if res is None:
        return None
    primary = res["diagnostics"].get("primary") or res["config"].get("primary")
    p = inp.per_point.get(f"analytical_robustness/p_{primary}")
    if p is None or not len(p):
        return None
    p = np.clip(np.asarray(p, dtype=float), 0, 1)
    fig = _figure(6.4, 2.8)
    ax = fig.axes[0]
    # (matplotlib's stubs: bins a Sequence[float], which an ndarray is not, though it works)
    ax.hist(p, bins=np.linspace(0, 1, 21), color=SERIES, alpha=0.75, edgecolor="white",  # pyright: ignore[reportArgumentType]
            linewidth=0.6)
    for tau in res["config"].get("thresholds", []):
        ax.axvline(tau, color="#555555", linestyle="--", linewidth=1)
        ax.annotate(f"τ = {tau:g}: {_pct(float((p >= tau).mean()))} ≥ τ", (tau, 1),
                    xycoords=("data", "axes fraction"), xytext=(-4, -4),
                    textcoords="offset points", ha="right", va="top", fontsize=8,
                    color="#555555")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"estimated p_σ ({primary})")
    ax.set_ylabel("test points")
    ax.grid(axis="x", visible=False)
    sigma = res["config"].get("sigma")
    return Chart(
        "chart-p-sigma", "Estimated p_σ per test point",
        to_svg(fig),
        f"Histogram over the {len(p)} test points of the estimated probability p_σ that "
        f"Gaussian noise (σ = {sigma}) leaves the prediction unchanged ({primary} estimator; "
        f"an estimate with no guarantee: its measured error is in the diagnostics). The dashed "
        f"lines are the thresholds τ of the reported proportions. Drawn from the certification "
        f"run's per-point results; a report re-rendered from the certificate JSON leaves this "
        f"figure out.")


#: At most this many points in a safe-radius sandwich (evenly spaced in the sorted order).
MAX_SANDWICH = 60
_NORM_NAMES = catalog.NORM_LABELS


@_per_point("Safe-radius sandwich", inputs=False)
def safe_radius_sandwich(inp: ChartInputs) -> list[Chart]:
    """Per point: the sound lower bound, the CLEVER-style estimate and the witness (upper
    bound) of the maximum safe radius, one chart per norm."""
    res = inp.result("safe_radius")
    holds = inp.per_point.get("safe_radius/holds")
    if res is None or holds is None:
        return []
    prop = res["config"].get("property", res["diagnostics"].get("property", "adversarial"))
    charts = []
    for nm in res["config"].get("norms", []):
        arrays = [inp.per_point.get(f"safe_radius/{k}@{nm}") for k in ("lower", "upper",
                                                                      "clever")]
        if any(a is None or len(a) != len(holds) for a in arrays):
            continue
        est_all = inp.per_point.get(f"safe_radius/estimate@{nm}")
        if est_all is None or len(est_all) != len(holds):
            est_all = np.full(len(holds), np.nan)
        idx = np.flatnonzero(holds)
        if not len(idx):
            continue
        lower, upper, clever = (np.asarray(a, dtype=float)[idx] for a in arrays)
        estimate = np.asarray(est_all, dtype=float)[idx]
        key = np.where(np.isfinite(lower), lower, clever)
        order = np.lexsort((idx, upper, key))
        if len(order) > MAX_SANDWICH:  # evenly spaced, both ends included
            order = order[np.unique(np.linspace(0, len(order) - 1, MAX_SANDWICH).round()
                                    .astype(int))]
        lower, upper, clever = lower[order], upper[order], clever[order]
        estimate = estimate[order]
        xs = np.arange(len(order))
        finite = np.concatenate([v[np.isfinite(v) & (v > 0)]
                                 for v in (lower, upper, clever, estimate)])
        if not finite.size:
            continue
        floor, top = finite.min() / 2, finite.max() * 2
        fig = _figure(6.4, 3.0)
        ax = fig.axes[0]
        ax.set_yscale("log")
        up_shown = np.where(np.isfinite(upper), upper, top)
        lo_shown = np.where(np.isfinite(lower) & (lower > 0), lower, floor)
        ax.vlines(xs, lo_shown, up_shown, color="#bbbbbb", linewidth=1.2, zorder=1)
        ok = np.isfinite(lower) & (lower > 0)
        ax.scatter(xs[ok], lower[ok], marker="^", s=16, color=PASS_COLOUR, zorder=3,
                   label="lower bound (certified)")
        ok = np.isfinite(clever) & (clever > 0)
        ax.scatter(xs[ok], clever[ok], marker="o", s=12, color=SERIES, zorder=3,
                   label="estimate (CLEVER)")
        ok = np.isfinite(estimate) & (estimate > 0)
        if ok.any():
            ax.scatter(xs[ok], estimate[ok], marker="D", s=10, facecolors="none",
                       edgecolors=SERIES, zorder=3, label="estimate (pattern search)")
        ok = np.isfinite(upper) & (upper > 0)
        ax.scatter(xs[ok], upper[ok], marker="v", s=16, color=FAIL_COLOUR, zorder=3,
                   label="upper bound (witness)")
        none = ~np.isfinite(upper)
        if none.any():
            ax.scatter(xs[none], np.full(none.sum(), top), marker="^", s=16,
                       facecolors="none", edgecolors=FAIL_COLOUR, zorder=3,
                       label="no witness found")
        for r in res["config"].get("radii", []):
            if r > 0:
                ax.axhline(r, color="#555555", linestyle="--", linewidth=0.8)
        ax.set_ylim(floor, top * 1.5)
        ax.set_xlim(-1, len(xs))
        ax.set_xlabel("test points where the property holds, sorted by lower bound")
        ax.set_ylabel(f"{_NORM_NAMES.get(nm, nm)} radius (data units)")
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        sampled = (f" {len(order)} of the {len(idx)} points, evenly spaced in that order."
                   if len(idx) > len(order) else "")
        violations = res["diagnostics"].get(nm, {}).get("sandwich_violations", 0)
        warn = (f" {violations} points have a lower bound above their witness: the Lipschitz "
                f"bound is not sound for them." if violations else "")
        by = res["diagnostics"].get(nm, {}).get("certified_by") or {}
        by_text = "; ".join(f"{n} by {catalog.BOUND_LABELS.get(k, k)}"
                            for k, n in by.items() if n)
        if by_text:
            warn += f" Certified by: {by_text}."
        invariance = res["diagnostics"].get("invariance")
        if invariance:
            warn += f" The invariant kind is {invariance}."
        charts.append(Chart(
            f"chart-safe-radius-{nm}",
            f"Safe-radius sandwich ({_NORM_NAMES.get(nm, nm)}, {prop})",
            to_svg(fig),
            f"For each test point where the {prop} property holds, the maximum safe "
            f"{_NORM_NAMES.get(nm, nm)} radius lies between the sound lower bound "
            f"(▲, certified) and the distance of the closest violation found (▼, a witness); "
            f"● is the CLEVER-style estimate and ◇ the derivative-free pattern-search "
            f"estimate (no guarantee). Log scale; dashed lines are the "
            f"radii of the reported proportions.{sampled}{warn} Drawn from the certification "
            f"run's per-point results; a report re-rendered from the certificate JSON leaves "
            f"this figure out."))
    return charts


#: At most this many (output, radius) rows in the reachable-range chart.
MAX_RANGE_ROWS = 24


def safe_radius_ranges(inp: ChartInputs) -> list[Chart]:
    """Reachability: per norm, the reachable range of each output at each radius over the
    evaluation set — sound outer range (light) and witnessed inner range (dark), from the
    certificate's ``diagnostics.ranges`` (no per-point results needed)."""
    res = inp.result("safe_radius")
    ranges = (res or {}).get("diagnostics", {}).get("ranges") or {}
    by_norm: dict[str, list[tuple[str, str, dict]]] = {}
    for tag, row in ranges.items():
        nm, r, k = tag.split(":")
        by_norm.setdefault(nm, []).append((r, k, row))
    charts = []
    norms = [n for n in (res or {}).get("config", {}).get("norms", []) if n in by_norm]
    for nm in norms + sorted(set(by_norm) - set(norms)):
        rows = [t for t in by_norm[nm] if t[2].get("found")][:MAX_RANGE_ROWS]
        if not rows:
            continue
        fig = _figure(6.4, 0.35 * len(rows) + 1.0)
        ax = fig.axes[0]
        ys = np.arange(len(rows))
        for y, (_, _, row) in zip(ys, rows, strict=True):
            if row.get("outer"):
                lo, hi = row["outer"]
                ax.barh(y, hi - lo, left=lo, height=0.7, color="#cfd8e3",
                        label="sound outer range" if y == 0 else None)
            lo, hi = row["found"]
            ax.barh(y, hi - lo, left=lo, height=0.35, color=SERIES,
                    label="witnessed (attained)" if y == 0 else None)
        ax.set_yticks(ys, [f"output {k}, r = {r}" for r, k, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("output value (logit)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        bad = sum(int(row.get("violations", 0)) for _, _, row in rows)
        warn = (f" {bad} points have a witnessed value outside their sound range: a bug."
                if bad else "")
        name = _NORM_NAMES.get(nm, nm)
        charts.append(Chart(
            f"chart-safe-radius-ranges-{nm}", f"Reachable ranges ({name} balls)", to_svg(fig),
            f"For each output and radius r, over all evaluation points: the range of the "
            f"output over the {name} ball of radius r around each point. The light bar is "
            f"sound (the union of per-point outer bounds: no input in any ball, and no float32 "
            f"evaluation of one, gives a value outside it); the dark bar is the union of the "
            f"values the search attained (the true reachable range contains it).{warn}"))
    return charts


def decision_surfaces(inp: ChartInputs) -> Chart | None:
    """The margin around the most vulnerable points on a plane through each (divergence
    metric's ``diagnostics.surface``), with the decision boundary at margin 0."""
    res = inp.result("divergence")
    surfaces = (res or {}).get("diagnostics", {}).get("surface") or []
    surfaces = [s for s in surfaces if s.get("margin") and s.get("axis")][:MAX_EXAMPLES]
    if not surfaces or res is None:  # (no result gives none)
        return None
    eps = max(res["config"]["eps"])
    norm = res["config"].get("norm", "linf")
    cols = min(len(surfaces), 4)
    rows = -(-len(surfaces) // cols)
    low = min(float(np.min(s["margin"])) for s in surfaces)
    high = max(float(np.max(s["margin"])) for s in surfaces)
    # white at margin 0 whatever the range: blue above (unchanged), red below (changed)
    span = max(abs(low), abs(high)) or 1.0
    low, high = min(low, -0.1 * span), max(high, 0.1 * span)
    norm_c = TwoSlopeNorm(0.0, low, high)
    levels = np.r_[np.linspace(low, 0, 8)[:-1], np.linspace(0, high, 13)]
    with matplotlib.rc_context({"axes.grid": False}):
        fig = Figure(figsize=(1.75 * cols + 0.9, 1.9 * rows + 0.3), layout="constrained")
        axes = [fig.add_subplot(rows, cols, i + 1) for i in range(len(surfaces))]
        for ax, surf in zip(axes, surfaces, strict=True):
            axis = np.asarray(surf["axis"], dtype=float)
            margin = np.asarray(surf["margin"], dtype=float)  # [a (ascent), b (random)]
            filled = ax.contourf(axis, axis, margin.T, levels=levels, cmap="RdBu",
                                 norm=norm_c)
            if margin.min() < 0 < margin.max():
                ax.contour(axis, axis, margin.T, levels=[0.0], colors="black",
                           linewidths=1.2)
            if norm == "l2":
                t = np.linspace(0, 2 * np.pi, 97)
                ax.plot(eps * np.cos(t), eps * np.sin(t), color="#222222", linestyle=":",
                        linewidth=0.9)
            else:
                ax.axvline(eps, color="#222222", linestyle=":", linewidth=0.9)
                ax.axvline(-eps, color="#222222", linestyle=":", linewidth=0.9)
            ax.plot([0], [0], marker="x", color="black", markersize=5)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6.5)
            ax.set_title(f"#{surf['index']}: pred {surf['prediction']}\nKL {surf['kl']:.3g}",
                         fontsize=7.5)
        for ax in axes[-cols:]:
            ax.set_xlabel("ascent direction", fontsize=7)
        for ax in axes[::cols]:
            ax.set_ylabel("random direction", fontsize=7)
        bar = fig.colorbar(filled, ax=axes, shrink=0.8, ticks=[low, 0, high])
        bar.ax.set_yticklabels([f"{low:.2g}", "0", f"{high:.2g}"], fontsize=7)
        bar.set_label("margin f_t − max f_j", fontsize=7)
    ball = ("the dotted circle is the ε-ball" if norm == "l2" else
            "between the dotted lines the ascent direction alone stays in the L∞ ε-ball")
    return Chart(
        "chart-decision-surfaces", "Decision surface around the most vulnerable points",
        to_svg(fig),
        f"For the {len(surfaces)} test points with the largest KL divergence found at "
        f"ε = {eps:g}: the margin of the predicted class (blue: still predicted, red: changed) "
        f"on the plane x + a·u + b·v, u the ascent direction and v a random direction "
        f"orthogonal to it, a, b ∈ [−2ε, 2ε] (clipped to the input range). The black line is the "
        f"decision boundary (margin 0); × is the test point; {ball}. One plane through a "
        f"high-dimensional input: an illustration, not a bound.")


#: Chart functions per metric family, in the order the report shows them.
CHARTS: dict[str, tuple[Callable[[ChartInputs], Chart | list[Chart] | None], ...]] = {
    "accuracy": (per_class_recall,),
    "robust_accuracy": (robustness_curve, per_class_robust_accuracy, vulnerable_examples),
    "probabilistic_robustness": (failure_rate_curve,),
    "randomized_smoothing": (certified_accuracy_curve,),
    "analytical_robustness": (p_sigma_histogram,),
    "safe_radius": (safe_radius_sandwich, safe_radius_ranges),
    "divergence": (decision_surfaces,),
}


def generic_curve(metric: str, inp: ChartInputs) -> Chart | None:
    """The estimates of a family's proportions indexed by its catalog curve's parameter
    alone, over that parameter, with their intervals and the requirements' thresholds; None
    when the family declares no curve or has no such proportion. Labels and units are the
    catalog entry's; nothing else about the family is assumed."""
    entry = catalog.entry(metric)
    curve = entry.curve
    res = inp.result(metric)
    rows = _eps_values(res, curve.param) if curve is not None else None
    if curve is None or res is None or rows is None:
        return None
    xs, est, lo, hi = rows.T
    fig = _figure()
    ax = fig.axes[0]
    ax.errorbar(xs, est, yerr=[est - lo, hi - est], color=SERIES, marker="o", markersize=4,
                capsize=4, label=entry.label)
    _requirement_marks(ax, [r for r in inp.requirements(metric)
                            if set(r["params"]) == {curve.param}],
                       x_of=lambda r: r["params"].get(curve.param))
    ax.set_xlabel(f"{curve.param} ({entry.unit})" if entry.unit else curve.param)
    ax.set_ylabel(entry.label)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="best", fontsize=8, frameon=False)
    return Chart(
        f"chart-{re.sub(r'[^a-z0-9]+', '-', metric.lower())}-curve",
        f"{entry.label[:1].upper()}{entry.label[1:]} over {curve.param}",
        to_svg(fig),
        f"Estimate of {entry.label} ({res['kind']}) at each {curve.param}, with the "
        f"certificate's two-sided {_pct(inp.confidence)} intervals (not Holm-adjusted); the "
        f"bars mark the requirements' thresholds.")


def _draws(metric: str) -> tuple[Callable[[ChartInputs], Chart | list[Chart] | None], ...]:
    """The family's chart functions: its own in :data:`CHARTS`, else the generic curve."""
    own = CHARTS.get(metric)
    if own is not None:
        return own
    return (lambda inp: generic_curve(metric, inp),) if catalog.entry(metric).curve else ()


def charts_for(metric: str, inp: ChartInputs) -> list[Chart]:
    """The charts of one metric family that its data allows: its own functions, else the
    generic curve of its catalog entry, else none (also for families the catalog lacks)."""
    charts = []
    for draw in _draws(metric):
        with _style():
            drawn = draw(inp)
        if isinstance(drawn, Chart):
            charts.append(drawn)
        elif drawn:
            charts.extend(drawn)
    return charts


def omitted_for(metric: str, inp: ChartInputs) -> list[str]:
    """Titles of the family's figures that need per-point data this rendering lacks."""
    return [draw.per_point_title for draw in _draws(metric)
            if hasattr(draw, "per_point_title")
            and (not inp.per_point or draw.needs_inputs and inp.x is None)]


def comparison_chart(entry: dict) -> Chart | None:
    """Δ (this version − the baseline) of each compared quantity with its interval, coloured by
    the comparison's verdict: the report's section 8 at a glance. Reads the certificate's
    ``comparison`` entry (:func:`robust_cert.report.comparison.comparison_entry`)."""
    rows = [q for q in entry.get("quantities", []) if q.get("delta_ci")]
    if not rows:
        return None
    colours = {"significantly better": PASS_COLOUR, "significantly worse": FAIL_COLOUR}
    with _style():
        fig = _figure(6.0, 0.6 + 0.38 * len(rows))
        ax = fig.axes[0]
        ys = np.arange(len(rows))[::-1]
        for yv, q in zip(ys, rows, strict=True):
            lo, hi = q["delta_ci"]
            # "better" drawn to the right for every quantity: a failure rate's Δ is flipped
            sign = 1.0 if q.get("higher_is_better", True) else -1.0
            d, a, b = sign * q["delta"], sign * lo, sign * hi
            colour = colours.get(q.get("verdict"), "#555555")
            ax.plot([min(a, b), max(a, b)], [yv, yv], color=colour, linewidth=2)
            ax.plot([d], [yv], marker="o", color=colour, markersize=5)
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks(ys, [q.get("label", q["key"]) for q in rows], fontsize=8)
        span = max(max(abs(q["delta_ci"][0]), abs(q["delta_ci"][1])) for q in rows) or 0.01
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.set_xlabel("Δ (this version − baseline), improvement to the right")
        ax.grid(axis="y", visible=False)
    conf = entry.get("confidence", 0.95)
    return Chart(
        "chart-comparison", "Difference from the baseline",
        to_svg(fig),
        f"Each quantity's difference between this version and the baseline with its "
        f"{_pct(conf)} interval (as in the table), drawn so that an improvement is to the right "
        f"(a failure rate's Δ is flipped). Green: significantly better; red: significantly "
        f"worse (the paired test rejects after Holm's correction and the interval excludes 0); "
        f"grey: no detectable difference.")
