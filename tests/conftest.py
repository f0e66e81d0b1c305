"""Shared fixtures: real databases on both backends.

PostgreSQL tests need ``LOADBEAR_TEST_POSTGRES_URL`` (a server URL, e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``). Each test run creates a throwaway template
database, migrates it once, and clones it for every test that asks for a fresh database, so
tests are isolated and fast. Without the variable those tests are skipped with the reason;
CI always sets it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate

PG_ENV = "LOADBEAR_TEST_POSTGRES_URL"
PG_SKIP = f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/postgres)"


def _with_db(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class PgServer:
    """Creates throwaway databases on the test server and drops them at the end of the run."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.admin = psycopg.connect(url, autocommit=True)
        self.run_id = uuid.uuid4().hex[:8]
        self.created: list[str] = []
        self.template: str | None = None

    def create(self, template: str | None = None) -> str:
        name = f"loadbear_test_{self.run_id}_{len(self.created)}"
        tmpl = f" TEMPLATE {template}" if template else ""
        self.admin.execute(f"CREATE DATABASE {name}{tmpl}")
        self.created.append(name)
        return name

    def migrated_template(self) -> str:
        if self.template is None:
            name = self.create()
            db = open_database(_with_db(self.url, name))
            try:
                migrate(db)
            finally:
                db.close()
            self.template = name
        return self.template

    def fresh_url(self, migrated: bool = True) -> str:
        name = self.create(self.migrated_template() if migrated else None)
        return _with_db(self.url, name)

    def close(self) -> None:
        for name in reversed(self.created):
            try:
                self.admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception:
                pass
        self.admin.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(PG_SKIP)
    server = PgServer(url)
    yield server
    server.close()


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'loadbear.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request) -> str:
    """A URL of a fresh, migrated database of the parametrised backend."""
    if backend == "sqlite":
        url = _sqlite_url(tmp_path)
        db = open_database(url)
        migrate(db)
        db.close()
        return url
    server: PgServer = request.getfixturevalue("pg_server")
    return server.fresh_url()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.close()


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path, request) -> str:
    """A URL of a fresh database with no migrations applied."""
    if backend == "sqlite":
        return _sqlite_url(tmp_path)
    server: PgServer = request.getfixturevalue("pg_server")
    return server.fresh_url(migrated=False)
