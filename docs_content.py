"""The facts shown on ``/docs``: every route of both APIs with its parameters,
JSON examples, error bodies and code samples in cURL, JavaScript, Python and PHP.

Everything here is language-neutral; the words around it come from the
catalogues in ``i18n/``. Samples and examples are built for the server that
renders them (its own base URL and first Free domain), so a reader can paste
them and they work.
"""
from __future__ import annotations

import hashlib
import hmac
import json

KEY = "YOUR_USER_API_KEY"
MSG_ID = "ap94AWDg123ELQz07vrVB9dLXlbqZM5NGwYxOJKko8n6m1"
SAMPLE_LANGS = (("curl", "cURL"), ("js", "JavaScript"), ("python", "Python"), ("php", "PHP"))


def pretty(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------
# code samples

def sample_curl(method: str, url: str, auth: bool, save_as: str | None = None) -> str:
    lines = [f"curl --request {method} \\", f"  --url '{url}' \\", "  --header 'Accept: application/json'"]
    if auth:
        lines[-1] += " \\"
        lines.append(f"  --header 'Authorization: Bearer {KEY}'")
    if save_as:
        lines[-1] += " \\"
        lines.append(f"  --output {save_as}")
    return "\n".join(lines)


def sample_js(method: str, url: str, auth: bool, save_as: str | None = None) -> str:
    headers = ([f"    'Authorization': 'Bearer {KEY}',"] if auth else []) + ["    'Accept': 'application/json',"]
    head = [f"const response = await fetch('{url}', {{", f"  method: '{method}',", "  headers: {",
            *headers, "  },", "});", "if (!response.ok) {",
            "  throw new Error(`Request failed with status ${response.status}`);", "}"]
    if save_as:
        tail = ["const blob = await response.blob();", "const link = document.createElement('a');",
                "link.href = URL.createObjectURL(blob);", f"link.download = '{save_as}';",
                "link.click();", "URL.revokeObjectURL(link.href);"]
    else:
        tail = ["const data = await response.json();", "console.log(data);"]
    return "\n".join(head + tail)


def sample_python(method: str, url: str, auth: bool, save_as: str | None = None) -> str:
    headers = ([f"    'Authorization': 'Bearer {KEY}',"] if auth else []) + ["    'Accept': 'application/json',"]
    call = f"response = requests.{method.lower()}('{url}', headers=headers, timeout=30"
    lines = ["import requests", "", "headers = {", *headers, "}", ""]
    if save_as:
        lines += [call + ", stream=True)", "response.raise_for_status()",
                  f"with open('{save_as}', 'wb') as handle:",
                  "    for chunk in response.iter_content(chunk_size=8192):", "        handle.write(chunk)"]
    else:
        lines += [call + ")", "response.raise_for_status()", "print(response.json())"]
    return "\n".join(lines)


def sample_php(method: str, url: str, auth: bool, save_as: str | None = None) -> str:
    headers = ([f"        'Authorization: Bearer {KEY}',"] if auth else []) + ["        'Accept: application/json',"]
    lines = ["<?php"]
    if save_as:
        lines.append(f"$file = fopen('{save_as}', 'w');")
    lines += [f"$ch = curl_init('{url}');", "curl_setopt_array($ch, [",
              f"    CURLOPT_CUSTOMREQUEST => '{method}',",
              "    CURLOPT_FILE => $file," if save_as else "    CURLOPT_RETURNTRANSFER => true,",
              "    CURLOPT_HTTPHEADER => [", *headers, "    ],", "]);",
              "$response = curl_exec($ch);", "if ($response === false) {",
              "    throw new RuntimeException(curl_error($ch));", "}",
              "$status = curl_getinfo($ch, CURLINFO_HTTP_CODE);", "curl_close($ch);"]
    lines.append("fclose($file);" if save_as else "var_dump($status, json_decode($response, true));")
    return "\n".join(lines)


def samples(method: str, url: str, auth: bool, save_as: str | None = None) -> list[tuple]:
    """(id, label, code) for each sample language, in tab order."""
    makers = {"curl": sample_curl, "js": sample_js, "python": sample_python, "php": sample_php}
    return [(sid, label, makers[sid](method, url, auth, save_as)) for sid, label in SAMPLE_LANGS]


# --------------------------------------------------------------------------
# routes

def param(name: str, where: str, type_: str, required: bool, desc: str) -> dict:
    return {"name": name, "in": where, "type": type_, "required": required, "desc": desc}


def route(rid, method, path, url, desc, auth, params=(), ok=None, errors=(), note=None, save_as=None,
          statuses=(), code=None) -> dict:
    """One documented route: ``url`` is the full sample URL, ``ok`` the success body
    (None for a file download, text as it is for a stream), ``errors`` (status,
    label key, body) examples, ``statuses`` the User API error codes that apply
    (explained in the codes table), ``code`` samples of its own (else made from ``url``)."""
    shown = ok if isinstance(ok, str) else pretty(ok) if ok is not None else None
    return {"id": rid, "method": method, "path": path, "desc": desc, "params": list(params), "note": note,
            "samples": code or samples(method, url, auth, save_as), "ok": shown,
            "errors": [(status, label, pretty(body)) for status, label, body in errors],
            "statuses": sorted(statuses)}


def legacy_routes(base: str, domain: str) -> list[dict]:
    """API 1 (``api.php``), in the order of the original documentation."""
    api = base + "/api.php"
    box = f"johnsmith@{domain}"
    not_found = {"error": "Email not found"}
    return [
        route("legacy-generate", "GET", "/generate", f"{api}/generate?username=johnsmith", "d_generate", False,
              [param("username", "query", "string", False, "p_username"),
               param("domain", "query", "string", False, "p_domain_legacy")],
              {"success": True, "email": box, "username": "johnsmith", "domain": domain,
               "expires_at": "2026-01-25 14:30:00"},
              [(400, "e_invalid_username", {"success": False,
                                            "error": "Invalid username. Use 3-20 alphanumeric characters only."}),
               (400, "e_reserved", {"success": False, "error": "This username is reserved and cannot be used."}),
               (409, "e_taken", {"success": False, "error": "Username already taken. Please choose another one."}),
               (400, "e_invalid_domain", {"success": False,
                                          "error": "Invalid domain. Use one of the domains listed by /domains."}),
               (500, "e_config", {"error": "Config not found"})],
              note="n_reserved"),
        route("legacy-inbox", "GET", "/inbox/{email}", f"{api}/inbox/{box}", "d_inbox", False,
              [param("email", "path", "string", True, "p_email_path"),
               param("limit", "query", "integer", False, "p_limit"),
               param("offset", "query", "integer", False, "p_offset")],
              {"success": True, "email": box, "created_at": "2026-01-24 14:30:00",
               "expires_at": "2026-01-25 14:30:00", "total": 2, "emails": [
                   {"id": 1, "from_email": "sender@example.org", "from_name": "John Doe", "subject": "Welcome!",
                    "is_read": 0, "received_at": "2026-01-24 14:35:00"},
                   {"id": 2, "from_email": "noreply@service.example", "from_name": "Service",
                    "subject": "Verify your email", "is_read": 1, "received_at": "2026-01-24 14:40:00"}]},
              [(404, "e_not_found", {"error": "Email not found", "searched_for": f"test@{domain}",
                                     "hint": "Generate this email first via /generate endpoint"}),
               (400, "e_invalid_number", {"success": False,
                                          "error": "Invalid limit. Use a whole number from 0 to 1000."})]),
        route("legacy-inbox-wait", "GET", "/inbox/{email}?wait=S&since=ID", f"{api}/inbox/{box}?wait=20&since=2",
              "d_inbox_wait", False,
              [param("email", "path", "string", True, "p_email_path"),
               param("wait", "query", "integer", True, "p_wait"),
               param("since", "query", "integer", False, "p_since_legacy")],
              {"success": True, "email": box, "created_at": "2026-01-24 14:30:00",
               "expires_at": "2026-01-25 14:30:00", "total": 3, "emails": [
                   {"id": 1, "from_email": "sender@example.org", "from_name": "John Doe", "subject": "Welcome!",
                    "is_read": 0, "received_at": "2026-01-24 14:35:00"},
                   {"id": 2, "from_email": "noreply@service.example", "from_name": "Service",
                    "subject": "Verify your email", "is_read": 1, "received_at": "2026-01-24 14:40:00"},
                   {"id": 7, "from_email": "noreply@service.example", "from_name": "Service",
                    "subject": "Your code is 482913", "is_read": 0, "received_at": "2026-01-24 14:41:07"}]},
              [(400, "e_invalid_wait", {"success": False,
                                        "error": "Invalid wait. Use a whole number from 0 to 60."}),
               (503, "e_busy", {"success": False, "error": "Too many waiting requests. Try again in a moment."})],
              note="n_wait_legacy"),
        route("legacy-email", "GET", "/email/{id}", f"{api}/email/1", "d_email", False,
              [param("id", "path", "integer", True, "p_id")],
              {"success": True, "email": {
                  "id": 1, "email_address_id": 1, "from_email": "sender@example.org", "from_name": "John Doe",
                  "subject": "Welcome!", "body_text": "Hello, welcome to our service!",
                  "body_html": "<h1>Welcome!</h1><p>Hello, welcome to our service!</p>", "is_read": 1,
                  "received_at": "2026-01-24 14:35:00"},
               "attachments": [{"id": 1, "filename": "document.pdf", "size": 102400,
                                "content_type": "application/pdf",
                                "file_path": "/uploads/attachments/1/document.pdf"}]},
              [(404, "e_message_missing", not_found)], note="n_marks_read"),
        route("legacy-delete", "DELETE", "/email/{id}", f"{api}/email/1", "d_email_delete", False,
              [param("id", "path", "integer", True, "p_id")], {"success": True, "deleted_id": "1"},
              [(404, "e_message_missing", not_found)]),
        route("legacy-attachment", "GET", "/uploads/attachments/{id}/{filename}",
              f"{base}/uploads/attachments/1/document.pdf", "d_legacy_attachment", False,
              [param("id", "path", "integer", True, "p_attachment_id"),
               param("filename", "path", "string", True, "p_filename")], None,
              [(404, "e_attachment_missing", {"error": "Attachment not found"})], save_as="document.pdf"),
        route("legacy-stats", "GET", "/stats", f"{api}/stats", "d_stats", False, [],
              {"success": True, "stats": {"id": 1, "total_emails": 1250, "total_addresses": 450,
                                          "total_received": 3200, "last_updated": "2026-01-24 14:30:00"}}),
        route("legacy-domains", "GET", "/domains", f"{api}/domains", "d_domains", False, [],
              {"success": True, "domains": [domain]}, [(500, "e_config", {"error": "Config not found"})]),
    ]


def message_example(base: str, domain: str, seen: bool) -> dict:
    return {"is_seen": seen, "subject": "Welcome to Temp Mail", "from": "Example Sender",
            "from_email": "hello@example.org", "to": f"randombox@{domain}", "receivedAt": "2026-06-07 19:37:26",
            "id": MSG_ID, "html": True, "content": "<p>Hello from the inbox.</p>",
            "attachments": [{"name": "file.txt", "extension": "txt", "size": 91,
                             "url": f"{base}/api/messages/{MSG_ID}/attachments/file.txt"}]}


NEW_ID = "Kq7pZ2mXvT4rLw9sYb3NcJ8hFd6GaE1uQo5iRt0kPyVnMx"


def stream_example(base: str, domain: str) -> str:
    """What a stream sends: its first line, one message, a heartbeat."""
    data = dict(message_example(base, domain, False), id=NEW_ID, subject="Your code is 482913", html=False,
                attachments=[])
    del data["content"]
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"retry: 2000\n: connected\n\nid: {NEW_ID}\nevent: message\ndata: {body}\n\n: heartbeat\n"


def filter_params() -> list[dict]:
    return [param("from", "query", "string", False, "p_from"),
            param("subject", "query", "string", False, "p_subject"),
            param("tag", "query", "string", False, "p_tag")]


def stream_samples(url: str) -> list[tuple]:
    """Reading the stream in each sample language (browsers' EventSource
    cannot send the Authorization header, so JavaScript reads it with fetch)."""
    code = {"curl": STREAM_CURL, "js": STREAM_JS, "python": STREAM_PYTHON, "php": STREAM_PHP}
    return [(sid, label, code[sid].replace("%URL%", url).replace("%KEY%", KEY)) for sid, label in SAMPLE_LANGS]


STREAM_CURL = """curl --no-buffer \\
  --url '%URL%' \\
  --header 'Accept: text/event-stream' \\
  --header 'Authorization: Bearer %KEY%'"""

STREAM_JS = """const response = await fetch('%URL%', {
  headers: {
    'Authorization': 'Bearer %KEY%',
    'Accept': 'text/event-stream',
  },
});
const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
let buffer = '';
for (;;) {
  const { value, done } = await reader.read();
  if (done) break;
  buffer += value;
  let end;
  while ((end = buffer.indexOf('\\n\\n')) >= 0) {
    const block = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    const data = block.split('\\n').find((line) => line.startsWith('data: '));
    if (block.includes('event: message') && data) {
      console.log(JSON.parse(data.slice(6)));  // resume later with its id as Last-Event-ID
    }
  }
}"""

STREAM_PYTHON = """import json
import requests

headers = {
    'Authorization': 'Bearer %KEY%',
    'Accept': 'text/event-stream',
}
last_id = None  # send as Last-Event-ID when reconnecting
with requests.get('%URL%', headers=headers, stream=True, timeout=(10, 60)) as response:
    response.raise_for_status()
    event = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == '':  # a blank line ends an event
            if event.get('event') == 'message':
                last_id = event['id']
                print(json.loads(event['data']))
            event = {}
        elif not line.startswith(':'):  # ': heartbeat' lines are comments
            field, _, value = line.partition(': ')
            event[field] = value"""

STREAM_PHP = """<?php
$buffer = '';
$ch = curl_init('%URL%');
curl_setopt_array($ch, [
    CURLOPT_HTTPHEADER => [
        'Authorization: Bearer %KEY%',
        'Accept: text/event-stream',
    ],
    CURLOPT_WRITEFUNCTION => function ($ch, $chunk) use (&$buffer) {
        $buffer .= $chunk;
        while (($end = strpos($buffer, "\\n\\n")) !== false) {
            $block = substr($buffer, 0, $end);
            $buffer = substr($buffer, $end + 2);
            if (preg_match('/^event: message$/m', $block) && preg_match('/^data: (.*)$/m', $block, $m)) {
                var_dump(json_decode($m[1], true));
            }
        }
        return strlen($chunk);
    },
]);
curl_exec($ch);
curl_close($ch);"""


def mailbox_example(box_id: int, address: str, domain: str) -> dict:
    return {"id": box_id, "email": address, "domain": domain, "expire_at": "2026-06-07T19:47:26+00:00",
            "expires_in_seconds": 600, "created_at": "2026-06-07T19:37:26+00:00",
            "email_token": "encrypted-email-token"}


def user_routes(base: str, domain: str) -> list[dict]:
    """API 2 (the User API), in the order of the seeds."""
    api = base + "/api"
    box = f"demo123@{domain}"
    common = (401, 429)
    return [
        route("user-domains", "GET", "/domains", f"{api}/domains?type=free", "d_user_domains", True,
              [param("type", "query", "free | premium | all", False, "p_type")],
              {"status": True, "data": {"requested_type": "free", "allowed_types": ["free"],
                                        "domains": [{"domain": domain, "type": "Free", "custom": False}]}},
              statuses=(*common, 403, 422)),
        route("user-create", "POST", "/emails", f"{api}/emails", "d_user_create", True, [],
              {"status": True, "data": mailbox_example(2301, f"randombox@{domain}", domain)},
              note="n_email_token", statuses=(*common, 403)),
        route("user-switch", "POST", "/emails/{current}/{username}/{domain}",
              f"{api}/emails/current@{domain}/demo123/{domain}", "d_user_switch", True,
              [param("current", "path", "string", True, "p_current"),
               param("username", "path", "string", True, "p_new_username"),
               param("domain", "path", "string", True, "p_new_domain")],
              {"status": True, "data": mailbox_example(2302, box, domain)}, statuses=(*common, 403, 404, 422)),
        route("user-delete", "DELETE", "/emails/{email}", f"{api}/emails/{box}", "d_user_delete", True,
              [param("email", "path", "string", True, "p_owned_email")],
              {"status": True, "message": "Email has been successfully deleted."}, statuses=(*common, 404)),
        route("user-messages", "GET", "/messages", f"{api}/messages?email={box}", "d_user_messages", True,
              [param("email", "query", "string", True, "p_owned_email")],
              {"status": True, "mailbox": f"randombox@{domain}",
               "messages": [message_example(base, domain, False)]}, statuses=(*common, 404, 422)),
        route("user-messages-wait", "GET", "/messages?email=…&wait=S&since=ID",
              f"{api}/messages?email={box}&wait=20&subject=code&since={MSG_ID}", "d_user_messages_wait", True,
              [param("email", "query", "string", True, "p_owned_email"),
               param("wait", "query", "integer", True, "p_wait"),
               param("since", "query", "string", False, "p_since_user"),
               *filter_params()],
              {"status": True, "mailbox": f"randombox@{domain}",
               "messages": [dict(message_example(base, domain, False), id=NEW_ID, subject="Your code is 482913",
                                 html=False, content="Your code is 482913.", attachments=[])]},
              note="n_wait_user", statuses=(*common, 404, 422, 503)),
        route("user-stream", "GET", "/messages/stream", f"{api}/messages/stream?email={box}",
              "d_user_stream", True,
              [param("email", "query", "string", True, "p_owned_email"),
               param("Last-Event-ID", "header", "string", False, "p_last_event_id"),
               param("since", "query", "string", False, "p_since_stream"), *filter_params()],
              stream_example(base, domain), note="n_stream", statuses=(*common, 403, 404, 422, 503),
              code=stream_samples(f"{api}/messages/stream?email={box}")),
        route("user-message", "GET", "/messages/{id}", f"{api}/messages/{MSG_ID}", "d_user_message", True,
              [param("id", "path", "string", True, "p_message_id")],
              {"status": True, "data": message_example(base, domain, True)}, note="n_marks_read",
              statuses=(*common, 404)),
        route("user-message-extract", "GET", "/messages/{id}/extract", f"{api}/messages/{MSG_ID}/extract",
              "d_user_extract", True, [param("id", "path", "string", True, "p_message_id")],
              {"status": True, "data": {"codes": ["482913"], "links": [
                  {"url": "https://service.example/verify?token=6f1c2e9a", "text": "Verify email address",
                   "kind": "verify"},
                  {"url": "https://service.example/unsubscribe?u=42", "text": "Unsubscribe", "kind": "unsubscribe"}]}},
              note="n_extract", statuses=(*common, 404)),
        route("user-message-delete", "DELETE", "/messages/{id}", f"{api}/messages/{MSG_ID}",
              "d_user_message_delete", True, [param("id", "path", "string", True, "p_message_id")],
              {"status": True, "message": "Message was deleted successfully."}, statuses=(*common, 404)),
        route("user-attachment", "GET", "/messages/{id}/attachments/{name}",
              f"{api}/messages/{MSG_ID}/attachments/file.txt", "d_user_attachment", True,
              [param("id", "path", "string", True, "p_message_id"),
               param("name", "path", "string", True, "p_attachment_name")], None,
              save_as="file.txt", statuses=(*common, 404)),
    ]


# status, meaning key, example body: the User API's response codes
USER_CODES = [
    (200, "c200", None),
    (401, "c401", {"status": False, "message": "Invalid or revoked API key."}),
    (403, "c403", {"status": False, "message": "Your plan does not allow premium domains."}),
    (404, "c404", {"status": False, "message": "Email not found."}),
    (405, "c405", {"status": False, "message": "Method not allowed."}),
    (422, "c422", {"status": False, "message": "Username already taken. Please choose another one."}),
    (429, "c429", {"status": False, "message": "Monthly request quota exhausted. It resets at 2026-05-01T00:00:00+05:00."}),
    (500, "c500", {"status": False, "message": "Internal server error."}),
    (503, "c503", {"status": False, "message": "Too many waiting requests. Try again in a moment."}),
]


def build(base: str, domain: str) -> dict:
    """Everything language-neutral the docs template needs."""
    return {"legacy": legacy_routes(base, domain), "user": user_routes(base, domain) + webhook_routes(base),
            "webhook": webhook_doc(base, domain),
            "codes": [(status, key, pretty(body) if body else None) for status, key, body in USER_CODES]}


# --------------------------------------------------------------------------
# webhooks: the routes (PUT sends a JSON body) and the receiver's side

HOOK_URL = "https://your-app.example/tempmail-webhook"
EXAMPLE_SECRET = "whsec_your_signing_secret"
EXAMPLE_TIME = 1767225600


def json_curl(method: str, url: str, body: dict) -> str:
    return "\n".join([f"curl --request {method} \\", f"  --url '{url}' \\", "  --header 'Accept: application/json' \\",
                      f"  --header 'Authorization: Bearer {KEY}' \\",
                      "  --header 'Content-Type: application/json' \\", f"  --data '{json.dumps(body)}'"])


def json_js(method: str, url: str, body: dict) -> str:
    return "\n".join([f"const response = await fetch('{url}', {{", f"  method: '{method}',", "  headers: {",
                      f"    'Authorization': 'Bearer {KEY}',", "    'Accept': 'application/json',",
                      "    'Content-Type': 'application/json',", "  },", f"  body: JSON.stringify({json.dumps(body)}),",
                      "});", "if (!response.ok) {",
                      "  throw new Error(`Request failed with status ${response.status}`);", "}",
                      "const data = await response.json();", "console.log(data);"])


def json_python(method: str, url: str, body: dict) -> str:
    return "\n".join(["import requests", "", "headers = {", f"    'Authorization': 'Bearer {KEY}',",
                      "    'Accept': 'application/json',", "}", "",
                      f"response = requests.{method.lower()}('{url}', headers=headers, json={body!r}, timeout=30)",
                      "response.raise_for_status()", "print(response.json())"])


def json_php(method: str, url: str, body: dict) -> str:
    fields = ", ".join(f"'{k}' => '{v}'" for k, v in body.items())
    return "\n".join(["<?php", f"$ch = curl_init('{url}');", "curl_setopt_array($ch, [",
                      f"    CURLOPT_CUSTOMREQUEST => '{method}',", "    CURLOPT_RETURNTRANSFER => true,",
                      f"    CURLOPT_POSTFIELDS => json_encode([{fields}]),", "    CURLOPT_HTTPHEADER => [",
                      f"        'Authorization: Bearer {KEY}',", "        'Accept: application/json',",
                      "        'Content-Type: application/json',", "    ],", "]);",
                      "$response = curl_exec($ch);", "if ($response === false) {",
                      "    throw new RuntimeException(curl_error($ch));", "}",
                      "$status = curl_getinfo($ch, CURLINFO_HTTP_CODE);", "curl_close($ch);",
                      "var_dump($status, json_decode($response, true));"])


def json_samples(method: str, url: str, body: dict) -> list[tuple]:
    """(id, label, code) of a call with a JSON body, in the same tabs as the others."""
    makers = {"curl": json_curl, "js": json_js, "python": json_python, "php": json_php}
    return [(sid, label, makers[sid](method, url, body)) for sid, label in SAMPLE_LANGS]


def webhook_routes(base: str) -> list[dict]:
    """The webhook routes of the User API."""
    api = base + "/api"
    common = (401, 429)
    hook = {"url": HOOK_URL, "created_at": "2026-06-07T19:37:26+00:00", "pending": 0}
    put = route("user-webhook-put", "PUT", "/webhook", f"{api}/webhook", "d_user_webhook_put", True,
                [param("url", "body", "string", True, "p_webhook_url")],
                {"status": True, "data": dict(hook, secret="whsec_" + "x" * 43)},
                note="n_webhook_secret", statuses=(*common, 422))
    put["samples"] = json_samples("PUT", f"{api}/webhook", {"url": HOOK_URL})
    return [
        put,
        route("user-webhook-get", "GET", "/webhook", f"{api}/webhook", "d_user_webhook_get", True, [],
              {"status": True, "data": hook}, statuses=(*common, 404)),
        route("user-webhook-delete", "DELETE", "/webhook", f"{api}/webhook", "d_user_webhook_delete", True, [],
              {"status": True, "message": "Webhook was removed."}, statuses=(*common, 404)),
        route("user-webhook-deliveries", "GET", "/webhook/deliveries", f"{api}/webhook/deliveries",
              "d_user_webhook_deliveries", True, [],
              {"status": True, "data": [
                  {"delivery_id": "4f2a0c9e1b7d4e6a8c3b5d7f9e1a2c4b", "event": "message.received", "attempt": 2,
                   "time": "2026-06-07T19:38:02+00:00", "status_code": 204, "duration_ms": 41, "error": None,
                   "ok": True},
                  {"delivery_id": "4f2a0c9e1b7d4e6a8c3b5d7f9e1a2c4b", "event": "message.received", "attempt": 1,
                   "time": "2026-06-07T19:37:27+00:00", "status_code": 503, "duration_ms": 118,
                   "error": "HTTP 503", "ok": False}]},
              statuses=(*common, 404)),
    ]


VERIFY_CURL = """# Send your receiver a signed test event, exactly as TempMail signs one.
SECRET='{secret}'
BODY='{body}'
T=$(date +%s)
SIG=$(printf '%s.%s' "$T" "$BODY" | openssl dgst -sha256 -hmac "$SECRET" | sed 's/^.*= //')
curl --request POST \\
  --url '{url}' \\
  --header 'Content-Type: application/json' \\
  --header "TempMail-Signature: t=$T,v1=$SIG" \\
  --header 'TempMail-Delivery: 00000000000000000000000000000000' \\
  --header 'TempMail-Event: message.received' \\
  --data "$BODY"
""".rstrip("\n")

VERIFY_JS = """const crypto = require('crypto');
const http = require('http');

const SECRET = process.env.TEMPMAIL_WEBHOOK_SECRET; // whsec_..., from PUT /api/webhook

function verifySignature(secret, header, body, toleranceSeconds = 300) {
  const fields = Object.fromEntries(header.split(',').map((item) => {
    const at = item.indexOf('=');
    return [item.slice(0, at), item.slice(at + 1)];
  }));
  const timestamp = Number(fields.t);
  if (!Number.isInteger(timestamp) || typeof fields.v1 !== 'string') return false;
  if (Math.abs(Date.now() / 1000 - timestamp) > toleranceSeconds) return false; // an old delivery, replayed
  const expected = crypto.createHmac('sha256', secret).update(`${timestamp}.`).update(body).digest();
  const given = Buffer.from(fields.v1, 'hex');
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    const body = Buffer.concat(chunks); // the raw bytes: parse the JSON only after the check
    if (!verifySignature(SECRET, req.headers['tempmail-signature'] || '', body)) {
      res.writeHead(400).end();
      return;
    }
    const event = JSON.parse(body);
    // A retry repeats the TempMail-Delivery id: handle each id once.
    console.log(req.headers['tempmail-delivery'], event.mailbox, event.message.subject);
    res.writeHead(204).end();
  });
}).listen(Number(process.env.PORT || 8080));"""

VERIFY_PYTHON = """import hashlib
import hmac
import json
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ['TEMPMAIL_WEBHOOK_SECRET']  # whsec_..., from PUT /api/webhook


def verify_signature(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    \"\"\"True when the TempMail-Signature header was made for this very body.\"\"\"
    try:
        fields = dict(item.split('=', 1) for item in header.split(','))
        timestamp = int(fields['t'])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False  # an old delivery, replayed
    expected = hmac.new(secret.encode(), f'{timestamp}.'.encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), fields.get('v1', '').encode())


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', 0)))  # the raw bytes
        if not verify_signature(SECRET, self.headers.get('TempMail-Signature', ''), body):
            self.send_response(400)
            self.end_headers()
            return
        event = json.loads(body)
        # A retry repeats the TempMail-Delivery id: handle each id once.
        print(self.headers['TempMail-Delivery'], event['mailbox'], event['message']['subject'], flush=True)
        self.send_response(204)
        self.end_headers()


HTTPServer(('', int(os.environ.get('PORT', '8080'))), Receiver).serve_forever()"""

VERIFY_PHP = """<?php
// The secret (whsec_...) from PUT /api/webhook, in the environment of PHP.
function verify_signature(string $secret, string $header, string $body, int $tolerance = 300): bool
{
    $fields = [];
    foreach (explode(',', $header) as $item) {
        $pair = explode('=', $item, 2);
        if (count($pair) === 2) {
            $fields[$pair[0]] = $pair[1];
        }
    }
    if (!isset($fields['t'], $fields['v1']) || !ctype_digit($fields['t'])) {
        return false;
    }
    if (abs(time() - (int) $fields['t']) > $tolerance) {
        return false; // an old delivery, replayed
    }
    $expected = hash_hmac('sha256', $fields['t'] . '.' . $body, $secret);
    return hash_equals($expected, $fields['v1']);
}

$body = file_get_contents('php://input'); // the raw bytes: decode the JSON only after the check
$header = $_SERVER['HTTP_TEMPMAIL_SIGNATURE'] ?? '';
if (!verify_signature((string) getenv('TEMPMAIL_WEBHOOK_SECRET'), $header, $body)) {
    http_response_code(400);
    exit;
}
$event = json_decode($body, true);
// A retry repeats the TempMail-Delivery id: handle each id once.
error_log($_SERVER['HTTP_TEMPMAIL_DELIVERY'] . ' ' . $event['mailbox'] . ' ' . $event['message']['subject']);
http_response_code(204);"""


def example_event(base: str, domain: str) -> dict:
    return {"event": "message.received", "mailbox": f"randombox@{domain}",
            "message": message_example(base, domain, False)}


def webhook_doc(base: str, domain: str) -> dict:
    """The receiver's side: an example event with its real signature, and
    receivers that verify it (the cURL tab signs and sends a test event)."""
    compact = json.dumps(example_event(base, domain), separators=(",", ":"))
    mac = hmac.new(EXAMPLE_SECRET.encode(), f"{EXAMPLE_TIME}.{compact}".encode(), hashlib.sha256).hexdigest()
    test_body = json.dumps({"event": "message.received", "mailbox": f"demo123@{domain}",
                            "message": {"subject": "Test event"}}, separators=(",", ":"))
    code = {"curl": VERIFY_CURL.format(secret=EXAMPLE_SECRET, body=test_body, url=HOOK_URL),
            "js": VERIFY_JS, "python": VERIFY_PYTHON, "php": VERIFY_PHP}
    return {"payload": pretty(example_event(base, domain)), "signature": f"t={EXAMPLE_TIME},v1={mac}",
            "verify": {"id": "webhook-verify", "samples": [(sid, label, code[sid]) for sid, label in SAMPLE_LANGS]}}
