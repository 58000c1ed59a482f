"""A real, throwaway PostgreSQL server for the tests (PostgreSQL 15's initdb / pg_ctl).

`PostgresServer.start(tmpdir)` runs ``initdb`` (trust authentication, loopback only) and
``pg_ctl start`` on a free port with its unix socket directory inside ``tmpdir``; ``stop()`` shuts
it down (fast mode) and is safe to call twice. When the tests run as root, the server commands run
as the ``postgres`` system user (PostgreSQL refuses to run as root) via ``runuser``.

`find_bin_dir()` looks for the binaries in ``$ROBUST_CERT_PG_BIN``, on ``PATH`` (e.g.
/usr/local/bin) and under /usr/lib/postgresql/*/bin; `unavailable_reason()` says, in one sentence,
why a server cannot be started here (``None`` when it can) so that tests skip with that reason.

The conftest exposes this as the session fixture ``postgres``: the URL of the default database
(``postgresql://postgres@127.0.0.1:PORT/postgres``) that also carries ``create_database(name)``
returning the URL of a new, empty database, so that each test (or each store) gets its own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "postgres"


def find_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None when PostgreSQL is absent."""
    candidates: list[Path] = []
    if os.environ.get("ROBUST_CERT_PG_BIN"):
        candidates.append(Path(os.environ["ROBUST_CERT_PG_BIN"]))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(os.path.realpath(initdb)).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _run_as() -> list[str]:
    """Command prefix to run the server binaries: as the postgres user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", PG_USER, "--"]


def unavailable_reason() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return ("the psycopg (3) driver is not installed: pip install 'robust_cert[postgres]' "
                "(or the dev extra)")
    if find_bin_dir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or "
                "under /usr/lib/postgresql/*/bin; install Debian's `postgresql` package "
                "(.ci/system-packages does as root) or set ROBUST_CERT_PG_BIN")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing (PostgreSQL refuses to run as root)"
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no `{PG_USER}` user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running PostgreSQL cluster in a temporary directory, reachable on 127.0.0.1:port."""

    def __init__(self, root: Path, bin_dir: Path, port: int):
        self.root = root
        self.bin_dir = bin_dir
        self.port = port
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.log = root / "postgres.log"
        self._running = False
        self._owns_root = False

    @property
    def url(self) -> str:
        """URL of the default `postgres` database (superuser, trust authentication)."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{name}"

    @classmethod
    def start(cls, root: Path | None = None, timeout: float = 60.0) -> PostgresServer:
        """initdb + pg_ctl start in `root` (default: a new directory under the system temp dir,
        removed again by `stop()`); waits until the server accepts connections."""
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot start PostgreSQL: {reason}")
        owns_root = root is None
        # a short path of its own: the postgres user must be able to reach it (pytest's tmp dirs
        # are 0700 root) and unix socket paths are limited to ~107 characters
        root = Path(tempfile.mkdtemp(prefix="robust-cert-pg-")) if root is None else Path(root)
        root.mkdir(parents=True, exist_ok=True)
        server = cls(root, find_bin_dir(), _free_port())  # type: ignore[arg-type]
        server._owns_root = owns_root
        server.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            for p in (root, server.sockets):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        try:
            server._initdb()
            server._pg_ctl_start(timeout)
        except BaseException:
            try:
                server.stop()
            except (RuntimeError, subprocess.SubprocessError):
                pass  # the start error below says what went wrong
            raise
        return server

    def _cmd(self, exe: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        cmd = [*_run_as(), str(self.bin_dir / exe), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, env={**os.environ, "LC_ALL": "C.UTF-8"})
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{exe} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                               f"{proc.stdout}\n{proc.stderr}\n{log[-4000:]}")
        return proc

    def _initdb(self) -> None:
        self._cmd("initdb", "-D", str(self.data), "-A", "trust", "-U", PG_USER,
                  "-E", "UTF8", "--no-sync", "--locale=C.UTF-8")

    def _pg_ctl_start(self, timeout: float) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories={self.sockets} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._running = True  # from here on stop() must try to shut it down
        self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on port {self.port} did not accept "
                                       f"connections within {timeout:.0f}s: {exc}\n"
                                       f"{self.log.read_text()[-4000:]}") from exc
                time.sleep(0.2)

    def create_database(self, name: str) -> str:
        """Create an empty database `name` (lower-case letters, digits, _) and return its URL.

        Calling it again with the same name drops and re-creates the database."""
        import re

        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory if `start` created it."""
        try:
            if self._running:
                self._running = False
                self._cmd("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        finally:
            if self._owns_root:
                shutil.rmtree(self.root, ignore_errors=True)


class PostgresURL(str):
    """The server URL (a str, so it can be used directly) with `create_database(name)`."""

    server: PostgresServer

    def __new__(cls, server: PostgresServer) -> PostgresURL:
        obj = super().__new__(cls, server.url)
        obj.server = server
        return obj

    def create_database(self, name: str) -> str:
        return self.server.create_database(name)

    @property
    def port(self) -> int:
        return self.server.port
