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

# Redis-backed stores (breakers, budgets, rate limits): tests marked ``needs_redis`` are skipped,
# with the reason, when nothing answers at LOADBEAR_TEST_REDIS_URL.
REDIS_URL = os.environ.get("LOADBEAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.3).ping())
    except Exception:
        return False


REDIS_UP = _redis_up()
needs_redis = pytest.mark.skipif(not REDIS_UP, reason=f"needs Redis at {REDIS_URL} (LOADBEAR_TEST_REDIS_URL)")


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


# -- a running loadbear in front of the upstream simulator ------------------------------


def pytest_configure(config):
    if os.environ.get("LOADBEAR_REQUIRE_POSTGRES") and not os.environ.get(PG_ENV):
        raise pytest.UsageError(f"LOADBEAR_REQUIRE_POSTGRES is set but {PG_ENV} is not")


def write_ledger(db: Database, records, dead_letter_dir: Path, *, batch_size: int | None = None,
                 flush_timeout: float = 30) -> None:
    """Write finished interactions through a real ``LedgerWriter`` and wait until they are
    committed; none may be refused."""
    from loadbear.ledger.writer import LedgerWriter

    kw = {} if batch_size is None else {"batch_size": batch_size}
    w = LedgerWriter(db, flush_interval=0.01, dead_letter_path=dead_letter_dir / "dl.jsonl", **kw)
    try:
        for r in records:
            w.submit(r)
        assert w.flush(flush_timeout) and w.dead_lettered == 0
    finally:
        w.close(10)

class Stack:
    """A Gateway + HTTP server on 127.0.0.1 + one tenant and key, against a given catalog."""

    def __init__(self, db_url: str, models: dict, tenant_settings: dict | None = None,
                 admin_key: str = "test-admin-key", **gateway_kwargs) -> None:
        from loadbear import Gateway, Settings
        from loadbear.api.app import create_app
        from loadbear.testing.server import ServerThread

        self.settings = Settings.load(env={}, config_path=None, database_url=db_url, admin_key=admin_key,
                                      models=models, ledger_flush_interval_ms=5)
        from loadbear.config.catalog import Catalog

        catalog = Catalog.from_settings(models, env={}, default_model=gateway_kwargs.pop("default_model", None))
        self.gateway = Gateway(self.settings, catalog=catalog, **gateway_kwargs)
        self.gateway.migrate()
        self.tenant = self.gateway.tenants.create_tenant("acme", "Acme", tenant_settings or {})
        _, self.key = self.gateway.tenants.create_key("acme", "test")
        self.server = ServerThread(create_app(self.gateway)).start()
        self.url = self.server.url
        self.admin_key = admin_key

    def add_tenant(self, slug: str, settings: dict | None = None) -> str:
        self.gateway.tenants.create_tenant(slug, slug, settings or {})
        return self.gateway.tenants.create_key(slug, "test")[1]

    def openai(self, key: str | None = None, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, **kw)

    def async_openai(self, key: str | None = None, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, **kw)

    def rows(self, sql: str = "SELECT * FROM ai_interactions ORDER BY created_at", params=()):
        self.gateway.ledger.flush(10)
        with self.gateway.db.system_tx(write=False) as c:
            return c.fetchall(sql, params)

    def attempts(self, interaction_id: str):
        return self.rows("SELECT * FROM ai_attempts WHERE CAST(interaction_id AS TEXT) = ? ORDER BY attempt_no",
                         (str(interaction_id),))

    def close(self) -> None:
        self.server.stop()
        self.gateway.close()


def sim_models(sim_url: str, **overrides) -> dict:
    """A catalog whose models all point at the simulator: two OpenAI ones, an Anthropic one, local."""
    from loadbear.providers.base import Timeouts  # noqa: F401  (documented shape)

    base = {
        "gpt-4o-mini": {"provider": "openai", "base_url": sim_url + "/v1", "api_key": "sk-sim",
                        "input_price": 0.15, "cached_input_price": 0.075, "output_price": 0.60, "tier": "simple",
                        "fallbacks": ["claude-3-5-haiku-latest", "local"], "max_retries": 1},
        "gpt-4o": {"provider": "openai", "base_url": sim_url + "/v1", "api_key": "sk-sim",
                   "input_price": 2.5, "output_price": 10.0, "tier": "complex",
                   "fallbacks": ["gpt-4o-mini"], "max_retries": 1},
        "claude-3-5-haiku-latest": {"provider": "anthropic", "base_url": sim_url, "api_key": "sk-ant-sim",
                                    "input_price": 0.8, "output_price": 4.0, "tier": "simple",
                                    "fallbacks": ["local"], "max_retries": 1},
    }
    for name, changes in overrides.items():
        base.setdefault(name, {}).update(changes)
    return base


@pytest.fixture
def simulator():
    from loadbear.testing import UpstreamSimulator

    sim = UpstreamSimulator(seed=7).start()
    yield sim
    sim.stop()


@pytest.fixture
def stack_factory(tmp_path, request):
    """Build stacks on SQLite (default) or a given URL; closed at teardown."""
    made: list[Stack] = []

    def make(models: dict, db_url: str | None = None, **kw) -> Stack:
        url = db_url or f"sqlite:///{tmp_path / f'gw{len(made)}.db'}"
        s = Stack(url, models, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def stack(stack_factory, simulator) -> Stack:
    return stack_factory(sim_models(simulator.url))
