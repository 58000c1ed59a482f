"""robust-cert: certify registered models, render reports, run the demo.

Exit codes: 0 PASS, 1 FAIL, 3 INCONCLUSIVE, 2 error (bad input, unreachable server, ...).
verify: 0 verified PASS, 1 not verified, 4 verified but its verdict is FAIL or INCONCLUSIVE.
promote: 0 promoted, 1 refused (by the registry, or locally for a version that did not PASS),
2 also for an ungated registry. doctor: 0 gated, 1 not gated. keygen, plan, schema: 0 done.

Each subcommand's parser names its handler (``set_defaults(func=…)``); a handler takes the
parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

from robust_cert.verdicts import Verdict

if TYPE_CHECKING:  # the commands import what they use
    from robust_cert.policy import Policy

EXIT = {Verdict.PASS: 0, Verdict.FAIL: 1, Verdict.INCONCLUSIVE: 3}
EXIT_ERROR = 2
#: ``verify``: the signature is valid, the certified verdict is not PASS
VERIFIED_NOT_PASS = 4


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random draw (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default $ROBUST_CERT_THREADS or 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


#: --data's help: the sources robust_cert.sources registers, inferred from the reference
DATA_HELP = ("evaluation data: 'digits' (built-in), an .npz with x and y, a .csv or .parquet "
             "table (every column but the label is a feature), a folder of PNG/JPEG images "
             "with one subfolder per class, a factory package.module:function returning a "
             "map-style torch Dataset, or (MLflow) a run's artifact runs:/RUN_ID/PATH or "
             "logged dataset dataset:RUN_ID/NAME[@DIGEST]; the source follows from the suffix "
             "or folder")


def _data_options(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument("--data", default=default,
                   help=DATA_HELP + (f" (default: {default})" if default else ""))
    _source_options(p)


def _source_options(p: argparse.ArgumentParser) -> None:
    """The options a data source takes, beside a --data the command defines itself."""
    p.add_argument("--label", default=None, metavar="COLUMN",
                   help="a table's label column (default: label)")
    p.add_argument("--image-size", default=None, metavar="H,W",
                   help="an image folder's image size: every image is resized to it "
                        "(default: all images must have the first one's size)")
    p.add_argument("--image-mode", choices=("L", "RGB"), default=None,
                   help="an image folder's colour mode (default: the first image's, L for "
                        "one band, else RGB)")


def _data(args):
    """--data with its options, as robust_cert.sources reads it (a DataSpec when options are
    given, else the reference itself)."""
    from robust_cert.errors import DataError
    from robust_cert.sources import DataSpec

    size = None
    if args.image_size is not None:
        try:
            size = tuple(int(v) for v in args.image_size.replace("x", ",").split(","))
        except ValueError:
            size = ()
        if len(size) != 2:
            raise DataError(f"--image-size {args.image_size!r}: give H,W, e.g. 64,64")
    spec = DataSpec(args.data, label=args.label, image_size=size, mode=args.image_mode)
    return spec if spec.options else args.data


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
                    "certification run, the certificate and the report, and tag the version. "
                    "On several processes: torchrun --nproc-per-node N -m robust_cert certify "
                    "... (add --nnodes/--rdzv-endpoint for several machines) shards the points; "
                    "rank 0 writes everything, and the certificate is the same as on one "
                    "process.")
    p.set_defaults(func=_certify)
    p.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--policy", required=True, help="policy YAML (see examples/policies/)")
    _data_options(p)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or "
                        "MLflow's default)")
    p.add_argument("--out", default=None,
                   help="directory for report.html and certificate.json "
                        "(default: robust_cert_reports/NAME-vVERSION)")
    p.add_argument("--unsigned", action="store_true",
                   help="without a signing key, allow replacing the version's signed "
                        "certificate by an unsigned one (which the registry gate refuses)")
    p.add_argument("--gradient-twin", default=None, metavar="models:/NAME/VERSION",
                   help="for a model without gradients (ONNX): the PyTorch version it was "
                        "exported from; gradient metrics craft attacks on it after a logit "
                        "parity check on the data, and predictions stay on the model")
    p.add_argument("--oracle", default=None, metavar="models:/NAME/VERSION",
                   help="the reference model O of the policy's invariant-kind metrics "
                        "(safe_radius property invariant), replacing their oracle: results "
                        "are invariance with respect to O")
    p.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=None,
                   help="print the cost estimate (robust-cert plan) before running, and show "
                        "the progress bar in estimated seconds (default: on when stderr is a "
                        "terminal)")
    _common(p)

    p = sub.add_parser(
        "verify", help="check a certificate's signature, or a registered version's",
        description="Verify certificate.json (digest and Ed25519 signature), manifest.json "
                    "(signature, and the SHA-256 of every file it lists beside it: certificate "
                    "and reports) or models:/NAME/VERSION | models:/NAME@ALIAS (the signed tag "
                    "names the version and its artifacts still match). Needs the certifier's "
                    "public key(s) ($ROBUST_CERT_PUBLIC_KEYS) or its signing key.")
    p.set_defaults(func=_verify)
    p.add_argument("target", help="certificate.json, manifest.json or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")

    p = sub.add_parser(
        "keygen", help="make an Ed25519 key pair for signing certificates",
        description="Writes DIR/signing-KID.key (the certifier's private key, mode 0600: set "
                    "ROBUST_CERT_SIGNING_KEY_FILE to it on certifiers only) and "
                    "DIR/public-KID.pem (for the MLflow server's gate and for verify: "
                    "ROBUST_CERT_PUBLIC_KEYS, a PEM file or a directory of them). KID is the "
                    "key id certificates name. Never overwrites a file.")
    p.set_defaults(func=_keygen)
    p.add_argument("dir", help="directory for the two key files (created if missing)")

    p = sub.add_parser(
        "doctor", help="check from the outside that a server's registry is gated",
        description="Creates a probe registered model and version with no certificate, "
                    "expects the robust_cert gate to refuse (PERMISSION_DENIED) a protected "
                    "alias, an unsigned certificate tag and the prompt marker on it, then "
                    "deletes the probe (needs the right to create and delete registered "
                    "models). Exit 0 when gated, 1 when not, 2 on errors.")
    p.set_defaults(func=_doctor)
    p.add_argument("tracking_uri", metavar="TRACKING_URI", help="the MLflow server, e.g. "
                   "http://mlflow.internal:5000")
    p.add_argument("--alias", default="production",
                   help="the protected alias to probe (default: production)")
    p.add_argument("--routes", default=None, metavar="ROUTES.yaml",
                   help="the routes file the server was started with ($ROBUST_CERT_ROUTES): "
                        "print its digest (compare it with the server's log) and, with "
                        "--model, the rule a model falls under")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="with --routes: the registered model whose rule to print")

    p = sub.add_parser(
        "routes", help="validate a routes file and explain which rule applies to a model",
        description="Validates a routes file (which policy, evaluation data and gate each "
                    "registered model gets; see docs/deployment.md): every policy it names is "
                    "loaded, every data file must exist and match its pin. Prints the file's "
                    "SHA-256 and its rules, warns about rules no model can reach and, with "
                    "--model, says which rule applies to that model and why. With "
                    "--tracking-uri, also warns about globs that match no registered model. "
                    "Exit 0 when valid, 2 otherwise.")
    p.set_defaults(func=_routes)
    p.add_argument("path", help="routes YAML")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a registered model name: print the rule that applies and why")
    p.add_argument("--tracking-uri", default=None,
                   help="an MLflow registry: warn about globs that match none of its models")

    p = sub.add_parser(
        "promote", help="certify a version if needed, then ask the server to set an alias",
        description="First checks that the server's registry is gated for the alias (as "
                    "robust-cert doctor does) and refuses an ungated one. If the version has no "
                    "certificate the key verifies, certify it with --policy; a version that did "
                    "not PASS is not promoted. Then request the alias: the server's gate decides.")
    p.set_defaults(func=_promote)
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number")
    p.add_argument("--alias", default="production", help="alias to set (default: production)")
    p.add_argument("--policy", default=None, help="policy YAML, used if certification is needed")
    p.add_argument("--data", default="digits", help="evaluation data (default: digits)")
    _source_options(p)
    p.add_argument("--routes", default=None, metavar="ROUTES.yaml",
                   help="take the policy and data from the model's rule in this routes file "
                        "(default: $ROBUST_CERT_ROUTES when set); an exempt model is promoted "
                        "without certification")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--out", default=None, help="report directory if certification runs")
    p.add_argument("--no-gate-check", action="store_true",
                   help="skip the check that the registry is gated (UNSAFE: an ungated "
                        "registry promotes anything; prints a warning)")
    _common(p)

    p = sub.add_parser(
        "plan", help="estimate a certification's cost before running it",
        description="Measures the model's forward and forward+gradient throughput on the chosen "
                    "device, runs every metric of the policy on a few points (the pilot) "
                    "counting the images through the model, and extrapolates to the whole "
                    "evaluation set: images, minutes and memory per metric, and the total. An "
                    "estimate, not a bound. A policy's time_budget_s makes certify do this "
                    "first and refuse a run estimated over budget.")
    p.set_defaults(func=_plan)
    p.add_argument("policy", help="policy YAML")
    p.add_argument("--model", required=True,
                   help="models:/NAME/VERSION (or @ALIAS) or an .onnx file")
    _data_options(p)
    p.add_argument("--gradient-twin", default=None, help="for an ONNX model: its PyTorch twin")
    p.add_argument("--oracle", default=None,
                   help="the reference model of the policy's invariant-kind metrics")
    p.add_argument("--pilot-points", type=int, default=8,
                   help="points each metric runs on in the pilot (default 8)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    _common(p)

    p = sub.add_parser(
        "policy", help="validate a policy file and print its canonical hash",
        description="Validates a certification policy (YAML: name, confidence, input_range, "
                    "metrics with their parameters, requirements) without running anything, "
                    "and prints its SHA-256: the hash of the validated canonical JSON with "
                    "defaults filled in, which certificates record and the registry gate's "
                    "allow-list names. Exit 0 when valid, 2 with the offending key otherwise. "
                    "Examples: examples/policies/*.yaml.")
    p.set_defaults(func=_policy)
    p.add_argument("path", help="policy YAML")

    p = sub.add_parser(
        "report", help="re-render the HTML and PDF report from a certificate JSON",
        description="Writes report.html and report.pdf (PDF/A-3b, certificate attached) from "
                    "certificate.json alone. The signature is checked with the certifier's public "
                    "key(s) ($ROBUST_CERT_PUBLIC_KEYS) or its signing key; a certificate "
                    "that does not verify (or is unsigned, or no key is set) is rendered with "
                    "a NOT VERIFIED banner, or refused with --strict.")
    p.set_defaults(func=_report)
    p.add_argument("certificate", help="certificate.json written by certify")
    p.add_argument("--out", default=".", help="output directory (default: .)")
    p.add_argument("--pdf", choices=("required", "auto", "off"), default="auto",
                   help="required: fail if the PDF engine is missing; auto (default): warn "
                        "and write the HTML alone; off: no PDF")
    p.add_argument("--strict", action="store_true",
                   help="refuse a certificate whose signature does not verify")
    p.add_argument("--data", default=None,
                   help="the evaluation data it was certified on (any --data of certify): with "
                        "--per-point, restores the figures drawn from the inputs (most "
                        "vulnerable examples), which the certificate alone does not hold; "
                        "refused unless its SHA-256 matches the certificate's")
    _source_options(p)
    p.add_argument("--per-point", default=None, metavar="per_point.npz",
                   help="the run's per-point results (the certification run's per_point.npz "
                        "artifact; default: per_point.npz beside the certificate, if present)")

    p = sub.add_parser(
        "schema", help="print the JSON Schema of certificate.json files",
        description="Prints the JSON Schema (draft 2020-12) that every certificate.json "
                    "written by certify matches: the certified body (model, data, policy, "
                    "environment, sanity checks, results, requirements, verdict), its digest "
                    "and the signature block. Auditors can validate certificates against it "
                    "without robust_cert; docs/certificate.schema.json holds a copy.")
    p.set_defaults(func=_schema)

    p = sub.add_parser(
        "demo", help="train, register and certify two digits CNNs in a local MLflow store",
        description="Trains a standard and an adversarially trained CNN on the built-in digits, "
                    "registers them as versions 1 and 2, exports version 2 to ONNX as "
                    "version 3, and certifies all three (version 3 with version 2 as its "
                    "gradient twin).")
    p.set_defaults(func=_demo)
    p.add_argument("--workdir", default="demo_out",
                   help="where the sqlite store, artifacts and reports go (default: demo_out)")
    p.add_argument("--policy", default=None,
                   help="policy YAML (default: the example digits.yaml shipped with "
                        "robust_cert, examples/policies/ in the repository)")
    p.add_argument("--tracking-uri", default=None,
                   help="use this MLflow server instead of a local sqlite store")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    _common(p)

    p = sub.add_parser(
        "serve", help="receive MLflow webhooks and certify new versions automatically",
        description="Listens for MLflow registry webhooks (model_version.created, and alias "
                    "events for --certify-on-alias), verifies their signature, queues one "
                    "certification per version identity (name, version, creation time, "
                    "policy) in a durable queue (sqlite, or PostgreSQL shared by several "
                    "workers) and runs them; a reconciliation loop queues every watched "
                    "version without a current certificate, so no version is lost to a missed "
                    "webhook or an outage. Needs ROBUST_CERT_WEBHOOK_SECRET and a signing key.")
    p.set_defaults(func=_serve)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="policy YAML every version is certified with")
    which.add_argument("--routes", metavar="ROUTES.yaml",
                       help="a routes file: each model's rule names its policy, data and "
                            "gradient twin; exempt models and models no rule matches are not "
                            "certified; a changed policy or data file re-certifies the versions "
                            "of its rule (read at start: restart to apply a changed file)")
    p.add_argument("--data", default="digits",
                   help="evaluation data with --policy (default: digits)")
    _source_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--queue-url", "--queue", dest="queue", default="robust_cert_jobs.db",
                   metavar="URL",
                   help="job queue: a sqlite file (default robust_cert_jobs.db; one process) or "
                        "postgresql://USER:PASSWORD@HOST:5432/DB (shared by many workers; "
                        "pip install 'robust_cert[postgres]')")
    p.add_argument("--reconcile-every", type=float, default=300.0, metavar="SECONDS",
                   help="list the watched models' versions this often and queue every version "
                        "without a current certificate (default 300; 0: never)")
    p.add_argument("--watch", action="append", default=[], metavar="MODEL",
                   help="registered model to reconcile (repeat; default: all models)")
    p.add_argument("--lease", type=float, default=300.0, metavar="SECONDS",
                   help="a job whose worker stops renewing its lease for this long is taken "
                        "by another worker (default 300)")
    p.add_argument("--worker-only", action="store_true",
                   help="no HTTP receiver: only certify queued jobs (and reconcile), e.g. on "
                        "extra GPU machines sharing a PostgreSQL queue")
    p.add_argument("--limit-concurrency", type=int, default=64,
                   help="most simultaneous HTTP connections; beyond it 503 (default 64)")
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
    p.set_defaults(func=_compare)
    p.add_argument("name", help="registered model name")
    p.add_argument("--versions", nargs="+", default=None,
                   help="versions to compare (default: every certified version)")
    p.add_argument("--baseline", default=None,
                   help="baseline version (default: @production if compared, else the lowest)")
    p.add_argument("--confidence", type=float, default=0.95, help="family-wise (default 0.95)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI")
    p.add_argument("--out", default=None, help="directory for comparison.json")
    return parser


_EXIT_HOOK: list[bool] = []


def skip_final_collection() -> None:
    """Make the interpreter's exit skip its last garbage collection (once per process):
    ``gc.freeze()`` in an exit handler, registered first so that it runs after every other
    one (MLflow's flushes included). That collection walks every object still alive — the
    module graphs of torch, MLflow and scipy — only to free memory the operating system takes
    back anyway; it cost 1.6–2.6 s of each process's exit on a loaded machine (0.5 s with the
    freeze; bench/bench_shard.py's workers do the same). Everything a command writes is
    closed before it returns, and exit handlers (``weakref.finalize``, temporary
    directories) still run; only ``__del__`` of objects left in reference cycles is skipped,
    as it may be at any exit."""
    if _EXIT_HOOK:
        return
    import atexit
    import gc

    atexit.register(gc.freeze)
    _EXIT_HOOK.append(True)


def main(argv: list[str] | None = None) -> int:
    skip_final_collection()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from robust_cert.errors import RobustCertError

    if not sys.stderr.isatty():  # MLflow's download bars would fill logs and CI output
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return _dispatch(args, argv)
    except RobustCertError as exc:
        return _error(str(exc))
    except (FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt as exc:  # a certification's says what it left as it was
        what = str(exc) if getattr(exc, "described", False) else "nothing was certified"
        print(f"robust-cert: interrupted: {what}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        mlflow_exceptions = sys.modules.get("mlflow.exceptions")
        if mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException):
            # an MLflow refusal we did not anticipate (missing alias, permissions, ...)
            logging.getLogger(__name__).debug("MLflow error", exc_info=True)
            # (exc is an MlflowException: found through sys.modules, not narrowed)
            return _error(f"MLflow: {exc.message.splitlines()[0] if exc.message else exc}")  # pyright: ignore[reportAttributeAccessIssue]
        raise
    finally:
        if "WORLD_SIZE" in os.environ:  # leave the process group of a torchrun launch
            from robust_cert.distributed import shutdown

            shutdown()


def _error(message: str) -> int:
    print(f"robust-cert: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _dispatch(args, argv) -> int:
    """Run the subcommand's handler (``set_defaults(func=…)`` in :func:`build_parser`)."""
    args.command_line = "robust-cert " + shlex.join(sys.argv[1:] if argv is None else argv)
    if getattr(args, "threads", None) is not None:
        os.environ["ROBUST_CERT_THREADS"] = str(args.threads)
    return args.func(args)


def _policy(args) -> int:
    from robust_cert.policy import load_policy

    pol = load_policy(args.path)
    print(f"{args.path}: valid policy {pol.name!r} (version {pol.version}), "
          f"{len(pol.metrics)} metrics, {len(pol.requirements)} requirements")
    print(f"sha256 {pol.sha256}")
    return 0


def _schema(args) -> int:
    print(schema_text(), end="")
    return 0


def schema_text() -> str:
    """What ``robust-cert schema`` prints: the JSON Schema of certificate.json, indented, with
    a final newline (``docs/certificate.schema.json`` holds the same text)."""
    import json

    from robust_cert.schema import certificate_json_schema

    return json.dumps(certificate_json_schema(), indent=2, ensure_ascii=False) + "\n"


def _report(args) -> int:
    from robust_cert.certificate import Certificate
    from robust_cert.errors import RobustCertError
    from robust_cert.report import write_report
    from robust_cert.signing import Keyring, SigningKeyError
    from robust_cert.verification import Verification, verify_certificate_file

    cert = Certificate.load(args.certificate)
    try:
        check = verify_certificate_file(cert, Keyring.from_env())
    except SigningKeyError as exc:
        check = Verification(False, f"cannot check the signature: {exc}")
    if args.strict and not check.ok:
        raise RobustCertError(f"{args.certificate}: NOT VERIFIED ({check.message}); "
                              "refused by --strict, nothing written")
    per_point = Path(args.per_point or Path(args.certificate).with_name("per_point.npz"))
    if per_point.is_file():
        import numpy as np

        with np.load(per_point) as arrays:
            cert.per_point = {k: arrays[k] for k in arrays.files}
    elif args.per_point:
        raise RobustCertError(f"--per-point {args.per_point}: file not found")
    data = None
    if args.data is not None:
        from robust_cert.data import load_data

        # render_html refuses data whose SHA-256 is not the certified data's
        data = load_data(_data(args), input_range=tuple(cert.body["data"]["input_range"]))
    files = write_report(cert, args.out, pdf=args.pdf, verification=check, data=data)
    print(files.html)
    if files.pdf is not None:  # else write_report has logged why (auto mode)
        print(files.pdf)
    if not check.ok:
        print(f"robust-cert: warning: NOT VERIFIED: {check.message}", file=sys.stderr)
    return 0


def _certify(args) -> int:
    from robust_cert.mlflow_plugin.tracking import certify_version

    policy = args.policy
    if args.oracle:
        from robust_cert.policy import with_oracle

        policy = with_oracle(policy, args.oracle)
    res = certify_version(
        args.model, policy, _data(args), tracking_uri=args.tracking_uri,
        out_dir=args.out, device=args.device, seed=args.seed, threads=args.threads,
        progress=not args.no_progress, command=args.command_line,
        gradient_twin=args.gradient_twin, allow_unsigned=args.unsigned,
        announce=_announce if (sys.stderr.isatty() if args.estimate is None
                               else args.estimate) else None)
    if res is None:  # a non-zero rank of a torchrun launch: rank 0 reports
        return 0
    _print_certification(args.model, res)
    return EXIT[res.certificate.verdict]


def _announce(estimate) -> None:
    print(f"estimated cost (pilot run):\n{estimate.table()}", file=sys.stderr, flush=True)


def _client(tracking_uri: str | None):
    from robust_cert.mlflow_plugin.client import connect

    return connect(tracking_uri)


def _serve(args) -> int:
    import threading

    from robust_cert.mlflow_plugin.webhooks import (
        SECRET_ENV,
        WebhookServer,
        make_receiver,
        register_webhook,
    )

    if args.tracking_uri:
        _client(args.tracking_uri)
    if not args.worker_only:
        _check_port_free(args.host, args.port)  # before the queue file or anything exists
    if args.register and not os.environ.get(SECRET_ENV):
        from robust_cert.errors import RobustCertError

        raise RobustCertError(f"--register needs the webhook secret in ${SECRET_ENV} (the "
                              "receiver verifies MLflow's signature with it)")
    # the queue first (a locked or unreachable queue must not leave a registered webhook
    # behind), then the webhook (a refused URL must not leave a new queue file behind)
    local = "://" not in str(args.queue)
    fresh = local and not Path(args.queue).exists()
    receiver = make_receiver(args.policy, args.queue, routes_path=args.routes, data=_data(args),
                             certify_on_alias=args.certify_on_alias,
                             tracking_uri=args.tracking_uri, out_dir=Path(args.out),
                             seed=args.seed, lease_s=args.lease, receive=not args.worker_only,
                             reconcile_every_s=args.reconcile_every, watch=tuple(args.watch))
    if args.register:
        try:
            hook = register_webhook(args.register, os.environ[SECRET_ENV],
                                    certify_on_alias=args.certify_on_alias)
        except Exception as exc:
            receiver.queue.close()
            if fresh:
                for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
                    Path(f"{args.queue}{suffix}").unlink(missing_ok=True)
            raise _webhook_refused(args.register, exc) from exc
        print(f"registered webhook {hook} -> {args.register}")
    threads = [threading.Thread(target=receiver.work_forever, name="certifier", daemon=True)]
    if args.reconcile_every > 0:
        threads.append(threading.Thread(target=receiver.reconcile_forever, name="reconcile",
                                        daemon=True))
    queue = receiver.queue.describe() + (f", {receiver.queue.recovered} interrupted job(s) "
                                         "re-queued" if receiver.queue.recovered else "")
    reconcile = (f"reconcile every {args.reconcile_every:g} s" if args.reconcile_every > 0
                 else "no reconciliation")
    # (a receiver without routes has its one policy: Receiver.__post_init__)
    certifies = (f"policy {cast('Policy', receiver.policy).name!r}" if receiver.routes is None else
                 f"routes {receiver.routes.path} (sha256 {receiver.routes.digest[:12]}…)")
    for warning in receiver.routes.warnings if receiver.routes is not None else ():
        print(f"robust-cert: warning: {warning}", file=sys.stderr)
    server = None
    try:
        for t in threads:
            t.start()
        if args.worker_only:
            print(f"robust-cert serve: worker {receiver.worker_id}, {certifies}, queue "
                  f"{queue}, {reconcile}", flush=True)
            threads[0].join()  # until Ctrl-C
        else:
            server = WebhookServer(receiver, args.host, args.port,
                                   limit_concurrency=args.limit_concurrency)
            print(f"robust-cert serve: listening on http://{args.host}:{args.port}/webhook "
                  f"(health: /health), {certifies}, queue {queue}, {reconcile}", flush=True)
            server.run()  # until SIGINT/SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        for t in threads:
            t.join(timeout=5)
        receiver.queue.close()
    return 0


def _plan(args) -> int:
    import json

    from robust_cert import devices
    from robust_cert.data import check_fits, load_data
    from robust_cert.loaders import load_model
    from robust_cert.plan import plan
    from robust_cert.policy import load_policy

    pol = load_policy(args.policy)
    if args.oracle:
        from robust_cert.policy import with_oracle

        pol = with_oracle(pol, args.oracle)
    devices.configure_threads(args.threads)
    if args.model.startswith("models:/") or args.tracking_uri:
        _client(args.tracking_uri)
    data = load_data(_data(args), input_range=pol.data_range)
    model = load_model(args.model, input_shape=data.input_shape, device=args.device)
    check_fits(data, model.input_shape, model.num_classes)
    from robust_cert.api import feature_threat, refuse_white_box
    from robust_cert.models.blackbox import check_columns

    check_columns(model, data.details.get("features"), data.source)
    threat = feature_threat(pol, data)
    twin = None
    if args.gradient_twin:
        from robust_cert.models.twin import with_gradient_twin

        twin = load_model(args.gradient_twin, input_shape=data.input_shape, device=args.device)
        if not model.differentiable:
            model, _ = with_gradient_twin(model, twin, data.x, batch_size=pol.batch_size)
    refuse_white_box(pol, model)
    if threat is not None:  # the metrics run on encoded inputs, as certify runs them
        model, data = threat.wrap(model), threat.encode(data)
        twin = threat.wrap(twin) if twin is not None else None
    estimate = plan(model, data, pol, seed=args.seed, pilot_points=args.pilot_points,
                    gradient_twin=twin)
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


def _check_port_free(host: str, port: int) -> None:
    """One line, before anything is created, when ``serve`` cannot listen on host:port."""
    import socket

    from robust_cert.errors import RobustCertError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RobustCertError(f"cannot listen on {host}:{port}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            raise RobustCertError(f"cannot listen on {host}:{port}: {exc.strerror} (is another "
                                  "robust-cert serve running? choose another --port)") from exc


def _webhook_refused(url: str, exc: Exception):
    """The MLflow server's refusal of a webhook URL, with the server-side settings that allow
    it (they belong to the MLflow server's environment, not to this process)."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    from robust_cert.errors import RobustCertError

    message = (getattr(exc, "message", None) or str(exc)).splitlines()[0].rstrip(".")
    parts = urlsplit(url)
    hints = []
    if parts.scheme == "http":
        hints.append("MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https")
    try:
        address = ipaddress.ip_address(socket.gethostbyname(parts.hostname or ""))
        if address.is_private or address.is_loopback or address.is_link_local:
            hints.append("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true")
    except (OSError, ValueError):
        pass
    fix = (f"; to allow it, start the MLflow server with {' and '.join(hints)} in its "
           "environment (see docs/deployment.md), or give an https:// public URL"
           if hints else "")
    return RobustCertError(f"the MLflow server refused the webhook {url}: {message}{fix}")


def _compare(args) -> int:
    from robust_cert.mlflow_plugin.compare import compare_versions

    report = compare_versions(_client(args.tracking_uri), args.name, args.versions,
                              args.baseline, confidence=args.confidence, out_dir=args.out)
    print(f"{args.name}: versions {', '.join(report.versions)}, "
          f"{report.confidence:.0%} family-wise (Holm), exact McNemar")
    flipped = {"significantly better": "significantly worse",
               "significantly worse": "significantly better"}
    for c in report.comparisons:
        # always read old -> new: the verdict and delta are for the newer version
        old, new = sorted((c.baseline, c.candidate), key=int)
        swap = old != c.baseline
        print(f"\nv{old} -> v{new}" + (f" (baseline v{c.baseline})" if swap else "") + ":")
        for q in c.quantities:
            a, b, d = (q.rate_b, q.rate_a, -q.delta) if swap else (q.rate_a, q.rate_b, q.delta)
            lo, hi = (-q.delta_ci[1], -q.delta_ci[0]) if swap else q.delta_ci
            verdict = flipped.get(q.verdict, q.verdict) if swap else q.verdict
            print(f"  {q.key:<36} {a:.4f} -> {b:.4f}  delta {d:+.4f} [{lo:+.4f}, {hi:+.4f}]  "
                  f"p={q.p_value:.3g}  v{new} {verdict}")
            if getattr(q, "note", ""):
                print(f"  {'':<36} note: {q.note}")
    print(f"\ncomparison: {report.html_path}, {report.path}"
          + (f"  (mlflow run {report.run_id})" if report.run_id else ""))
    return 0


def _verify(args) -> int:
    from robust_cert.signing import Keyring

    keyring = Keyring.from_env()
    if args.target.startswith("models:/"):
        from robust_cert.mlflow_plugin.promotion import verify_version
        from robust_cert.mlflow_plugin.registry import parse_model_uri

        name, version, alias = parse_model_uri(args.target)
        client = _client(args.tracking_uri)
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        res = verify_version(client, name, str(version), keyring)
    elif _is_manifest(args.target):
        from robust_cert.verification import verify_manifest_file

        res = verify_manifest_file(args.target, keyring)
    else:
        from robust_cert.certificate import Certificate
        from robust_cert.verification import verify_certificate_file

        res = verify_certificate_file(Certificate.load(args.target), keyring)
    print(f"{args.target}: {'VERIFIED' if res.ok else 'NOT VERIFIED'}: {res.message}")
    if not res.ok:
        return 1
    # a validly signed FAIL is genuine, but it is not a licence to deploy: `verify && deploy`
    # (a manifest vouches for its files' integrity; it names no verdict)
    verdict = (res.claim or {}).get("verdict")
    return 0 if verdict in (None, Verdict.PASS) else VERIFIED_NOT_PASS


def _is_manifest(path: str) -> bool:
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "manifest" in doc


def _keygen(args) -> int:
    from robust_cert.signing import Keyring, generate_private_key_pem, public_pem

    pem = generate_private_key_pem()
    keyring = Keyring.from_private_pem(pem)
    kid = keyring.signing_kid
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"signing-{kid}.key", out / f"public-{kid}.pem"
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    assert keyring.private is not None  # from_private_pem: a certifier's keyring
    with public_path.open("x") as f:
        f.write(public_pem(keyring.private.public_key()))
    print(f"key id {kid}")
    print(f"private key (certifiers only): {private_path}")
    print(f"public key (gate, verify):     {public_path}")
    print(f"  certifier:     export ROBUST_CERT_SIGNING_KEY_FILE={shlex.quote(str(private_path))}")
    print(f"  mlflow server: export ROBUST_CERT_PUBLIC_KEYS={shlex.quote(str(public_path))}")
    return 0


def _gate_check(client, alias: str, url: str) -> bool:
    from robust_cert.mlflow_plugin.promotion import check_gated

    result = check_gated(client, alias)
    print(f"{url}: registry {'GATED' if result.ok else 'NOT GATED'} for alias {alias!r}")
    print(result.summary())
    return result.ok


def _doctor(args) -> int:
    if args.model and not args.routes:
        from robust_cert.errors import RobustCertError

        raise RobustCertError("--model needs --routes (the routes file the server uses)")
    if args.routes:
        from robust_cert.routes import describe_route, load_routes

        routes = load_routes(args.routes, check_data=False)
        print(f"routes {routes.path}: sha256 {routes.digest}")
        if args.model:
            print(describe_route(routes, args.model))
    client = _client(args.tracking_uri)
    return 0 if _gate_check(client, args.alias, args.tracking_uri) else 1


def _routes(args) -> int:
    from robust_cert.routes import describe_route, load_routes

    routes = load_routes(args.path)
    print(routes.describe())
    for warning in routes.warnings:
        print(f"robust-cert: warning: {warning}", file=sys.stderr)
    if args.tracking_uri:
        client = _client(args.tracking_uri)
        names = [m.name for m in client.search_registered_models()]
        import fnmatch

        for i, rule in enumerate(routes.document.routes, start=1):
            if not any(fnmatch.fnmatchcase(n, rule.match) for n in names):
                print(f"robust-cert: warning: rule {i} ({rule.match!r}) matches none of the "
                      f"{len(names)} registered models", file=sys.stderr)
    if args.model:
        print(describe_route(routes, args.model))
    return 0


def _promote(args) -> int:
    import mlflow

    from robust_cert.errors import PolicyError
    from robust_cert.mlflow_plugin.promotion import (
        PromotionRefused,
        has_current_certificate,
        request_alias,
        verify_version,
    )
    from robust_cert.mlflow_plugin.tracking import certify_version, signing_keyring
    from robust_cert.signing import Keyring, SigningKeyError

    client = _client(args.tracking_uri)
    url = mlflow.get_registry_uri()
    if args.no_gate_check:
        print(f"robust-cert: WARNING: --no-gate-check: not checking that {url} is gated; an "
              "ungated registry promotes uncertified and failed versions", file=sys.stderr)
    elif not _gate_check(client, args.alias, url):
        return _error(f"refusing to promote through {url}: its registry does not gate alias "
                      f"{args.alias!r} (start mlflow server with --registry-store-uri "
                      "robustcert+sqlite:// or robustcert+postgresql://, and make the alias "
                      "protected; see docs/deployment.md), or pass --no-gate-check")
    policy, data, twin, policy_sha256 = args.policy, _data(args), None, None
    routes_file = args.routes or os.environ.get("ROBUST_CERT_ROUTES")
    if routes_file:  # the model's rule decides the policy and data
        from robust_cert.routes import load_routes

        route = load_routes(routes_file).route_for(args.name)
        if route.gate == "exempt":
            print(f"{args.name} is exempt ({route.label} of {routes_file}): promoting without "
                  "certification")
            return _request(client, args, PromotionRefused, request_alias)
        if route.rule is not None:
            if args.policy:
                raise PolicyError(f"--policy conflicts with {route.label} of {routes_file}, "
                                  "which names the policy: drop one")
            policy, data = str(route.policies[0].path), route.data_spec
            policy_sha256 = route.policies[0].sha256
            twin = route.gradient_twin(args.version)
    keyring = signing_keyring()
    if not has_current_certificate(client, args.name, args.version, keyring,
                                   policy_sha256=policy_sha256):
        if not policy:
            raise PolicyError(f"{args.name} v{args.version} has no current certificate; pass "
                              "--policy to certify it before promotion")
        res = certify_version(
            f"models:/{args.name}/{args.version}", policy, data, out_dir=args.out,
            device=args.device, seed=args.seed, threads=args.threads,
            progress=not args.no_progress, command=args.command_line, gradient_twin=twin)
        _print_certification(f"models:/{args.name}/{args.version}", res)
    try:
        checker = keyring or Keyring.from_env()
    except SigningKeyError:
        checker = None  # no key here: the server's gate alone decides
    local = checker and verify_version(client, args.name, args.version, checker,
                                       check_artifacts=False)
    if local and not (local.ok and local.claim and local.claim["verdict"] == Verdict.PASS):
        # the server decides, but never ask it to promote what is known not to pass
        print(f"not promoting {args.name} v{args.version}: "
              + (f"verdict {local.claim['verdict']}" if local.claim else local.message),
              file=sys.stderr)
        return 1
    return _request(client, args, PromotionRefused, request_alias)


def _request(client, args, refused, request_alias) -> int:
    """Ask the server to set the alias; its gate decides."""
    try:
        request_alias(client, args.name, args.version, args.alias)
    except refused as exc:
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
        if r["verdict"] != Verdict.PASS and r.get("reason"):
            print(f"{'':16}{r['reason']}")
    for s in cert.body.get("sanity", {}).get("checks", []):
        if s.get("state") == "failed":
            how = {"compensated": f"compensated by {s.get('compensated_by')}",
                   "waived": f"WAIVED by the policy: {s.get('waiver')}"}.get(s.get("action"), "")
            print(f"  sanity check {s['check']} FAILED" + (f" ({how})" if how else ""))
    print(f"  report:      {res.report_path}")
    print(f"  certificate: {res.certificate_path}")
    print(f"  mlflow run:  {res.run_id}")


def _demo(args) -> int:
    from robust_cert.mlflow_plugin.demo import MODEL_NAME, run_demo

    if args.policy is None:  # the example shipped in the wheel: the demo runs from anywhere
        from robust_cert.policy import example_policy

        found = example_policy("digits.yaml")
        here = Path.cwd()  # shown (and recorded as the command) relative when it is here
        args.policy = str(found.relative_to(here) if found.is_relative_to(here) else found)
    elif not Path(args.policy).is_file():
        from robust_cert.errors import PolicyError

        raise PolicyError(f"policy file not found: {args.policy}")
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
    from robust_cert.signing import KEY_FILE_ENV

    store = args.tracking_uri or f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}"
    key_file = os.environ.get(KEY_FILE_ENV, "")
    demo_key = key_file.startswith(str(Path(args.workdir).resolve()))
    if demo_key:
        print(f"Certificates are signed with a throw-away demo key: {key_file}")
    print("\nTo use the demo's store (and key) with the CLI, run in this shell:")
    print(f"  export MLFLOW_TRACKING_URI={shlex.quote(store)}")
    if demo_key:
        print(f"  export {KEY_FILE_ENV}={shlex.quote(key_file)}")
    print(f"then e.g.  robust-cert certify models:/{MODEL_NAME}/1 --policy {args.policy}")
    print(f"           robust-cert compare {MODEL_NAME} --versions 1 2")
    if not args.tracking_uri:
        print(f"\nOpen the MLflow UI:  mlflow ui --backend-store-uri {shlex.quote(store)}")
        print("then Experiments > digits-demo > Models to compare the versions side by side.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
