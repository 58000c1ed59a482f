"""Write the report files (report.html, report.pdf) of a certificate into a directory."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError
from robust_cert.report.html import SignatureCheck, render_html
from robust_cert.report.pdf import PdfUnavailable, check_mode, pdf_engine, render_pdf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote. It stands for the HTML path where a path is expected
    (``str()``, ``os.fspath``, ``Path()``), as ``write_report`` returned that path before
    there was a PDF."""

    html: Path
    pdf: Path | None = None
    #: Why there is no PDF ("off", or the engine's install hint in ``auto`` mode).
    pdf_skipped: str | None = None

    def __fspath__(self) -> str:
        return os.fspath(self.html)

    def __str__(self) -> str:
        return str(self.html)


def _write(path: Path, content: str | bytes) -> None:
    """Write through a temporary name, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".partial")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content, encoding="utf-8")
    tmp.replace(path)


def write_report(cert: Certificate, out_dir: str | Path, pdf: str = "auto", *,
                 verification: SignatureCheck | None = None, data=None) -> ReportFiles:
    """Write ``report.html`` and, unless ``pdf`` is ``off`` or the engine is missing in
    ``auto`` mode, ``report.pdf`` into ``out_dir`` (created if needed).

    ``pdf``: ``required`` fails before writing anything when WeasyPrint or its system
    libraries are missing (the error names the install command); ``auto`` (default) warns and
    writes the HTML alone; ``off`` writes no PDF. ``verification`` and ``data``: see
    :func:`robust_cert.report.html.render_html`.
    """
    check_mode(pdf)
    if pdf == "required":
        pdf_engine()  # fail before anything is written
    out = Path(out_dir)
    started = time.perf_counter()
    html = render_html(cert, verification=verification, data=data)
    html_s = time.perf_counter() - started
    pdf_bytes, skipped = None, None
    if pdf == "off":
        skipped = "off"
    else:
        started = time.perf_counter()
        try:
            pdf_bytes = render_pdf(html, cert)
        except PdfUnavailable as exc:
            if pdf == "required":
                raise
            skipped = str(exc)
            log.warning("report.pdf skipped: %s", exc)
        except Exception as exc:  # a layout bug must not lose the certification's HTML
            if pdf == "required":
                raise RobustCertError(f"rendering report.pdf failed: {type(exc).__name__}: "
                                      f"{exc}") from exc
            skipped = f"rendering failed: {type(exc).__name__}: {exc}"
            log.warning("report.pdf skipped: %s", skipped)
        else:
            log.info("report rendered: HTML %.2f s, PDF %.2f s", html_s,
                     time.perf_counter() - started)
    try:
        out.mkdir(parents=True, exist_ok=True)
        html_path = out / "report.html"
        _write(html_path, html)
        pdf_path = out / "report.pdf"
        if pdf_bytes is not None:
            _write(pdf_path, pdf_bytes)
        else:  # a PDF left from an earlier certificate must not pass for this one's
            pdf_path.unlink(missing_ok=True)
            pdf_path = None
    except OSError as exc:
        raise RobustCertError(f"cannot write the report into {out}: "
                              f"{exc.strerror or exc}") from None
    return ReportFiles(html_path, pdf_path, skipped)
