"""The User API quota as counted by ``limits.QuotaBatcher`` (group commit of
the reservations of concurrent requests): exact on both databases, through
gunicorn as ``make run`` serves it (2 workers, each serving many
connections at once, so requests of one worker can share a batch)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry, multiprocess
from sqlalchemy import text, update

import limits
from models import ApiKey, QuotaUsage, User, db

ROOT = Path(__file__).resolve().parent.parent


def new_user(email: str) -> User:
    user = User.create(email)
    db.session.commit()
    return user


def set_used(user_id: int, used: int) -> None:
    QuotaUsage.reserve(user_id, limits.quota_period(), 10**9)
    db.session.execute(update(QuotaUsage).where(QuotaUsage.user_id == user_id).values(used=used))
    db.session.commit()


def test_reserve_many_takes_what_is_left_and_no_more(app):
    with app.app_context():
        user, period = new_user("many@users.test"), limits.quota_period()
        assert QuotaUsage.reserve_many(user.id, period, 10, 3) == [1, 2, 3]  # the month's first: row created
        assert QuotaUsage.reserve_many(user.id, period, 10, 4) == [4, 5, 6, 7]  # one guarded UPDATE
        assert QuotaUsage.reserve_many(user.id, period, 10, 5) == [8, 9, 10, None, None]
        assert QuotaUsage.reserve_many(user.id, period, 10, 2) == [None, None]
        db.session.commit()
        assert QuotaUsage.used_in(user.id, period) == 10


def test_one_batch_serves_several_users_in_arrival_order(app):
    with app.app_context():
        first, second = new_user("first@users.test"), new_user("second@users.test")
        set_used(second.id, 98)
        period = limits.quota_period()
        tickets = [limits._Ticket((first.id, period, 100)), limits._Ticket((second.id, period, 100)),
                   limits._Ticket((first.id, period, 100)), limits._Ticket((second.id, period, 100)),
                   limits._Ticket((second.id, period, 100))]
        limits.QuotaBatcher._write(tickets, tickets[0])
        assert [t.done for t in tickets] == [True] * 5
        assert [t.used for t in tickets] == [1, 99, 2, 100, None]
        assert QuotaUsage.used_in(first.id, period) == 2 and QuotaUsage.used_in(second.id, period) == 100


def test_a_batch_that_cannot_be_written_fails_every_request_in_it(app):
    with app.app_context():
        user, period = new_user("broken@users.test"), limits.quota_period()
        set_used(user.id, 5)
        tickets = [limits._Ticket((user.id, period, 100)) for _ in range(3)]
        # A real failure of the database: the quota table is gone.
        db.session.execute(text("ALTER TABLE quota_usage RENAME TO quota_usage_gone"))
        db.session.commit()
        try:
            limits.QuotaBatcher._write(tickets, tickets[1])
        finally:
            db.session.rollback()
            db.session.execute(text("ALTER TABLE quota_usage_gone RENAME TO quota_usage"))
            db.session.commit()
        assert all(t.done and t.used is None for t in tickets)
        assert not isinstance(tickets[1].failed, limits.QuotaFailed)  # the writer sees the database's error
        assert isinstance(tickets[0].failed, limits.QuotaFailed) and tickets[0].failed.__cause__ is tickets[1].failed
        assert isinstance(tickets[2].failed, limits.QuotaFailed)
        assert QuotaUsage.used_in(user.id, period) == 5  # nothing counted


@pytest.mark.parametrize("route", ["domains", "listing"])
def test_quota_exact_through_the_workers_as_shipped(app, config_file, tmp_path, backend, route, monkeypatch):
    """``make run``'s gunicorn (deploy/gunicorn.conf.py: gevent workers, many
    connections each), 2 workers, 80 parallel requests with 30 units left: exactly
    30 answers 200, each with its own Used count, the others 429, and the
    count ends at the limit. ``listing``: a mailbox listing that both workers
    have answered before, so most answers are sent from memory (hotpath.py)
    and reserve their unit there."""
    from adversarial.helpers import Gunicorn
    with app.app_context():
        user = User.create("batch@users.test")
        _key, raw = ApiKey.issue(user)
        db.session.commit()
        user_id = user.id
    auth = {"Authorization": f"Bearer {raw}"}
    counts = tmp_path / "metrics"
    counts.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(counts))
    server = Gunicorn(config_file, tmp_path / "gunicorn.log", workers=2,
                      extra=["--config", str(ROOT / "deploy" / "gunicorn.conf.py")]).start()
    try:
        path = "/api/domains"
        if route == "listing":
            address = requests.post(server.url + "/api/emails", headers=auth, timeout=60).json()["data"]["email"]
            path = f"/api/messages?email={address}"
            for _ in range(20):  # new connections: both workers answer it and keep it
                assert requests.get(server.url + path, headers={**auth, "Connection": "close"},
                                    timeout=60).status_code == 200
        with app.app_context():
            set_used(user_id, 50_000 - 30)

        def call(_n):
            resp = requests.get(server.url + path, headers=auth, timeout=60)
            assert "X-RateLimit-Used" in resp.headers, (resp.status_code, resp.headers, resp.text[:300])
            return resp.status_code, int(resp.headers["X-RateLimit-Used"])
        with ThreadPoolExecutor(max_workers=80) as pool:
            results = list(pool.map(call, range(80)))
    finally:
        server.stop()
    codes = [code for code, _ in results]
    assert codes.count(200) == 30 and codes.count(429) == 50, codes
    assert sorted(used for code, used in results if code == 200) == list(range(50_000 - 29, 50_001))
    with app.app_context():
        assert QuotaUsage.used_in(user_id, limits.quota_period()) == 50_000
    if route == "listing":
        assert answers_from_memory(counts) >= 20  # most of the 200s and the warm-up's repeats


def answers_from_memory(folder: Path) -> float:
    """The workers' count of answers sent from memory (prometheus-client's files)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(folder))
    return sum(sample.value for family in registry.collect() for sample in family.samples
               if sample.name == "tempmail_http_answers_from_memory_total")
