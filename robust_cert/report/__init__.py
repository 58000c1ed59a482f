"""Certification reports: HTML now (jinja2), rendered from a certificate alone."""

from robust_cert.report.html import render_html, templates_dir, write_report

__all__ = ["render_html", "templates_dir", "write_report"]
