"""The `postgres` session fixture: a real server, separate databases on demand."""

from __future__ import annotations

import pytest


def test_postgres_fixture_serves_separate_databases(postgres):
    import psycopg

    with psycopg.connect(postgres) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]
    assert int(version) >= 150000
    a = postgres.create_database("fixture_a")
    b = postgres.create_database("fixture_b")
    assert a != b
    assert a.endswith("/fixture_a")
    with psycopg.connect(a) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    with psycopg.connect(b) as conn:
        missing = conn.execute("SELECT to_regclass('t')").fetchone()[0]
    assert missing is None
    # re-creating gives an empty database again
    a2 = postgres.create_database("fixture_a")
    with psycopg.connect(a2) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone()[0] is None


def test_postgres_create_database_rejects_unsafe_names(postgres):
    with pytest.raises(ValueError, match="database name"):
        postgres.create_database('x"; DROP DATABASE postgres; --')
