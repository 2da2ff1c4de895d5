"""Each front answers its own errors in its own shape: api.php
``{"error": ...}``, the User API ``{"status": false, "message": ...}``, the
web page HTML; 404, 405 and an unexpected exception (500) alike."""
from __future__ import annotations

import pytest

import api_legacy
import api_v1
import models
from models import ApiKey, User, db


@pytest.fixture
def broken_app(app):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    return app


def key_for(app) -> str:
    with app.app_context():
        user = User.create("errors@example.org")
        db.session.commit()
        _key, raw = ApiKey.issue(user)
        db.session.commit()
        return raw


def test_api_php_404_405_and_json_500(broken_app, monkeypatch):
    client = broken_app.test_client()
    assert client.get("/api.php/nope").get_json() == {"error": "Invalid endpoint: /nope"}
    assert client.post("/api.php/stats").get_json() == {"error": "Method not allowed"}

    def boom():
        raise RuntimeError("secret internals")
    monkeypatch.setattr(models.Stat, "snapshot", staticmethod(boom))
    for path in ("/api.php/stats", "/stats"):
        resp = client.get(path)
        assert resp.status_code == 500 and resp.get_json() == {"error": "Internal server error"}
        assert "secret" not in resp.get_data(as_text=True)


def test_user_api_json_500(broken_app, monkeypatch):
    raw = key_for(broken_app)

    def boom(*_a, **_k):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(api_v1, "domain_json", boom)
    resp = broken_app.test_client().get("/api/domains", headers={"Authorization": f"Bearer {raw}"})
    assert resp.status_code == 500
    assert resp.get_json() == {"status": False, "message": "Internal server error."}
    assert resp.headers["X-RateLimit-Used"] == "0"  # a 500 does not count


def test_web_page_errors_are_html(broken_app, monkeypatch):
    client = broken_app.test_client()
    assert client.get("/web/nope").status_code == 404
    assert "text/html" in client.get("/web/nope").content_type
    import web

    def boom(*_a, **_k):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(web, "session_box", boom)
    resp = client.get("/")
    assert resp.status_code == 500 and "text/html" in resp.content_type
    assert "secret" not in resp.get_data(as_text=True) and "Traceback" not in resp.get_data(as_text=True)


def test_error_owner_is_decided_by_blueprint_then_path(app):
    with app.test_request_context("/api.php/email/1"):
        assert api_legacy.owns("/api.php/email/1") and api_legacy.owns("/generate")
        assert not api_legacy.owns("/web/inbox.json")
