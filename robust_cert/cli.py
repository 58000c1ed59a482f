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

    p = sub.add_parser("report", help="re-render the HTML report from a certificate JSON")
    p.add_argument("certificate", help="certificate.json written by certify")
    p.add_argument("--out", default=".", help="output directory (default: .)")

    p = sub.add_parser(
        "demo", help="train, register and certify two digits CNNs in a local MLflow store",
        description="Trains a standard and an adversarially trained CNN on the built-in digits, "
                    "registers them as versions 1 and 2, and certifies both.")
    p.add_argument("--workdir", default="demo_out",
                   help="where the sqlite store, artifacts and reports go (default: demo_out)")
    p.add_argument("--policy", default="examples/policies/digits.yaml",
                   help="policy YAML (default: examples/policies/digits.yaml)")
    p.add_argument("--tracking-uri", default=None,
                   help="use this MLflow server instead of a local sqlite store")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    _common(p)
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
        from robust_cert.report import write_report

        cert = Certificate.load(args.certificate)
        print(write_report(cert, args.out))
        return 0
    if getattr(args, "threads", None) is not None:
        os.environ["ROBUST_CERT_THREADS"] = str(args.threads)
    if args.command == "certify":
        from robust_cert.mlflow_plugin.tracking import certify_version

        res = certify_version(
            args.model, args.policy, args.data, tracking_uri=args.tracking_uri,
            out_dir=args.out, device=args.device, seed=args.seed, threads=args.threads,
            progress=not args.no_progress, command=command_line)
        _print_certification(args.model, res)
        return EXIT[res.certificate.verdict]
    if args.command == "demo":
        return _demo(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "promote":
        return _promote(args, command_line)
    raise AssertionError(args.command)


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow.tracking import MlflowClient

    from robust_cert.mlflow_plugin.tracking import check_server

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    check_server(mlflow.get_tracking_uri())
    return MlflowClient()


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
    for v in versions:
        _print_certification(f"version {v.version} ({v.training} training)", v.certification)
        print()
    store = args.tracking_uri or f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}"
    if not args.tracking_uri:
        print(f"Open the MLflow UI:  mlflow ui --backend-store-uri {store}")
        print("then Experiments > digits-demo > Models to compare the versions side by side.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
