"""The PDF report: the HTML report printed by WeasyPrint as PDF/A-3b, certificate attached.

Why WeasyPrint: it lays out grid, flex, inline SVG, repeated table headers and "Page X of Y"
footers, embeds the fonts, writes PDF/A-3b with attachments, and gives the same bytes for
the same input, so a PDF's hash identifies the certificate it was made from. It needs the
pango and harfbuzz-subset system libraries; without them ``import weasyprint`` raises
OSError rather than ImportError, so both mean "unavailable".

Modes: ``required`` (a compliance run must not silently lose its deliverable: fail, naming
the install command), ``auto`` (warn and go on without a PDF), ``off``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from datetime import datetime, timezone
from typing import cast

from robust_cert.certificate import Certificate
from robust_cert.errors import RobustCertError

PDF_MODES = ("required", "auto", "off")
#: The Debian/Ubuntu packages WeasyPrint loads at import, and the fonts the report names.
SYSTEM_PACKAGES = "libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core"
ATTACHMENT_NAME = "certificate.json"
#: Where the report template lets the PDF say which HTML it was printed from.
REPORT_FILES_MARK = "<!--robust_cert:report-files-->"

log = logging.getLogger(__name__)


class PdfUnavailable(RobustCertError):
    """The PDF engine or its system libraries are missing; the message says how to install."""


def check_mode(mode: str) -> str:
    if mode not in PDF_MODES:
        raise RobustCertError(f"unknown PDF mode {mode!r}: use one of {', '.join(PDF_MODES)}")
    return mode


def pdf_engine():
    """The imported ``weasyprint`` module, or PdfUnavailable with the exact install command."""
    try:
        import weasyprint
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PdfUnavailable(
            f"PDF engine WeasyPrint cannot load its system libraries ({first}); install them "
            f"with: sudo apt-get install -y {SYSTEM_PACKAGES}") from None
    except ImportError as exc:
        raise PdfUnavailable(
            f"PDF engine WeasyPrint is not installed ({exc}); install it with: "
            f"{sys.executable} -m pip install weasyprint") from None
    return weasyprint


def _issued(cert: Certificate) -> datetime:
    """The certificate's issue time: the PDF's only date, so rendering twice gives one hash."""
    try:
        issued = datetime.fromisoformat(cert.body["issued_at"])
    except (KeyError, TypeError, ValueError):
        return datetime(1970, 1, 1, tzinfo=timezone.utc)
    return issued.astimezone(timezone.utc) if issued.tzinfo else issued


def printed_from(html: str) -> str:
    """``html`` as the PDF prints it: the integrity section names the SHA-256 of the HTML
    (UTF-8, as ``report.html`` is written), the one hash a file can state about its sibling."""
    sha = hashlib.sha256(html.encode("utf-8")).hexdigest()
    return html.replace(REPORT_FILES_MARK, (
        '<dt>Printed from</dt><dd><code>report.html</code> with SHA-256 '
        f'<span class="hash" id="report-html-sha256">{sha}</span></dd>'), 1)


def render_pdf(html: str, cert: Certificate) -> bytes:
    """``html`` (the report of ``cert``) as PDF/A-3b bytes with the certificate JSON attached,
    stating the SHA-256 of ``html`` (:func:`printed_from`).

    Deterministic: the document dates are the certificate's issue time (from the HTML's
    ``dcterms.created`` and the attachment's dates), the file identifier is a hash of the
    content, and the fonts are the system's DejaVu fonts subset the same way each time.
    Raises PdfUnavailable when WeasyPrint cannot be imported.
    """
    issued = _issued(cert)
    return pdf_a3b(printed_from(html), attachment=cert.to_json(), name=ATTACHMENT_NAME,
                   description=f"robust_cert certificate {cert.digest} (canonical JSON)",
                   dated=issued)


def pdf_a3b(html: str, *, attachment: str, name: str, description: str,
            dated: datetime) -> bytes:
    """``html`` as PDF/A-3b bytes with ``attachment`` embedded as ``name`` (relationship
    Source) and ``dated`` as the attachment's only date. Raises PdfUnavailable without
    WeasyPrint. Shared by the certification and comparison reports."""
    weasyprint = pdf_engine()
    embedded = weasyprint.Attachment(string=attachment, name=name, relationship="Source",
                                     description=description, created=dated, modified=dated)
    # Its progress lines and notes on CSS it ignores (screen-only rules) are not the user's.
    loggers = [logging.getLogger(n) for n in ("weasyprint", "weasyprint.progress")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return cast(bytes, weasyprint.HTML(string=html, base_url=None).write_pdf(  # (no target)
            pdf_variant="pdf/a-3b", attachments=[embedded]))
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
