"""Mail sent over a real SMTP connection to a mailbox made through the User API
shows up in ``/api/messages``, attachment included."""
from __future__ import annotations

import smtplib
from email.message import EmailMessage

from models import ApiKey, User, db
from smtpserver import MailServer


def test_smtp_mail_reaches_user_api_mailbox(app, client):
    with app.app_context():
        _key, raw = ApiKey.issue(User.create("smtp@example.org"))
        db.session.commit()
    headers = {"Authorization": f"Bearer {raw}", "Accept": "application/json"}
    address = client.post("/api/emails", headers=headers).get_json()["data"]["email"]

    mail = EmailMessage()
    mail["From"] = "Example Sender <hello@example.org>"
    mail["To"] = address
    mail["Subject"] = "Welcome to Temp Mail"
    mail.set_content("Hello from the inbox.")
    mail.add_alternative("<p>Hello from the inbox.</p>", subtype="html")
    mail.add_attachment(b"report bytes", maintype="application", subtype="octet-stream",
                        filename="report.bin")
    server = MailServer(app, "127.0.0.1", 0, purge=False).start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            refused = smtp.send_message(mail, from_addr="hello@example.org", to_addrs=[address])
    finally:
        server.stop()
    assert refused == {}

    body = client.get(f"/api/messages?email={address}", headers=headers).get_json()
    assert len(body["messages"]) == 1
    msg = body["messages"][0]
    assert (msg["subject"], msg["from"], msg["from_email"]) == \
        ("Welcome to Temp Mail", "Example Sender", "hello@example.org")
    assert msg["html"] is True and "Hello from the inbox." in msg["content"]
    assert [a["name"] for a in msg["attachments"]] == ["report.bin"]
    download = client.get(f"/api/messages/{msg['id']}/attachments/report.bin", headers=headers)
    assert download.status_code == 200 and download.data == b"report bytes"
