"""The ``robust-cert`` process (``robust_cert.cli.run``): it exits without the interpreter's
teardown, yet delivers all its output, runs the atexit handlers, waits for its threads and
keeps every exit code; and it imports a certification's modules in one settled stretch."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from robust_cert import cli
from tests.conftest import REPO


def _robust_cert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robust_cert", *args], capture_output=True,
                          text=True, cwd=REPO, check=False)


def test_the_whole_output_arrives_and_exit_codes_are_kept(tmp_path):
    """stdout (block-buffered into a pipe) arrives whole, flushed before the process ends;
    success, errors (2, one line) and argparse's own exits keep their codes."""
    proc = _robust_cert("schema")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == cli.schema_text()
    missing = _robust_cert("policy", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("robust-cert: error:")
    assert len(missing.stderr.strip().splitlines()) == 1
    assert _robust_cert("--help").returncode == 0
    assert _robust_cert("no-such-command").returncode == 2


def test_atexit_handlers_and_threads_finish_before_the_process_ends(tmp_path):
    """What the interpreter's normal exit does and its users rely on still happens: a
    non-daemon thread is waited for, atexit handlers run (after the threads), and a message
    given to SystemExit is printed with exit code 1."""
    code = f"""
import atexit, pathlib, sys, threading, time
out = pathlib.Path({str(tmp_path)!r})
def late():
    time.sleep(0.5)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
from robust_cert import cli
cli.main = lambda argv=None: sys.exit("a message")
cli.run()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "a message"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"


def test_imports_are_settled_only_in_the_own_process():
    """In a caller of main() (this test run) the collector is left alone; in the robust-cert
    process the block runs without it and what it imported is frozen, the collector on
    again afterwards — also when the block raises."""
    frozen = gc.get_freeze_count()
    with cli._imports_settled():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    code = """
import gc, json
from robust_cert import cli
cli._OWN_PROCESS = True
with cli._imports_settled():
    inside = gc.isenabled()
    import robust_cert.policy  # noqa: F401
try:
    with cli._imports_settled():
        raise ValueError
except ValueError:
    pass
print(json.dumps([inside, gc.isenabled(), gc.get_freeze_count()]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    inside, after, count = json.loads(out.splitlines()[-1])
    assert inside is False
    assert after is True
    assert count > 10_000  # the modules imported so far: pydantic, numpy, yaml, ...


def test_a_database_uri_imports_its_stores_up_front():
    """import_store_modules imports what connecting to a database URI will import (the
    SQLAlchemy tracking and registry stores), and nothing of the kind for an HTTP server."""
    code = """
import json, sys
from robust_cert.mlflow_plugin.client import import_store_modules
import_store_modules("http://127.0.0.1:1")
http = "mlflow.store.tracking.sqlalchemy_store" in sys.modules
import_store_modules("sqlite:///never-created.db")
print(json.dumps([http, "mlflow.store.tracking.sqlalchemy_store" in sys.modules,
                  "mlflow.store.model_registry.sqlalchemy_store" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [False, True, True]
    assert not (REPO / "never-created.db").exists()
