"""The OpenAPI 3.1 description of both APIs, served at ``/openapi.json``.

Schemas are strict (every key required, no extra keys) because the seeds fix
the wire format exactly; ``tests/test_openapi.py`` calls every route and
validates the real answers against these schemas, so a change on either side
shows up as a failing test rather than as a lying document.
"""
from __future__ import annotations

LOCAL_TIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$",
              "description": "YYYY-MM-DD HH:MM:SS in the server's configured time zone"}
ISO_TIME = {"type": "string", "format": "date-time",
            "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$"}
STRING, INTEGER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
BINARY = {"description": "The file's bytes",
          "content": {"application/octet-stream": {"schema": {"type": "string", "contentMediaType":
                                                              "application/octet-stream"}}}}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(optional: tuple = (), **props) -> dict:
    """A closed object schema: every property required except ``optional``."""
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": [k for k in props if k not in optional]}


def schemas() -> dict:
    inbox_item = obj(id=INTEGER, from_email=STRING, from_name=STRING, subject=STRING,
                     is_read={"type": "integer", "enum": [0, 1]}, received_at=LOCAL_TIME)
    attachment = obj(name=STRING, extension=STRING, size=INTEGER, url={"type": "string", "format": "uri"})
    message = obj(is_seen=BOOLEAN, subject=STRING, **{"from": STRING}, from_email=STRING, to=STRING,
                  receivedAt=LOCAL_TIME, id={"type": "string", "pattern": "^[A-Za-z0-9]{46}$"}, html=BOOLEAN,
                  content=STRING, attachments={"type": "array", "items": ref("MessageAttachment")})
    mailbox = obj(id=INTEGER, email={"type": "string", "format": "email"}, domain=STRING, expire_at=ISO_TIME,
                  expires_in_seconds={"type": "integer", "minimum": 0}, created_at=ISO_TIME,
                  email_token=STRING)
    return {
        "LegacyError": obj(("success", "searched_for", "hint"), success={"const": False}, error=STRING,
                           searched_for=STRING, hint=STRING),
        "Generated": obj(success={"const": True}, email=STRING, username=STRING, domain=STRING,
                         expires_at=LOCAL_TIME),
        "InboxItem": inbox_item,
        "Inbox": obj(success={"const": True}, email=STRING, created_at=LOCAL_TIME, expires_at=LOCAL_TIME,
                     total=INTEGER, emails={"type": "array", "items": ref("InboxItem")}),
        "LegacyAttachment": obj(id=INTEGER, filename=STRING, size=INTEGER, content_type=STRING,
                                file_path=STRING),
        "EmailDetail": obj(success={"const": True}, email=obj(
            id=INTEGER, email_address_id=INTEGER, from_email=STRING, from_name=STRING, subject=STRING,
            body_text=STRING, body_html=STRING, is_read={"type": "integer", "enum": [0, 1]},
            received_at=LOCAL_TIME), attachments={"type": "array", "items": ref("LegacyAttachment")}),
        "Deleted": obj(success={"const": True}, deleted_id={"type": "string", "pattern": "^[0-9]+$"}),
        "Stats": obj(success={"const": True}, stats=obj(
            id=INTEGER, total_emails=INTEGER, total_addresses=INTEGER, total_received=INTEGER,
            last_updated=LOCAL_TIME)),
        "DomainList": obj(success={"const": True}, domains={"type": "array", "items": STRING}),
        "UserError": obj(status={"const": False}, message=STRING),
        "Done": obj(status={"const": True}, message=STRING),
        "Domains": obj(status={"const": True}, data=obj(
            requested_type={"enum": ["free", "premium", "all"]},
            allowed_types={"type": "array", "items": {"enum": ["free", "premium"]}},
            domains={"type": "array", "items": obj(domain=STRING, type={"enum": ["Free", "Premium"]},
                                                   custom=BOOLEAN)})),
        "Mailbox": mailbox,
        "MailboxResponse": obj(status={"const": True}, data=ref("Mailbox")),
        "MessageAttachment": attachment,
        "Message": message,
        "MessageList": obj(status={"const": True}, mailbox=STRING,
                           messages={"type": "array", "items": ref("Message")}),
        "MessageResponse": obj(status={"const": True}, data=ref("Message")),
        "StreamMessage": {**message, "properties": {k: v for k, v in message["properties"].items()
                                                    if k != "content"},
                          "required": [k for k in message["required"] if k != "content"],
                          "description": "The data of a stream's message event: the Message less content"},
        "Extraction": obj(status={"const": True}, data=obj(
            codes={"type": "array", "items": STRING, "description": "One-time codes, most likely first"},
            links={"type": "array", "items": obj(
                url={"type": "string", "format": "uri", "pattern": "^https?://"}, text=STRING,
                kind={"enum": ["verify", "reset", "login", "unsubscribe", "other"]})})),
    }


def json_body(schema: str, description: str, headers: dict | None = None) -> dict:
    body = {"description": description, "content": {"application/json": {"schema": ref(schema)}}}
    if headers:
        body["headers"] = headers
    return body


def rate_headers() -> dict:
    names = ("Limit", "Used", "Remaining")
    headers = {f"X-RateLimit-{n}": {"$ref": f"#/components/headers/X-RateLimit-{n}"} for n in names}
    headers["X-RateLimit-Reset"] = {"$ref": "#/components/headers/X-RateLimit-Reset"}
    return headers


def legacy_op(summary: str, ok: str | None, errors: dict, params=(), tag="api.php") -> dict:
    """An api.php operation: no security, errors with the ``error`` key."""
    responses = {"200": json_body(ok, "Success") if ok else BINARY}
    responses.update({str(code): json_body("LegacyError", text) for code, text in errors.items()})
    return {"tags": [tag], "summary": summary, "security": [], "parameters": list(params),
            "responses": responses}


USER_ERRORS = {401: "Missing, invalid or revoked key", 403: "The plan does not allow it",
               404: "Not found or owned by someone else", 422: "Invalid input",
               429: "Monthly quota exhausted", 503: "Too many requests held by this server now (Retry-After)"}


def user_op(summary: str, ok: str | None, codes: tuple, params=()) -> dict:
    """A User API operation: Bearer key, quota headers, ``{status, message}`` errors."""
    ok_resp = json_body(ok, "Success", rate_headers()) if ok else dict(BINARY, headers=rate_headers())
    responses = {"200": ok_resp}
    for code in codes:
        resp = json_body("UserError", USER_ERRORS.get(code, "Error"))
        if code in (429, 503):
            resp["headers"] = dict(rate_headers(), **{"Retry-After": {
                "description": "Seconds until the quota resets" if code == 429 else "Seconds to wait",
                "schema": INTEGER}})
        elif code != 401:
            resp["headers"] = rate_headers()
        responses[str(code)] = resp
    responses["405"] = json_body("UserError", "Method not allowed")
    return {"tags": ["User API"], "summary": summary, "parameters": list(params), "responses": responses}


def stream_op() -> dict:
    """``GET /api/messages/stream``: Server-Sent Events, not JSON."""
    op = user_op("Stream an owned mailbox's new messages (Server-Sent Events)", "MessageList",
                 (401, 403, 404, 422, 429, 503), [
                     p("email", "query", STRING, True, "Address of a mailbox you own"),
                     *filter_params(),
                     p("since", "query", PUBLIC_ID, False, "Start after this message (like Last-Event-ID)"),
                     p("Last-Event-ID", "header", PUBLIC_ID, False,
                       "Resume after this message (sent by EventSource when it reconnects)")])
    op["description"] = (
        "One `message` event per new message: `id:` is the message id, `data:` the object of "
        "GET /api/messages/{id} without `content`. A comment line `: heartbeat` every 15 s; a `gone` "
        "event when the mailbox expires or is deleted. Without Last-Event-ID or since the stream "
        "starts with the next message to arrive. Opening a stream counts one request toward the "
        "quota. A browser page of another site may read it only if cors_origins allows that site.")
    op["responses"]["200"] = {"description": "An open text/event-stream", "headers": rate_headers(),
                              "content": {"text/event-stream": {
                                  "schema": {"type": "string"},
                                  "example": SSE_EXAMPLE}}}
    op["responses"]["403"]["description"] = "A page of a site that cors_origins does not allow"
    return op


SSE_EXAMPLE = ("retry: 2000\n: connected\n\n"
               "id: ap94AWDg123ELQz07vrVB9dLXlbqZM5NGwYxOJKko8n6m1\nevent: message\n"
               'data: {"is_seen":false,"subject":"Your code","from":"Shop","from_email":"shop@example.org",'
               '"to":"demo123@example.com","receivedAt":"2026-06-07 19:37:26",'
               '"id":"ap94AWDg123ELQz07vrVB9dLXlbqZM5NGwYxOJKko8n6m1","html":false,"attachments":[]}\n\n'
               ": heartbeat\n\n")
PUBLIC_ID = {"type": "string", "pattern": "^[A-Za-z0-9]{46}$"}
WAIT = {"type": "integer", "minimum": 0, "maximum": 60}


def filter_params() -> list[dict]:
    return [p("from", "query", {"type": "string", "maxLength": 200}, False,
              "Only messages whose sender address or name contains this (case-insensitive)"),
            p("subject", "query", {"type": "string", "maxLength": 200}, False,
              "Only messages whose subject contains this (case-insensitive)"),
            p("tag", "query", {"type": "string", "maxLength": 64}, False,
              "Only messages sent to name+TAG@domain (exact)")]


def p(name: str, where: str, schema: dict, required: bool, description: str) -> dict:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}


def legacy_paths() -> dict:
    email_id = p("id", "path", INTEGER, True, "Message id from the inbox list")
    missing = {404: "Email not found"}
    return {
        "/api.php/generate": {"get": legacy_op(
            "Create a temporary address", "Generated",
            {400: "Invalid username, reserved username or invalid domain", 409: "Username already taken",
             500: "No Free domain configured"},
            [p("username", "query", {"type": "string", "pattern": "^[A-Za-z0-9]{3,20}$"}, False,
               "Custom username; random when absent"),
             p("domain", "query", STRING, False, "A domain listed by /domains")])},
        "/api.php/inbox/{email}": {"get": legacy_op(
            "List an address's messages (oldest first); with wait, first wait for new mail", "Inbox",
            {400: "Invalid limit, offset, wait or since", 404: "Address unknown or expired",
             503: "Too many requests held by this server now (Retry-After)"},
            [p("email", "path", STRING, True, "Full address, URL-encoded or not"),
             p("limit", "query", {"type": "integer", "minimum": 0, "maximum": 1000}, False, "At most this many"),
             p("offset", "query", {"type": "integer", "minimum": 0}, False, "Skip this many"),
             p("wait", "query", WAIT, False, "Hold the request up to this many seconds until the inbox "
               "has a message newer than since (any message without since); then answer as usual"),
             p("since", "query", {"type": "integer", "minimum": 0}, False,
               "Id of the newest message you have seen (0 or absent: any message counts as new)")])},
        "/api.php/email/{id}": {
            "get": legacy_op("Read a message (marks it read)", "EmailDetail", missing, [email_id]),
            "delete": legacy_op("Delete a message and its attachments", "Deleted", missing, [email_id])},
        "/uploads/attachments/{id}/{filename}": {"get": legacy_op(
            "Download an attachment (file_path of GET /email/{id})", None, {404: "Attachment not found"},
            [p("id", "path", INTEGER, True, "Attachment id"),
             p("filename", "path", STRING, True, "Display name (cosmetic)")])},
        "/api.php/stats": {"get": legacy_op("Service counters", "Stats", {})},
        "/api.php/domains": {"get": legacy_op("Domains for new addresses", "DomainList",
                                              {500: "No Free domain configured"})},
    }


def user_paths() -> dict:
    owned = p("email", "path", STRING, True, "Address of a mailbox you own")
    msg_id = p("id", "path", {"type": "string", "pattern": "^[A-Za-z0-9]{46}$"}, True, "Message id")
    return {
        "/api/domains": {"get": user_op(
            "Domains your plan allows", "Domains", (401, 403, 422, 429),
            [p("type", "query", {"enum": ["free", "premium", "all"], "default": "all"}, False, "Domain type")])},
        "/api/emails": {"post": user_op("Create a random mailbox you own", "MailboxResponse", (401, 403, 422, 429))},
        "/api/emails/{current}/{username}/{domain}": {"post": user_op(
            "Move an owned mailbox to username@domain", "MailboxResponse", (401, 403, 404, 422, 429),
            [p("current", "path", STRING, True, "Address of a mailbox you own"),
             p("username", "path", STRING, True, "New username, 3-20 letters or digits"),
             p("domain", "path", STRING, True, "A domain your plan allows")])},
        "/api/emails/{email}": {"delete": user_op("Delete an owned mailbox", "Done", (401, 404, 429), [owned])},
        "/api/messages": {"get": user_op(
            "List an owned mailbox's messages (newest first); with wait, first wait for new mail",
            "MessageList", (401, 404, 422, 429, 503),
            [p("email", "query", STRING, True, "Address of a mailbox you own"),
             *filter_params(),
             p("wait", "query", WAIT, False, "Hold the request up to this many seconds until a message "
               "newer than since that passes the filters is there; then answer as usual (a 200, counted)"),
             p("since", "query", PUBLIC_ID, False, "Id of the newest message you have seen, of this mailbox")])},
        "/api/messages/stream": {"get": stream_op()},
        "/api/messages/{id}": {
            "get": user_op("Read an owned message (marks it seen)", "MessageResponse", (401, 404, 429), [msg_id]),
            "delete": user_op("Delete an owned message", "Done", (401, 404, 429), [msg_id])},
        "/api/messages/{id}/extract": {"get": user_op(
            "One-time codes and links of an owned message (does not mark it seen)", "Extraction",
            (401, 404, 429), [msg_id])},
        "/api/messages/{id}/attachments/{name}": {"get": user_op(
            "Download an attachment of an owned message", None, (401, 404, 429),
            [msg_id, p("name", "path", STRING, True, "Attachment name from the message")])},
    }


def webhook_schemas() -> dict:
    """The webhook routes' answers, and the event TempMail POSTs to a webhook."""
    hook = dict(url={"type": "string", "format": "uri"}, created_at=ISO_TIME,
                pending={"type": "integer", "minimum": 0})
    attempt = obj(delivery_id={"type": "string", "pattern": "^[0-9a-f]{32}$"},
                  event={"const": "message.received"}, attempt={"type": "integer", "minimum": 1},
                  time=ISO_TIME, status_code={"type": ["integer", "null"]},
                  duration_ms={"type": "integer", "minimum": 0}, error={"type": ["string", "null"]},
                  ok=BOOLEAN)
    return {
        "Webhook": obj(**hook),
        "WebhookResponse": obj(status={"const": True}, data=ref("Webhook")),
        "WebhookCreated": obj(status={"const": True}, data=obj(
            **hook, secret={"type": "string", "pattern": "^whsec_[A-Za-z0-9_-]{43}$",
                            "description": "The signing secret; shown only in this answer"})),
        "WebhookDelivery": attempt,
        "WebhookDeliveries": obj(status={"const": True},
                                 data={"type": "array", "items": ref("WebhookDelivery"), "maxItems": 50}),
        "WebhookEvent": obj(event={"const": "message.received"}, mailbox={"type": "string", "format": "email"},
                            message=ref("Message")),
    }


def webhook_paths() -> dict:
    body = {"required": True, "content": {
        "application/json": {"schema": obj(url={"type": "string", "format": "uri", "maxLength": 2048})}}}
    put = user_op("Set your webhook (returns its signing secret once)", "WebhookCreated", (401, 422, 429))
    return {
        "/api/webhook": {
            "put": dict(put, requestBody=body, description=(
                "http or https only; a URL whose host resolves to a loopback, private, link-local, "
                "multicast, reserved or unspecified address is refused (422). Each PUT makes a new secret.")),
            "get": user_op("Your webhook, without its secret", "WebhookResponse", (401, 404, 429)),
            "delete": user_op("Remove your webhook (events not yet delivered are dropped)", "Done",
                              (401, 404, 429))},
        "/api/webhook/deliveries": {"get": user_op(
            "The newest 50 delivery attempts, newest first", "WebhookDeliveries", (401, 404, 429))},
    }


def webhook_callbacks() -> dict:
    """OpenAPI 3.1 ``webhooks``: what TempMail sends to your URL."""
    header = {"TempMail-Signature": "t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\" keyed with "
                                    "your secret>",
              "TempMail-Delivery": "The event's id: the same on every retry of one event",
              "TempMail-Event": "message.received"}
    params = [{"name": name, "in": "header", "required": True, "schema": STRING, "description": text}
              for name, text in header.items()]
    return {"messageReceived": {"post": {
        "summary": "A message arrived in one of your mailboxes",
        "description": "Answer 2xx within 5 seconds. Anything else is retried with exponential "
                       "back-off for up to 24 hours; redirects are not followed.",
        "security": [], "parameters": params,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref("WebhookEvent")}}},
        "responses": {"2XX": {"description": "Received"}}}}}


def components() -> dict:
    count = {"schema": {"type": "integer", "minimum": 0}}
    return {
        "schemas": {**schemas(), **webhook_schemas()},
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "Your personal User API key (tm_...)"}},
        "headers": {
            "X-RateLimit-Limit": dict(count, description="Requests allowed this month"),
            "X-RateLimit-Used": dict(count, description="Successful (2xx) requests counted this month"),
            "X-RateLimit-Remaining": dict(count, description="Requests left this month"),
            "X-RateLimit-Reset": {"schema": ISO_TIME, "description": "Start of the next period, with offset"},
        },
    }


def document(base: str, domain: str, site_name: str) -> dict:
    """The whole OpenAPI document for the server at ``base``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{site_name} API", "version": "1.0.0",
                 "description": ("Two APIs: the api.php-compatible API (no key; every route also "
                                 "answers without the /api.php prefix) and the User API under /api "
                                 f"(Bearer key, monthly quota). Human-readable docs: {base}/docs"),
                 "license": {"name": "GPL-3.0-or-later", "identifier": "GPL-3.0-or-later"}},
        "servers": [{"url": base}],
        "tags": [{"name": "api.php", "description": "Compatible with the PHP TempMail api.php"},
                 {"name": "User API", "description": f"Mailboxes owned by your account, e.g. on {domain}"}],
        "security": [{"bearerAuth": []}],
        "paths": {**legacy_paths(), **user_paths(), **webhook_paths()},
        "webhooks": webhook_callbacks(),
        "components": components(),
    }
