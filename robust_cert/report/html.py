"""Render a certificate as a self-contained HTML report (jinja2 templates in ``templates/``)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jinja2

from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError

TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"


def templates_dir() -> Path:
    """Where the templates are: inside the installed wheel (``robust_cert/templates``), or the
    repository's top-level ``templates/`` in an editable checkout."""
    package = Path(__file__).resolve().parents[1]
    candidates = [package / "templates", package.parent / "templates"]
    for path in candidates:
        if (path / TEMPLATE).is_file():
            return path
    raise RobustCertError(
        f"report templates not found (looked in {', '.join(map(str, candidates))}); the "
        "installation is incomplete: reinstall robust_cert (pip install --force-reinstall)"
    )


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.2f}%"
    env.filters["num"] = lambda v, d=4: "–" if v is None else f"{v:.{d}g}"
    env.filters["params"] = lambda p: ", ".join(f"{k}={v}" for k, v in p.items()) or "–"
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)
    return env


def render_html(cert: Certificate) -> str:
    """The report for ``cert`` as one HTML document with its stylesheet inlined."""
    css = (templates_dir() / STYLESHEET).read_text(encoding="utf-8")
    body = cert.body
    return _environment().get_template(TEMPLATE).render(
        c=body, digest=cert.digest, signature=cert.signature, css=css,
        report_id=cert.digest[:12],
    )


def write_report(cert: Certificate, out_dir: str | Path) -> Path:
    """Write ``report.html`` into ``out_dir`` (created if needed); return its path."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report.html"
        tmp = path.with_suffix(".html.partial")
        tmp.write_text(render_html(cert), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise RobustCertError(f"cannot write the report into {out}: {exc.strerror}") from None
    return path
