"""Concurrent creates of the same tenant slug: one wins, the other gets a 409, never a 500."""

from __future__ import annotations

import threading

from loadbear.tenancy.models import TenancyError
from loadbear.tenancy.service import TenantService


def test_concurrent_creates_of_one_slug(db):
    svc = TenantService(db)
    results: list[object] = []
    barrier = threading.Barrier(6)

    def create():
        barrier.wait()
        try:
            results.append(svc.create_tenant("racer"))
        except TenancyError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, TenancyError)]
    lost = [r for r in results if isinstance(r, TenancyError)]
    assert len(won) == 1 and len(lost) == 5
    assert all(e.status == 409 and e.code == "tenant_exists" for e in lost)
    assert [t.slug for t in svc.list_tenants()] == ["racer"]
