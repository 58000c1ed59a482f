"""Certification reports: HTML (jinja2, inline SVG charts) and PDF/A-3b (WeasyPrint),
rendered from a certificate alone."""

from robust_cert.report.files import ReportFiles, write_report
from robust_cert.report.html import render_html, templates_dir
from robust_cert.report.pdf import PDF_MODES, PdfUnavailable, render_pdf

__all__ = ["PDF_MODES", "PdfUnavailable", "ReportFiles", "render_html", "render_pdf",
           "templates_dir", "write_report"]
