"""Tenants, settings and API keys on both backends."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from loadbear.ledger.writer import LedgerWriter
from loadbear.storage.db import Database, open_database
from loadbear.storage.migrate import migrate
from loadbear.tenancy.models import SCOPES, TenancyError
from loadbear.tenancy.service import AuthError, TenantService, hash_key


@pytest.fixture(scope="module")
def shared_pg_url(pg_server) -> str:
    return pg_server.fresh_url()


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request) -> str:
    """conftest's ``db_url``, except that this module's PostgreSQL tests share one database
    (one per test costs about a second to create and drop); every test uses slugs of its own."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'loadbear.db'}"
        database = open_database(url)
        migrate(database)
        database.close()
        return url
    return request.getfixturevalue("shared_pg_url")


@pytest.fixture
def svc(db: Database) -> TenantService:
    return TenantService(db)


def slug(base: str = "t") -> str:
    return f"{base}-{uuid.uuid4().hex[:10]}"


def key_row(db: Database, key_id: str) -> dict:
    with db.system_tx(write=False) as c:
        return c.fetchone("SELECT * FROM api_keys WHERE CAST(id AS TEXT) = ?", (key_id,))


# -- tenants -------------------------------------------------------------------------------


def test_create_and_get_tenant(svc):
    s = slug("acme")
    t = svc.create_tenant(s, "Acme Inc.", {"store_content": True, "allowed_models": ["gpt-4o"]})
    got = svc.get_tenant(s)
    assert (got.id, got.slug, got.name, got.active) == (t.id, s, "Acme Inc.", True)
    assert got.settings.store_content is True and got.settings.allowed_models == ["gpt-4o"]
    assert got.settings.allows("gpt-4o") and not got.settings.allows("gpt-4o-mini")
    assert got.created_at and got.created_at.endswith("Z")
    assert s in [x.slug for x in svc.list_tenants()]
    assert svc.create_tenant(slug("noname")).name.startswith("noname-")  # name defaults to the slug


@pytest.mark.parametrize("bad", [
    "", "a", "-acme", "Acme", "acme_corp", "acme corp", "acme.io", "a" * 64, "acme\n", "ümlaut", None, 42,
])
def test_slug_validation(svc, bad):
    with pytest.raises(TenancyError) as e:
        svc.create_tenant(bad)
    assert e.value.status == 400 and e.value.param == "slug"


def test_slug_boundaries_accepted(svc):
    long = uuid.uuid4().hex + uuid.uuid4().hex[:31]  # 63 characters
    for ok in (long, "0" + uuid.uuid4().hex[:1], slug("with-dashes")):
        assert svc.create_tenant(ok).slug == ok


def test_duplicate_slug_is_a_conflict(svc, db):
    s = slug("dup")
    first = svc.create_tenant(s)
    with pytest.raises(TenancyError) as e:
        svc.create_tenant(s, "Someone else")
    assert (e.value.status, e.value.code, e.value.param) == (409, "tenant_exists", "slug")
    with db.system_tx(write=False) as c:
        assert c.scalar("SELECT COUNT(*) FROM tenants WHERE slug = ?", (s,)) == 1
    assert svc.get_tenant(s).id == first.id


def test_unknown_tenant_is_404(svc):
    with pytest.raises(TenancyError) as e:
        svc.get_tenant(slug("ghost"))
    assert e.value.status == 404 and e.value.code == "tenant_not_found"


# -- settings ------------------------------------------------------------------------------


def test_unknown_setting_is_refused_and_nothing_is_created(svc):
    s = slug("typo")
    with pytest.raises(TenancyError) as e:
        svc.create_tenant(s, settings={"monthly_budget": 10, "stor_content": True})
    assert e.value.status == 400 and e.value.param == "settings"
    assert "monthly_budget" in e.value.message and "stor_content" in e.value.message
    with pytest.raises(TenancyError):
        svc.get_tenant(s)


@pytest.mark.parametrize("settings, param", [
    ({"allowed_models": "gpt-4o"}, "settings.allowed_models"),
    ({"allowed_models": ["gpt-4o", 3]}, "settings.allowed_models"),
    ({"monthly_budget_usd": -1}, "settings.monthly_budget_usd"),
    ({"monthly_budget_usd": "100"}, "settings.monthly_budget_usd"),
    ({"store_content": "yes"}, "settings.store_content"),
    ({"fallback_message": "   "}, "settings.fallback_message"),
    ({"fallback_message": 7}, "settings.fallback_message"),
    ({"fallback_overrides": ["gpt-4o"]}, "settings.fallback_overrides"),
    ({"fallback_overrides": {"gpt-4o": "gpt-4o-mini"}}, "settings.fallback_overrides"),
    ({"fallback_overrides": {"gpt-4o": ["gpt-4o-mini", 3]}}, "settings.fallback_overrides"),
    ({"fallback_overrides": {"gpt-4o": [""]}}, "settings.fallback_overrides"),
    ({"allow_continuation": "yes"}, "settings.allow_continuation"),
    ({"support_contact": 5}, "settings.support_contact"),
    ({"support_contact": "  "}, "settings.support_contact"),
    ({"default_model": ["gpt-4o"]}, "settings.default_model"),
])
def test_setting_types_are_validated(svc, settings, param):
    with pytest.raises(TenancyError) as e:
        svc.create_tenant(slug("bad"), settings=settings)
    assert e.value.status == 400 and e.value.param == param


def test_update_settings_validates_and_persists(svc, db):
    s = slug("upd")
    svc.create_tenant(s, settings={"monthly_budget_usd": 5})
    t = svc.update_settings(s, {"monthly_budget_usd": 12.5, "support_contact": "help@acme.test"})
    assert t.settings.monthly_budget_usd == 12.5
    fresh = TenantService(db).get_tenant(s)  # as stored, not as cached
    assert fresh.settings.monthly_budget_usd == 12.5 and fresh.settings.support_contact == "help@acme.test"
    assert "help@acme.test" in fresh.settings.degraded_message()
    with pytest.raises(TenancyError):
        svc.update_settings(s, {"store_content": "maybe"})
    with pytest.raises(TenancyError):
        svc.update_settings(s, {"no_such_setting": 1})
    assert svc.get_tenant(s).settings.monthly_budget_usd == 12.5  # unchanged by the refused updates


def test_tenant_defaults_apply_and_can_be_overridden(db):
    svc = TenantService(db, defaults={"store_content": True, "monthly_budget_usd": 50})
    t = svc.create_tenant(slug("dflt"), settings={"monthly_budget_usd": 7})
    assert t.settings.store_content is True and t.settings.monthly_budget_usd == 7


# -- keys ----------------------------------------------------------------------------------


def test_key_plaintext_is_shown_once_and_only_its_hash_is_stored(svc, db):
    s = slug("keys")
    tenant = svc.create_tenant(s)
    key, plaintext = svc.create_key(s, "backend")
    assert plaintext.startswith(key.prefix + "_") and key.prefix.startswith("lb_")
    row = key_row(db, key.id)
    assert row["key_hash"] == hashlib.sha256(plaintext.encode()).hexdigest() == hash_key(plaintext)
    secret = plaintext[len(key.prefix) + 1:]
    for column, value in row.items():
        assert plaintext not in str(value), column
        assert secret not in str(value), column
    assert row["prefix"] == key.prefix  # the visible part, to recognise a key in a list
    assert str(row["tenant_id"]) == tenant.id
    # Listing shows the prefix, never the secret or the hash.
    [listed] = svc.list_keys(s)
    public = listed.public()
    assert public["prefix"] == key.prefix and public["name"] == "backend"
    assert plaintext not in repr(public) and row["key_hash"] not in repr(public)
    assert not hasattr(listed, "plaintext") and not hasattr(listed, "key_hash")


def test_key_scopes_are_validated(svc):
    s = slug("scopes")
    svc.create_tenant(s)
    default, _ = svc.create_key(s)
    assert set(default.scopes) == set(SCOPES)
    narrow, plaintext = svc.create_key(s, scopes=["chat", "usage:read"])
    ctx = svc.authenticate(plaintext)
    assert ctx.scopes == frozenset({"chat", "usage:read"})
    assert ctx.has("chat") and not ctx.has("knowledge:write")
    for bad in (["chat", "admin"], ["everything"], []):
        with pytest.raises(TenancyError) as e:
            svc.create_key(s, scopes=bad)
        assert e.value.param == "scopes" and e.value.status == 400
    assert len(svc.list_keys(s)) == 2  # refused keys were not created


def test_authenticate(svc):
    s = slug("auth")
    tenant = svc.create_tenant(s)
    _, plaintext = svc.create_key(s)
    ctx = svc.authenticate(plaintext)
    assert ctx.tenant_id == tenant.id and ctx.tenant.slug == s
    with pytest.raises(AuthError) as e:
        svc.authenticate(None)
    assert e.value.code == "missing_api_key"
    for wrong in ("lb_00000000_" + "x" * 43, plaintext + "x", plaintext[:-1]):
        with pytest.raises(AuthError) as e:
            svc.authenticate(wrong)
        assert e.value.code == "invalid_api_key"


def test_revoked_key_no_longer_authenticates(svc, db):
    s = slug("rev")
    svc.create_tenant(s)
    key, plaintext = svc.create_key(s)
    other, other_plain = svc.create_key(s)
    svc.authenticate(plaintext)  # now cached
    revoked = svc.revoke_key(s, key.id)
    assert revoked.revoked_at is not None
    with pytest.raises(AuthError) as e:
        svc.authenticate(plaintext)
    assert e.value.code == "invalid_api_key" and "revoked" in e.value.message
    # Another replica (no cache) agrees; the other key still works.
    with pytest.raises(AuthError):
        TenantService(db).authenticate(plaintext)
    assert svc.authenticate(other_plain).key_id == other.id
    # By prefix, twice: the second time is not an error and keeps the first revocation time.
    first = svc.revoke_key(s, other.prefix)
    again = svc.revoke_key(s, other.prefix)
    assert first.revoked_at == again.revoked_at
    with pytest.raises(AuthError):
        svc.authenticate(other_plain)


def test_keys_belong_to_their_tenant(svc):
    a, b = slug("a"), slug("b")
    svc.create_tenant(a)
    svc.create_tenant(b)
    key_a, _ = svc.create_key(a)
    svc.create_key(b)
    assert [k.id for k in svc.list_keys(a)] == [key_a.id]
    with pytest.raises(TenancyError) as e:
        svc.revoke_key(b, key_a.id)  # B cannot revoke A's key
    assert e.value.status == 404
    with pytest.raises(TenancyError):
        svc.revoke_key(a, "lb_nothing")


def test_disabled_tenant_cannot_authenticate(svc, db):
    s = slug("off")
    svc.create_tenant(s)
    _, plaintext = svc.create_key(s)
    with db.system_tx() as c:
        c.execute("UPDATE tenants SET active = ? WHERE slug = ?", (False, s))
    with pytest.raises(AuthError) as e:
        TenantService(db).authenticate(plaintext)
    assert e.value.code == "tenant_disabled"


def test_last_used_time_is_recorded_by_the_ledger_writer(svc, db, tmp_path):
    s = slug("used")
    svc.create_tenant(s)
    key, plaintext = svc.create_key(s)
    unused, _ = svc.create_key(s)
    assert key_row(db, key.id)["last_used_at"] is None
    ctx = svc.authenticate(plaintext)
    assert svc.due_touch(ctx.key_id) is True
    assert svc.due_touch(ctx.key_id) is False  # at most one write a minute per key
    writer = LedgerWriter(db, flush_interval=0.01, dead_letter_path=tmp_path / "dl.jsonl")
    try:
        writer.touch_key(ctx.key_id, ctx.tenant_id)
        assert writer.flush(10)
    finally:
        writer.close(10)
    listed = {k.id: k for k in svc.list_keys(s)}
    assert listed[key.id].last_used_at is not None and listed[key.id].last_used_at.endswith("Z")
    assert listed[unused.id].last_used_at is None
