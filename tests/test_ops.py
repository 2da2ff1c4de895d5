"""/healthz and /metrics: status, protection by config, request and message counters."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY

import ops
from conftest import ROOT
from models import db
import retention  # noqa: E402
import metrics  # noqa: E402


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_healthz_ok(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "database": "ok", "uploads": "ok"}
    assert resp.headers["Cache-Control"] == "no-store"


def test_healthz_503_when_uploads_unusable(app_factory, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the uploads folder should be")
    app = app_factory({"uploads_dir": str(blocker)})
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "fail" and body["database"] == "ok"
    assert body["uploads"].startswith("error: ")


def test_healthz_503_when_database_unreachable(app, monkeypatch):
    def broken(*_args, **_kwargs):
        from sqlalchemy.exc import OperationalError
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))
    monkeypatch.setattr(db.session, "execute", broken)
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 503
    assert resp.get_json()["database"] == "error: OperationalError"


def test_metrics_served_to_this_machine_by_default(client, app):
    """Without a token, loopback clients scrape (the test client is 127.0.0.1)
    and any other address is refused."""
    remote = client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.10"})
    assert remote.status_code == 403 and b"metrics.token" in remote.data
    with app.app_context():
        before = sample("tempmail_http_requests_total", route="/generate", method="GET", status="200")
    client.get("/generate")
    client.get("/api.php/inbox/nobody@example.com")
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    body = resp.get_data(as_text=True)
    assert 'tempmail_http_requests_total{method="GET",route="/generate",status="200"}' in body
    # the URL rule, not the path, so addresses do not each make a series
    assert 'route="/api.php/inbox/<path:email>",status="404"' in body or \
        'route="/api.php/inbox/<email>",status="404"' in body
    assert "nobody@example.com" not in body
    assert "tempmail_mailboxes_live 1.0" in body and "tempmail_stored_bytes 0.0" in body
    assert sample("tempmail_http_requests_total", route="/generate", method="GET", status="200") == before + 1


def test_metrics_unmatched_routes_share_one_series(client):
    client.get("/no/such/page/12345")
    body = client.get("/metrics").get_data(as_text=True)
    assert 'route="unmatched",status="404"' in body and "12345" not in body


def test_metrics_token(app_factory):
    client = app_factory({"metrics": {"enabled": True, "token": "s3cret"}}).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    resp = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert resp.status_code == 200 and b"tempmail_mailboxes_live" in resp.data


def test_metrics_disabled(app_factory):
    client = app_factory({"metrics": {"enabled": False}}).test_client()
    resp = client.get("/metrics")
    assert resp.status_code == 404
    assert client.get("/healthz").status_code == 200


def test_count_message_by_outcome_and_reason(client):
    before = sample("tempmail_messages_total", outcome="rejected", reason="user_unknown")
    metrics.count_message("accepted")
    metrics.count_message("rejected", "user_unknown")
    metrics.count_message("rejected", "user_unknown")
    assert sample("tempmail_messages_total", outcome="rejected", reason="user_unknown") == before + 2
    body = client.get("/metrics").get_data(as_text=True)
    assert 'tempmail_messages_total{outcome="accepted",reason=""}' in body


def test_purge_runs_are_counted(app):
    runs = sample("tempmail_purge_runs_total")
    with app.app_context():
        result = retention.run_purge()
    assert sample("tempmail_purge_runs_total") == runs + 1
    assert result["mailboxes"] == 0 and result["orphan_files"] == []


def test_multiprocess_metrics_add_up_across_processes(backend, tmp_path, config_file):
    """With PROMETHEUS_MULTIPROC_DIR (deploy/gunicorn.conf.py), /metrics in one
    process shows what another process (the mail daemon) counted."""
    if backend != "sqlite":
        pytest.skip("process aggregation does not depend on the database")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"), TEMPMAIL_CONFIG=str(config_file))
    (tmp_path / "prom").mkdir()
    count = "import metrics; [metrics.count_message('rejected', 'relay_denied') for _ in range(3)]"
    scrape = ("from app import create_app; "
              "print(create_app().test_client().get('/metrics').get_data(as_text=True))")
    subprocess.run([sys.executable, "-c", count], cwd=ROOT, env=env, check=True)
    out = subprocess.run([sys.executable, "-c", scrape], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert 'tempmail_messages_total{outcome="rejected",reason="relay_denied"} 3.0' in out


def test_metrics_count_messages_by_outcome(app, client):
    import mailhandler
    address = client.get("/generate?username=counted").get_json()["email"]
    with app.app_context():
        accepted = sample("tempmail_messages_total", outcome="accepted", reason="")
        unknown = sample("tempmail_messages_total", outcome="rejected", reason="user_unknown")
        mailhandler.deliver(b"Subject: hi\r\n\r\nbody\r\n", [address], "a@example.org")
        with pytest.raises(mailhandler.UnknownRecipient):
            mailhandler.deliver(b"Subject: hi\r\n\r\nbody\r\n", ["ghost@example.com"], "a@example.org")
        assert sample("tempmail_messages_total", outcome="accepted", reason="") == accepted + 1
        assert sample("tempmail_messages_total", outcome="rejected", reason="user_unknown") == unknown + 1


def test_metrics_methods_clients_make_up_share_one_series(client):
    """A client may send any token as its method: counted as "other", so a
    stream of made-up methods cannot add series (and memory) to /metrics."""
    for method in ("BREWCOFFEE", "PROPFIND", "X123"):
        client.open("/generate", method=method)
    client.open("/generate", method="DELETE")
    body = client.get("/metrics").get_data(as_text=True)
    assert 'method="other",route="unmatched",status="405"' in body
    assert 'method="DELETE",route="unmatched",status="405"' in body  # a 405 matches no rule
    assert "BREWCOFFEE" not in body and "PROPFIND" not in body and "X123" not in body
