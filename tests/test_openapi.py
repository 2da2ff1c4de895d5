"""/openapi.json is a valid OpenAPI document, describes exactly the routes the
server has, and every answer the server really gives (success and error, on
SQLite and PostgreSQL) validates against the schema documented for it."""
from __future__ import annotations

import re

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from sqlalchemy import update

import models
from models import ApiKey, Mailbox, QuotaUsage, User, db
import mailhandler  # noqa: E402

SERVED_PREFIXES = ("/api.php/", "/api/", "/uploads/")


@pytest.fixture
def spec(client):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.is_json
    return resp.get_json()


def operation_checker(spec):
    """check(template, method, response): the status must be documented for the
    operation, and a JSON body must validate against its schema."""
    components = spec["components"]

    def check(template: str, method: str, resp) -> None:
        op = spec["paths"][template][method.lower()]
        documented = op["responses"].get(str(resp.status_code))
        assert documented is not None, f"{method} {template}: {resp.status_code} not documented"
        content = documented.get("content", {})
        if "application/json" in content:
            assert resp.is_json, f"{method} {template}: not JSON"
            schema = dict(content["application/json"]["schema"], components=components)
            errors = sorted(Draft202012Validator(schema).iter_errors(resp.get_json()), key=str)
            assert not errors, f"{method} {template} {resp.status_code}: {errors[0].message} at {list(errors[0].path)}"
        else:
            assert not resp.is_json and resp.data, f"{method} {template}: expected file bytes"
        for header in documented.get("headers", {}):
            assert header in resp.headers, f"{method} {template} {resp.status_code}: no {header}"
    return check


def test_document_is_valid_openapi(spec, client):
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    assert spec["servers"] == [{"url": "http://localhost"}]
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "Your personal User API key (tm_...)"}
    other = client.get("/openapi.json", base_url="https://mail.example.net").get_json()
    assert other["servers"] == [{"url": "https://mail.example.net"}]


def test_document_lists_exactly_the_served_routes(app, spec):
    served = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        if rule.endpoint.startswith(("api_v1.", "legacy_php.")) or rule.endpoint == "legacy.attachment_file":
            if rule.endpoint != "legacy_php.attachment_file":  # documented at /uploads/...
                served |= {(m.lower(), re.sub(r"\{\w+\}", "{}", path)) for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(m, re.sub(r"\{\w+\}", "{}", p)) for p, ops in spec["paths"].items() for m in ops}
    assert documented == served


def message_in(box: Mailbox) -> models.Message:
    msg = mailhandler.store_message(box, {
        "from_email": "hello@example.org", "from_name": "Example Sender", "subject": "Welcome",
        "body_text": "Hello from the inbox.", "body_html": "<p>Hello from the inbox.</p>",
        "envelope_to": box.address}, b"Subject: Welcome\r\n\r\nHello from the inbox.\r\n",
        [{"filename": "file.txt", "data": b"attached text\n", "content_type": "text/plain"}])
    db.session.commit()
    return msg


def test_api_php_answers_match_the_document(app, client, spec):
    check = operation_checker(spec)
    gen = client.get("/api.php/generate?username=johnsmith")
    check("/api.php/generate", "GET", gen)
    box_address = gen.get_json()["email"]
    for query, status in (("", 200), ("?username=ab", 400), ("?username=admin", 400),
                          ("?username=johnsmith", 409), ("?domain=vip.example.com", 400)):
        resp = client.get("/api.php/generate" + query)
        assert resp.status_code == status, query
        check("/api.php/generate", "GET", resp)
    with app.app_context():
        msg = message_in(Mailbox.find_live(box_address))
        msg_id, att = msg.legacy_id, msg.attachments[0]
        att_path = att.legacy_url()
    calls = [("GET", "/api.php/inbox/{email}", f"/api.php/inbox/{box_address}", 200),
             ("GET", "/api.php/inbox/{email}", "/api.php/inbox/nobody%40example.com", 404),
             ("GET", "/api.php/inbox/{email}", f"/api.php/inbox/{box_address}?limit=many", 400),
             ("GET", "/api.php/email/{id}", f"/api.php/email/{msg_id}", 200),
             ("GET", "/api.php/email/{id}", "/api.php/email/987654", 404),
             ("GET", "/uploads/attachments/{id}/{filename}", att_path, 200),
             ("GET", "/uploads/attachments/{id}/{filename}", "/uploads/attachments/987654/x.txt", 404),
             ("GET", "/api.php/stats", "/api.php/stats", 200),
             ("GET", "/api.php/domains", "/api.php/domains", 200),
             ("DELETE", "/api.php/email/{id}", f"/api.php/email/{msg_id}", 200),
             ("DELETE", "/api.php/email/{id}", f"/api.php/email/{msg_id}", 404)]
    for method, template, url, status in calls:
        resp = client.open(url, method=method)
        assert resp.status_code == status, (method, url, resp.get_data(as_text=True)[:200])
        check(template, method, resp)


def test_api_php_without_domains_matches_the_document(app_factory):
    client = app_factory({"domains": []}).test_client()
    spec = client.get("/openapi.json").get_json()
    check = operation_checker(spec)
    for path in ("/api.php/generate", "/api.php/domains"):
        resp = client.get(path)
        assert resp.status_code == 500
        check(path, "GET", resp)


def new_key(app, plan="free") -> tuple[int, str]:
    with app.app_context():
        user = User.create(f"{plan}@example.org", plan=plan)
        _key, raw = ApiKey.issue(user)
        db.session.commit()
        return user.id, raw


def test_user_api_answers_match_the_document(app, client, spec):
    check = operation_checker(spec)
    user_id, raw = new_key(app)
    auth = {"Authorization": f"Bearer {raw}"}

    def call(method, template, url, status, headers=auth):
        resp = client.open(url, method=method, headers=headers)
        assert resp.status_code == status, (method, url, resp.get_data(as_text=True)[:200])
        check(template, method, resp)
        return resp

    call("GET", "/api/domains", "/api/domains?type=free", 200)
    call("GET", "/api/domains", "/api/domains", 200)
    call("GET", "/api/domains", "/api/domains?type=premium", 403)
    call("GET", "/api/domains", "/api/domains?type=gold", 422)
    call("GET", "/api/domains", "/api/domains", 401, headers={})
    call("GET", "/api/domains", "/api/domains", 401, headers={"Authorization": "Bearer tm_nope"})
    box = call("POST", "/api/emails", "/api/emails", 200).get_json()["data"]["email"]
    switch = "/api/emails/{current}/{username}/{domain}"
    box = call("POST", switch, f"/api/emails/{box}/demo123/example.com", 200).get_json()["data"]["email"]
    call("POST", switch, f"/api/emails/{box}/demo124/vip.example.com", 403)
    call("POST", switch, f"/api/emails/{box}/no/example.com", 422)
    call("POST", switch, "/api/emails/ghost@example.com/demo125/example.com", 404)
    with app.app_context():
        public_id = message_in(Mailbox.find_live(box)).public_id
    call("GET", "/api/messages", f"/api/messages?email={box}", 200)
    call("GET", "/api/messages", "/api/messages", 422)
    call("GET", "/api/messages", "/api/messages?email=ghost@example.com", 404)
    call("GET", "/api/messages/{id}", f"/api/messages/{public_id}", 200)
    call("GET", "/api/messages/{id}", "/api/messages/" + "x" * 46, 404)
    call("GET", "/api/messages/{id}/extract", f"/api/messages/{public_id}/extract", 200)
    call("GET", "/api/messages/{id}/extract", "/api/messages/" + "x" * 46 + "/extract", 404)
    attachment = "/api/messages/{id}/attachments/{name}"
    call("GET", attachment, f"/api/messages/{public_id}/attachments/file.txt", 200)
    call("GET", attachment, f"/api/messages/{public_id}/attachments/other.txt", 404)
    call("DELETE", "/api/messages/{id}", f"/api/messages/{public_id}", 200)
    call("DELETE", "/api/messages/{id}", f"/api/messages/{public_id}", 404)
    call("DELETE", "/api/emails/{email}", f"/api/emails/{box}", 200)
    call("DELETE", "/api/emails/{email}", f"/api/emails/{box}", 404)
    resp = client.put("/api/emails", headers=auth)
    assert resp.status_code == 405
    check("/api/emails", "POST", resp)  # every User API operation documents 405
    with app.app_context():
        db.session.execute(update(QuotaUsage).where(QuotaUsage.user_id == user_id).values(used=50000))
        db.session.commit()
    call("POST", "/api/emails", "/api/emails", 429)
