"""Bad HTTP input on every route: schemathesis against ``/openapi.json``
(no 5xx, no answer outside the documented schema), path traversal in every
path parameter, oversized and malformed query strings, wrong methods."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

import mailhandler
from models import ApiKey, Domain, Mailbox, User, db

from .helpers import build_message, record

TRAVERSALS = ["../../app.py", "..%2F..%2Fapp.py", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..\\..\\app.py",
              "....//....//etc/passwd", "/etc/passwd", "%00", "a%00b", "..%c0%af..%c0%afetc", "%252e%252e%252f",
              "x" * 5000, "%ff%fe", "<script>", "' OR 1=1 --"]


def seeded_key(app) -> tuple[str, str, str, int]:
    """A key, one of its mailboxes with a message and attachment, and that message's ids."""
    with app.app_context():
        user = User.create("fuzzer@example.org")
        _, raw_key = ApiKey.issue(user)
        db.session.commit()
        box = Mailbox.create("fuzzbox", Domain.by_name("example.com"), 86400, user_id=user.id)
        (msg,) = mailhandler.deliver(build_message(1, box.address, [("a.txt", b"hello")]), [box.address])
        return raw_key, box.address, msg.public_id, msg.id


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_schemathesis_every_operation(app):
    key, _, _, _ = seeded_key(app)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    statuses, failures, operations = Counter(), [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case):
            headers = {"Authorization": f"Bearer {key}"} if case.path.startswith("/api/") else {}
            response = case.call(headers=headers)
            statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            except Exception as exc:  # collected, so one run reports every broken operation
                failures.append(f"{case.method} {case.formatted_path}: {str(exc)[:300]}")
                raise

        try:
            call()
        except Exception:
            pass  # already in failures
    record("bad HTTP input", f"schemathesis: {operations} operations, {sum(statuses.values())} generated "
           f"requests, statuses {dict(sorted(statuses.items()))}, schema or 5xx failures {len(failures)}")
    assert operations >= 15
    assert failures == []
    assert not [s for s in statuses if s >= 500]


def all_paths(address: str, public_id: str, msg_id: int) -> list[str]:
    """Every route with one path parameter replaced by ``{}``."""
    return ["/api.php/inbox/{}", "/inbox/{}", "/api.php/email/{}", "/email/{}",
            "/uploads/attachments/1/{}", "/uploads/attachments/{}/x",
            "/api/emails/{}", f"/api/emails/{address}/{{}}/example.com", f"/api/emails/{address}/abc/{{}}",
            "/api/emails/{}/abc/example.com", "/api/messages/{}", f"/api/messages/{public_id}/attachments/{{}}",
            "/web/messages/{}", "/m/{}", f"/web/messages/{msg_id}/attachments/{{}}", "/docs/{}", "/static/{}"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_path_traversal_and_bad_queries_on_every_route(app):
    key, address, public_id, msg_id = seeded_key(app)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {key}"}
    secret = (app.root_path + "/app.py")
    secret_text = open(secret, encoding="utf-8").read()[:200]
    statuses, leaks, server_errors = Counter(), [], []
    for template in all_paths(address, public_id, msg_id):
        for bad in TRAVERSALS:
            for method in ("GET", "POST", "DELETE", "PUT", "PATCH"):
                resp = client.open(template.format(bad), method=method, headers=auth)
                statuses[resp.status_code] += 1
                body = resp.get_data()
                if b"root:x:" in body or secret_text.encode() in body:
                    leaks.append(f"{method} {template.format(bad)}")
                if resp.status_code >= 500:
                    server_errors.append(f"{method} {template.format(bad)} -> {resp.status_code}")
    queries = ["limit=" + "9" * 5000, "limit=%C2%B2", "limit=-1", "limit=1e9", "offset=%00", "limit[]=1", "email=" + "a" * 100000,
               "type=" + "%ff" * 100, "username=" + "%00" * 50, "domain=" + "x" * 10000, "&&&===&&&", "%", "a=%zz"]
    for query in queries:
        for path in ("/api.php/generate", f"/api.php/inbox/{address}", "/api/messages", "/api/domains",
                     "/stats", "/", "/docs"):
            resp = client.get(f"{path}?{query}", headers=auth)
            statuses[resp.status_code] += 1
            if resp.status_code >= 500:
                server_errors.append(f"GET {path}?{query[:40]} -> {resp.status_code}")
    huge = client.post("/api/emails", data="x" * (2 * 1024 * 1024), headers=dict(auth, **{
        "Content-Type": "application/json"}))
    record("bad HTTP input", f"path traversal x {len(TRAVERSALS)} payloads x 5 methods on "
           f"{len(all_paths(address, public_id, msg_id))} routes + {len(queries)} bad query strings: "
           f"statuses {dict(sorted(statuses.items()))}; leaks {len(leaks)}, 5xx {len(server_errors)}; "
           f"2 MiB body -> {huge.status_code}")
    assert leaks == []
    assert server_errors == []
    assert huge.status_code == 413


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_large_and_negative_integers_everywhere(app, backend):
    """Every integer parameter of /openapi.json (both APIs), and every integer
    path of the web page, with hypothesis integers from -2^80 to 2^80: no
    5xx, no OverflowError reaching the database."""
    from hypothesis import strategies as st
    key, address, public_id, _ = seeded_key(app)
    client = app.test_client()
    client.get("/")  # a web session, so the page's own routes reach their look-ups
    spec = client.get("/openapi.json").get_json()
    targets = integer_targets(spec, address, public_id) + [
        f"/web/messages/{{n}}{suffix}" for suffix in ("", "/body", "/raw", "/attachments/{n}")]
    statuses: Counter = Counter()

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(n=st.one_of(st.integers(-2 ** 80, 2 ** 80), st.sampled_from([2 ** 53, 2 ** 63, 2 ** 64, -1, 0])))
    def call(n):
        for target in targets:
            url = target.replace("{n}", str(n))
            headers = {"Authorization": f"Bearer {key}"} if url.startswith("/api/") else {}
            status = client.get(url, headers=headers).status_code
            statuses[status] += 1
            assert status < 500, url
    call()
    record("bad HTTP input", f"large/negative integers (-2^80..2^80) in {len(targets)} integer parameters: "
           f"{sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not [s for s in statuses if s >= 500]


def integer_targets(spec: dict, address: str, public_id: str) -> list[str]:
    """GET URLs of the spec with ``{n}`` where an integer parameter goes."""
    targets = []
    for path, ops in spec["paths"].items():
        params = (ops.get("get") or {}).get("parameters", []) if "get" in ops else []
        ints = [p for p in params if (p.get("schema") or {}).get("type") == "integer"]
        base = (path.replace("{email}", address).replace("{id}", "{n}").replace("{filename}", "x")
                .replace("{name}", "x"))
        if "{id}" in path and "/api/" in path:
            base = base.replace("{n}", public_id)
        for param in ints:
            if param["in"] == "query":
                targets.append(f"{base}?{param['name']}={{n}}")
        if "{n}" in base and "{" not in base.replace("{n}", ""):
            targets.append(base)
    return sorted(set(targets))
