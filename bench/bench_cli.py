"""Start-up cost of the command line: ``robust-cert certify`` of an accuracy-only policy and
``robust-cert report CERT --pdf off``, against importing torch and mlflow, in the same run:

    .venv/bin/python bench/bench_cli.py [--reps 3] [--profile]

Set-up (not timed): a temporary sqlite MLflow store holding the digits CNN (trained for a few
epochs, logged and registered as the demo does it, ``models:/digits-cnn/1``), a signing key
(``robust-cert keygen``) and a policy with ``accuracy`` alone. Then, each the fastest of
``--reps`` runs, interleaved so that load from other processes hits all alike:

* ``python -c "import torch, mlflow"``: the floor of any command that loads a PyTorch model
  from MLflow (the baseline);
* ``python -m robust_cert certify models:/digits-cnn/1 --policy accuracy-only.yaml``: model
  download and hashing, data, the sanity probes, the certification, the signed certificate,
  the MLflow run with its artifacts and registry tags, the HTML and (``--pdf auto``) PDF
  report. Target (issue 24): ≤ 1.8× the baseline;
* ``python -m robust_cert report CERT --pdf off``: the HTML report of the certificate just
  written. Target: ≤ 0.4× the baseline (it imports neither torch nor mlflow).

``--profile`` prints, for one more certify run, the slowest imports (``-X importtime``) and the
hottest functions (cProfile). Exit 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import finish, load_average, row

ROOT = Path(__file__).resolve().parents[1]
CERTIFY_TARGET = 1.8
REPORT_TARGET = 0.4
POLICY = """name: accuracy-only
version: "1.0"
confidence: 0.95
metrics:
  accuracy: {}
requirements:
  - metric: accuracy
    at_least: 0.5
"""


def setup(work: Path, env: dict[str, str]) -> None:
    """Train, log and register the digits CNN in the store of ``env`` (in a child process, so
    that this process stays light), and make a signing key."""
    code = (
        "import mlflow\n"
        "from robust_cert.digits_cnn import train_digits_cnn\n"
        "from robust_cert.mlflow_plugin.demo import register\n"
        "exp = mlflow.create_experiment('bench-cli')\n"
        "print(register(train_digits_cnn(epochs=3, seed=0), training='standard', fmt='pickle', "
        "experiment_id=exp))\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "robust_cert", "keygen", str(work / "keys")], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    env["ROBUST_CERT_SIGNING_KEY_FILE"] = str(next((work / "keys").glob("signing-*.key")))
    env["ROBUST_CERT_PUBLIC_KEYS"] = str(next((work / "keys").glob("public-*.pem")))
    (work / "accuracy-only.yaml").write_text(POLICY)


def run(cmd: list[str], env: dict[str, str], ok=(0,), log: list[str] | None = None) -> float:
    """Seconds of wall time ``cmd`` took (its output appended to ``log``); its output is shown
    when its exit status is not in ``ok``, and the bench stops."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    seconds = time.perf_counter() - t
    if log is not None:
        log.append(proc.stdout)
    if proc.returncode not in ok:
        print(proc.stdout)
        raise SystemExit(f"bench_cli: {' '.join(cmd)} exited {proc.returncode}")
    return seconds


def profile(work: Path, env: dict[str, str], certify: list[str]) -> None:
    """The slowest imports and the hottest functions of one certify run."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *certify[1:]], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), name.rstrip()))
    top = [(us, name) for us, name in rows if not name.startswith("  ")]  # top-level imports
    print("slowest top-level imports of certify (cumulative ms):")
    for us, name in sorted(top, reverse=True)[:15]:
        print(f"  {us / 1e3:8.0f}  {name.strip()}")
    stats = work / "certify.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), *certify[1:]], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    import pstats

    pstats.Stats(str(stats)).strip_dirs().sort_stats("cumulative").print_stats(40)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of each command (default 3)")
    parser.add_argument("--profile", action="store_true",
                        help="also print certify's slowest imports and hottest functions")
    args = parser.parse_args()
    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "ROBUST_CERT_THREADS": "1"}
        setup(work, env)
        py = sys.executable
        imports = [py, "-c", "import torch, mlflow"]
        out = work / "report"
        certify = [py, "-m", "robust_cert", "-v", "certify", "models:/digits-cnn/1", "--policy",
                   str(work / "accuracy-only.yaml"), "--out", str(out), "--no-progress"]
        report = [py, "-m", "robust_cert", "report", str(out / "certificate.json"), "--out",
                  str(work / "report-again"), "--pdf", "off"]
        run(certify, env, ok=(0, 1, 3))  # warms the file cache; writes the certificate
        own = [py, "-c", "import robust_cert.cli, robust_cert.mlflow_plugin.tracking"]
        best = {k: float("inf") for k in ("imports", "certify", "report", "own", "html", "pdf")}
        for _ in range(args.reps):
            best["imports"] = min(best["imports"], run(imports, env))
            log: list[str] = []
            best["certify"] = min(best["certify"], run(certify, env, ok=(0, 1, 3), log=log))
            best["report"] = min(best["report"], run(report, env))
            best["own"] = min(best["own"], run(own, env))
            found = re.search(r"report rendered: HTML ([0-9.]+) s, PDF ([0-9.]+) s", log[0])
            if found:
                best["html"] = min(best["html"], float(found[1]))
                best["pdf"] = min(best["pdf"], float(found[2]))
        base = best["imports"]
        row("python -c 'import torch, mlflow'", f"{base:.2f} s (best of {args.reps})")
        row("certify, accuracy-only policy (signed, MLflow run, HTML + PDF auto)",
            f"{best['certify']:.2f} s = {best['certify'] / base:.2f}× the imports",
            f"≤ {CERTIFY_TARGET:g}×", best["certify"] <= CERTIFY_TARGET * base)
        row("  of which: certify's imports (robust_cert.cli, mlflow_plugin.tracking)",
            f"{best['own']:.2f} s = {best['own'] / base:.2f}× the imports")
        if best["pdf"] < float("inf"):
            row("  of which: report.html, report.pdf (layout, PDF/A; WeasyPrint is imported "
                "up front with certify's other modules)",
                f"{best['html']:.2f} s, {best['pdf']:.2f} s")
        row("report CERT --pdf off", f"{best['report']:.2f} s = {best['report'] / base:.2f}× "
            "the imports", f"≤ {REPORT_TARGET:g}×", best["report"] <= REPORT_TARGET * base)
        if args.profile:
            profile(work, env, certify)
    return finish(f"bench_cli: best of {args.reps} runs each; load average at the start {load0}, "
                  f"at the end {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
