"""mailevents in one process, on SQLite and PostgreSQL: what the HTTP tests
of tests/test_live.py cannot pin down reliably. Held requests give their
pooled connection back before they queue for the process's hub; the slot
limit answers 503 in each API's shape; the SQLite listener's socket folder
cleans up after a process that died."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

import mailevents
import mailhandler
from models import ApiKey, Mailbox, User, db


def store(app, address: str, subject: str = "hello") -> None:
    with app.app_context():
        mailhandler.store_message(Mailbox.find_live(address), {
            "from_email": "a@peer.test", "from_name": "A", "subject": subject, "body_text": "x",
            "envelope_to": address}, b"Subject: x\r\n\r\nx\r\n")


def api_key(app) -> dict:
    with app.app_context():
        _key, raw = ApiKey.issue(User.create("events@example.org"))
        db.session.commit()
    return {"Authorization": f"Bearer {raw}"}


def test_held_requests_queue_for_the_hub_without_a_pooled_connection(app, client, monkeypatch):
    """A thousand requests arriving at once would otherwise hold the whole
    pool while queueing behind the one that starts the listener, whose own
    first query then waits 30 s for a connection (seen: every one a 500)."""
    seen = []
    real_hub = mailevents.hub

    def spy():
        seen.append(db.session().in_transaction())
        return real_hub()
    monkeypatch.setattr(mailevents, "hub", spy)
    box = client.get("/api.php/generate").get_json()["email"]
    assert client.get(f"/api.php/inbox/{box}?wait=1").status_code == 200
    auth = api_key(app)
    user_box = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    assert client.get(f"/api/messages?email={user_box}&wait=1", headers=auth).status_code == 200
    resp = client.get(f"/api/messages/stream?email={user_box}", headers=auth, buffered=False)
    next(iter(resp.response))
    resp.close()
    assert seen == [False, False, False]


def test_the_held_request_limit_answers_503_in_each_apis_shape(app_factory):
    app = app_factory({"live": {"max_held_per_process": 1}})
    first, second = app.test_client(), app.test_client()
    box = first.get("/api.php/generate").get_json()["email"]
    auth = api_key(app)
    user_box = first.post("/api/emails", headers=auth).get_json()["data"]["email"]
    held = threading.Thread(target=lambda: first.get(f"/api.php/inbox/{box}?wait=3"))
    held.start()
    deadline = time.monotonic() + 10
    while mailevents.Slot.count < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        legacy = second.get(f"/api.php/inbox/{box}?wait=3")
        assert legacy.status_code == 503 and legacy.headers["Retry-After"] == "1"
        assert legacy.get_json() == {"success": False, "error": "Too many waiting requests. Try again in a moment."}
        for url in (f"/api/messages?email={user_box}&wait=3", f"/api/messages/stream?email={user_box}"):
            user = second.get(url, headers=auth)
            assert user.status_code == 503 and user.headers["Retry-After"] == "1", url
            assert user.get_json() == {"status": False, "message": "Too many waiting requests. Try again in a moment."}
            assert user.headers["X-RateLimit-Used"] == "1"  # refused: not counted (only the create was)
        assert second.get(f"/api.php/inbox/{box}").status_code == 200  # ordinary requests go on
    finally:
        held.join(10)
    assert mailevents.Slot.count == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_dead_processs_socket_is_removed_and_the_living_are_poked(app, client):
    """SQLite: the daemon's poke deletes the socket of a worker that died
    (nothing bound to it any more) and still reaches the live listener."""
    box = client.get("/api.php/generate").get_json()["email"]
    assert client.get(f"/api.php/inbox/{box}?wait=1").status_code == 200  # this process listens now
    with app.app_context():
        folder = mailevents.events_folder(db.engine)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(folder / "1-deadbeef.sock"))
    dead.close()  # the file stays, as after a SIGKILL
    assert "1-deadbeef.sock" in os.listdir(folder) and len(os.listdir(folder)) == 2
    waiter = threading.Thread(target=lambda: client.get(f"/api.php/inbox/{box}?wait=20"))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.3)
    store(app, box)
    waiter.join(30)
    assert time.monotonic() - started < 10  # woken by the poke, not by the 20 s
    assert os.listdir(folder) == [name for name in os.listdir(folder) if name != "1-deadbeef.sock"]
    assert len(os.listdir(folder)) == 1


def test_notification_payloads_are_read_defensively():
    assert mailevents.parse_ids("1,22,333") == [1, 22, 333]
    assert mailevents.parse_ids("x,-1,,1.5, 7,4") == [4]
    assert mailevents.parse_ids("9" * 40) == []
    assert mailevents.parse_ids("") == []
