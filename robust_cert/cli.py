"""robust-cert: certify registered models, render reports, run the demo.

Exit codes: 0 PASS, 1 FAIL, 3 INCONCLUSIVE, 2 error (bad input, unreachable server, ...).
verify: 0 verified, 1 not verified. promote: 0 promoted, 1 refused by the registry.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
EXIT_ERROR = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random draw (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default $ROBUST_CERT_THREADS or 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robust-cert",
        description="Certify classifiers for robustness with statistical guarantees, "
                    "inside the MLflow model registry.",
        epilog="Exit codes: 0 PASS, 1 FAIL, 3 INCONCLUSIVE, 2 error.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "certify", help="certify a registered model version and log it to MLflow",
        description="Run the policy's metric suite on models:/NAME/VERSION (or @ALIAS), log a "
                    "certification run, the certificate and the report, and tag the version.")
    p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--policy", required=True, help="policy YAML (see examples/policies/)")
    p.add_argument("--data", default="digits",
                   help="evaluation data: 'digits' (built-in) or an .npz with x and y "
                        "(default: digits)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or "
                        "MLflow's default)")
    p.add_argument("--out", default=None,
                   help="directory for report.html and certificate.json "
                        "(default: robust_cert_reports/NAME-vVERSION)")
    p.add_argument("--gradient-twin", default=None, metavar="models:/NAME/VERSION",
                   help="for a model without gradients (ONNX): the PyTorch version it was "
                        "exported from; gradient metrics craft attacks on it after a logit "
                        "parity check on the data, and predictions stay on the model")
    _common(p)

    p = sub.add_parser(
        "verify", help="check a certificate's signature, or a registered version's",
        description="Verify certificate.json (digest and signature) or models:/NAME/VERSION "
                    "(the signed tag names the version and its artifacts still match). Needs "
                    "the signing key ($ROBUST_CERT_SIGNING_KEY or $ROBUST_CERT_SIGNING_KEY_FILE).")
    p.add_argument("target", help="certificate.json or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")

    p = sub.add_parser(
        "promote", help="certify a version if needed, then ask the server to set an alias",
        description="If the version has no certificate the key verifies, certify it with "
                    "--policy; then request the alias. The server's gate decides.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number")
    p.add_argument("--alias", default="production", help="alias to set (default: production)")
    p.add_argument("--policy", default=None, help="policy YAML, used if certification is needed")
    p.add_argument("--data", default="digits", help="evaluation data (default: digits)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--out", default=None, help="report directory if certification runs")
    _common(p)

    p = sub.add_parser("policy", help="validate a policy file and print its canonical hash")
    p.add_argument("path", help="policy YAML")

    p = sub.add_parser(
        "report", help="re-render the HTML and PDF report from a certificate JSON",
        description="Writes report.html and report.pdf (PDF/A-3b, certificate attached) from "
                    "certificate.json alone. The signature is checked with the signing key "
                    "($ROBUST_CERT_SIGNING_KEY or $ROBUST_CERT_SIGNING_KEY_FILE); a certificate "
                    "that does not verify (or is unsigned, or no key is set) is rendered with "
                    "a NOT VERIFIED banner, or refused with --strict.")
    p.add_argument("certificate", help="certificate.json written by certify")
    p.add_argument("--out", default=".", help="output directory (default: .)")
    p.add_argument("--pdf", choices=("required", "auto", "off"), default="auto",
                   help="required: fail if the PDF engine is missing; auto (default): warn "
                        "and write the HTML alone; off: no PDF")
    p.add_argument("--strict", action="store_true",
                   help="refuse a certificate whose signature does not verify")

    p = sub.add_parser(
        "demo", help="train, register and certify two digits CNNs in a local MLflow store",
        description="Trains a standard and an adversarially trained CNN on the built-in digits, "
                    "registers them as versions 1 and 2, exports version 2 to ONNX as "
                    "version 3, and certifies all three (version 3 with version 2 as its "
                    "gradient twin).")
    p.add_argument("--workdir", default="demo_out",
                   help="where the sqlite store, artifacts and reports go (default: demo_out)")
    p.add_argument("--policy", default="examples/policies/digits.yaml",
                   help="policy YAML (default: examples/policies/digits.yaml)")
    p.add_argument("--tracking-uri", default=None,
                   help="use this MLflow server instead of a local sqlite store")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    _common(p)

    p = sub.add_parser(
        "serve", help="receive MLflow webhooks and certify new versions automatically",
        description="Listens for MLflow registry webhooks (model_version.created, and alias "
                    "events for --certify-on-alias), verifies their signature, queues one "
                    "certification per (version, policy) in a durable sqlite queue and runs "
                    "them. Needs ROBUST_CERT_WEBHOOK_SECRET and a signing key.")
    p.add_argument("--policy", required=True, help="policy YAML every version is certified with")
    p.add_argument("--data", default="digits", help="evaluation data (default: digits)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--queue", default="robust_cert_jobs.db",
                   help="sqlite job queue (default robust_cert_jobs.db)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--certify-on-alias", default=None,
                   help="also certify when this alias is set on a version (e.g. candidate)")
    p.add_argument("--out", default="robust_cert_reports", help="report directory root")
    p.add_argument("--register", metavar="PUBLIC_URL", default=None,
                   help="create the webhook on the MLflow server, pointing at PUBLIC_URL "
                        "(e.g. http://certifier.internal:8765/webhook), then serve")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")

    p = sub.add_parser(
        "compare", help="compare certified versions: exact McNemar tests on paired outcomes",
        description="Loads each version's certification (certificate and per-point results), "
                    "compares every version with the baseline on each shared quantity "
                    "(exact McNemar test, Holm across quantities, paired deltas with CIs), "
                    "prints the verdicts and logs a comparison run.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--versions", nargs="+", default=None,
                   help="versions to compare (default: every certified version)")
    p.add_argument("--baseline", default=None,
                   help="baseline version (default: @production if compared, else the lowest)")
    p.add_argument("--confidence", type=float, default=0.95, help="family-wise (default 0.95)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--out", default=None, help="directory for comparison.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from robust_cert.errors import RobustCertError

    try:
        return _dispatch(args, argv)
    except RobustCertError as exc:
        print(f"robust-cert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except FileExistsError as exc:
        print(f"robust-cert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("robust-cert: interrupted; nothing was certified", file=sys.stderr)
        return EXIT_ERROR


def _dispatch(args, argv) -> int:
    command_line = "robust-cert " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.command == "policy":
        from robust_cert.policy import load_policy

        pol = load_policy(args.path)
        print(f"{args.path}: valid policy {pol.name!r} (version {pol.version}), "
              f"{len(pol.metrics)} metrics, {len(pol.requirements)} requirements")
        print(f"sha256 {pol.sha256}")
        return 0
    if args.command == "report":
        from robust_cert.certificate import Certificate
        from robust_cert.errors import RobustCertError
        from robust_cert.mlflow_plugin.promotion import Verification, verify_certificate_file
        from robust_cert.report import write_report
        from robust_cert.signing import Keyring, SigningKeyError

        cert = Certificate.load(args.certificate)
        try:
            check = verify_certificate_file(cert, Keyring.from_env())
        except SigningKeyError as exc:
            check = Verification(False, f"cannot check the signature: {exc}")
        if args.strict and not check.ok:
            raise RobustCertError(f"{args.certificate}: NOT VERIFIED ({check.message}); "
                                  "refused by --strict, nothing written")
        files = write_report(cert, args.out, pdf=args.pdf, verification=check)
        print(files.html)
        if files.pdf is not None:  # else write_report has logged why (auto mode)
            print(files.pdf)
        if not check.ok:
            print(f"robust-cert: warning: NOT VERIFIED: {check.message}", file=sys.stderr)
        return 0
    if getattr(args, "threads", None) is not None:
        os.environ["ROBUST_CERT_THREADS"] = str(args.threads)
    if args.command == "certify":
        from robust_cert.mlflow_plugin.tracking import certify_version

        res = certify_version(
            args.model, args.policy, args.data, tracking_uri=args.tracking_uri,
            out_dir=args.out, device=args.device, seed=args.seed, threads=args.threads,
            progress=not args.no_progress, command=command_line,
            gradient_twin=args.gradient_twin)
        _print_certification(args.model, res)
        return EXIT[res.certificate.verdict]
    if args.command == "demo":
        return _demo(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "promote":
        return _promote(args, command_line)
    raise AssertionError(args.command)


def _client(tracking_uri: str | None):
    from robust_cert.mlflow_plugin.tracking import connect

    return connect(tracking_uri)


def _serve(args) -> int:
    import threading

    from robust_cert.mlflow_plugin.webhooks import (
        SECRET_ENV,
        make_http_server,
        make_receiver,
        register_webhook,
    )

    if args.tracking_uri:
        _client(args.tracking_uri)
    receiver = make_receiver(args.policy, args.queue, data=args.data,
                             certify_on_alias=args.certify_on_alias,
                             tracking_uri=args.tracking_uri, out_dir=Path(args.out),
                             seed=args.seed)
    if args.register:
        hook = register_webhook(args.register, os.environ[SECRET_ENV],
                                certify_on_alias=args.certify_on_alias)
        print(f"registered webhook {hook} -> {args.register}")
    server = make_http_server(receiver, args.host, args.port)
    worker = threading.Thread(target=receiver.work_forever, name="certifier", daemon=True)
    worker.start()
    print(f"robust-cert serve: listening on http://{args.host}:{server.server_port}/webhook "
          f"(health: /health), policy {receiver.policy.name!r}, queue {args.queue}"
          + (f", {receiver.queue.recovered} interrupted job(s) re-queued"
             if receiver.queue.recovered else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        server.server_close()
        worker.join(timeout=5)
    return 0


def _compare(args) -> int:
    from robust_cert.mlflow_plugin.compare import compare_versions

    report = compare_versions(_client(args.tracking_uri), args.name, args.versions,
                              args.baseline, confidence=args.confidence, out_dir=args.out)
    print(f"{args.name}: versions {', '.join(report.versions)}, "
          f"{report.confidence:.0%} family-wise (Holm), exact McNemar")
    for c in report.comparisons:
        print(f"\nv{c.candidate} vs v{c.baseline}:")
        for q in c.quantities:
            print(f"  {q.key:<36} {q.rate_a:.4f} -> {q.rate_b:.4f}  "
                  f"delta {q.delta:+.4f} [{q.delta_ci[0]:+.4f}, {q.delta_ci[1]:+.4f}]  "
                  f"p={q.p_value:.3g}  {q.verdict}")
    print(f"\ncomparison: {report.html_path}, {report.path}"
          + (f"  (mlflow run {report.run_id})" if report.run_id else ""))
    return 0


def _verify(args) -> int:
    from robust_cert.signing import Keyring

    keyring = Keyring.from_env()
    if args.target.startswith("models:/"):
        from robust_cert.mlflow_plugin.models import parse_model_uri
        from robust_cert.mlflow_plugin.promotion import verify_version

        name, version, alias = parse_model_uri(args.target)
        client = _client(args.tracking_uri)
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        res = verify_version(client, name, str(version), keyring)
    else:
        from robust_cert.certificate import Certificate
        from robust_cert.mlflow_plugin.promotion import verify_certificate_file

        res = verify_certificate_file(Certificate.load(args.target), keyring)
    print(f"{args.target}: {'VERIFIED' if res.ok else 'NOT VERIFIED'}: {res.message}")
    return 0 if res.ok else 1


def _promote(args, command_line: str) -> int:
    from robust_cert.errors import PolicyError
    from robust_cert.mlflow_plugin.promotion import (
        PromotionRefused,
        has_current_certificate,
        request_alias,
    )
    from robust_cert.mlflow_plugin.tracking import certify_version, signing_keyring

    client = _client(args.tracking_uri)
    keyring = signing_keyring()
    if not has_current_certificate(client, args.name, args.version, keyring):
        if not args.policy:
            raise PolicyError(f"{args.name} v{args.version} has no current certificate; pass "
                              "--policy to certify it before promotion")
        res = certify_version(
            f"models:/{args.name}/{args.version}", args.policy, args.data, out_dir=args.out,
            device=args.device, seed=args.seed, threads=args.threads,
            progress=not args.no_progress, command=command_line)
        _print_certification(f"models:/{args.name}/{args.version}", res)
    try:
        request_alias(client, args.name, args.version, args.alias)
    except PromotionRefused as exc:
        print(f"refused by the registry: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name} v{args.version} is now @{args.alias}")
    return 0


def _print_certification(label: str, res) -> None:
    cert = res.certificate
    print(f"{label}: {cert.verdict}")
    for r in cert.requirements:
        est = "n/a" if r["estimate"] is None else f"{r['estimate']:.4f}"
        op = ">=" if r["direction"] == "at_least" else "<="
        print(f"  {r['verdict']:<12} {r['id']:<40} {est} (need {op} {r['threshold']:g})")
    print(f"  report:      {res.report_path}")
    print(f"  certificate: {res.certificate_path}")
    print(f"  mlflow run:  {res.run_id}")


def _demo(args) -> int:
    from robust_cert.mlflow_plugin.demo import MODEL_NAME, run_demo

    if not Path(args.policy).is_file():
        from robust_cert.errors import PolicyError

        raise PolicyError(f"policy file not found: {args.policy} (run the demo from the "
                          "repository root, or pass --policy)")
    versions = run_demo(args.workdir, args.policy, tracking_uri=args.tracking_uri,
                        epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    print(f"\nrobust_cert demo: {MODEL_NAME}, policy {args.policy}\n")
    first_policy = versions[0].certification.certificate.body["policy"]["name"]
    for v in versions:
        body = v.certification.certificate.body
        label = v.label
        if body["policy"]["name"] != first_policy:
            label += f"; policy {body['policy']['name']}"
        _print_certification(f"version {v.version} ({label})", v.certification)
        twin = body["model"].get("gradient_twin")
        if twin:  # the ONNX version: attacks were crafted on its PyTorch twin
            print(f"  parity:      {twin['agreement']} predictions agree with the gradient twin "
                  f"{twin['uri']}, max |Δ logit| {twin['max_abs_logit_diff']:.1e}")
        print()
    store = args.tracking_uri or f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}"
    key_file = os.environ.get("ROBUST_CERT_SIGNING_KEY_FILE", "")
    if key_file.startswith(str(Path(args.workdir).resolve())):
        print(f"Certificates are signed with a throw-away demo key: {key_file}")
    if not args.tracking_uri:
        print(f"Open the MLflow UI:  mlflow ui --backend-store-uri {store}")
        print("then Experiments > digits-demo > Models to compare the versions side by side.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
