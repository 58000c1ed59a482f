"""Render a version comparison (``robust-cert compare``) as one HTML page."""

from __future__ import annotations

from pathlib import Path

from robust_cert.errors import RobustCertError
from robust_cert.report.html import STYLESHEET, _environment, templates_dir

TEMPLATE = "comparison.html.j2"


def render_comparison_html(comparison: dict) -> str:
    """HTML for the dict of :meth:`ComparisonReport.to_dict` (deterministic for the same dict)."""
    css = (templates_dir() / STYLESHEET).read_text(encoding="utf-8")
    return _environment().get_template(TEMPLATE).render(r=comparison, css=css)


def write_comparison_html(comparison: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "comparison.html"
        tmp = path.with_suffix(".html.partial")
        tmp.write_text(render_comparison_html(comparison), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise RobustCertError(f"cannot write the comparison report into {out}: "
                              f"{exc.strerror}") from None
    return path
