"""Schema migrations: `flask db upgrade` on an empty database and on a filled
one made before migrations existed; create-on-first-start and Alembic agree."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask_migrate.cli import db as db_cli
from sqlalchemy import create_engine, inspect, select, text

import ops
from app import create_app, resolve_db_url
from conftest import ROOT, TEST_DOMAINS, dispose
from models import Domain, Mailbox, Message, db

HEAD = ScriptDirectory(str(ops.MIGRATIONS_DIR)).get_current_head()


@pytest.fixture
def fresh_url(backend, tmp_path, request):
    """An empty database of its own (the shared test database is wiped by app_factory)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/migrate.db"
    name = "tempmail_mig_" + request.node.name.split("[")[0][-40:].lower()
    return request.getfixturevalue("postgres").create_database(name)


@pytest.fixture
def make_app(fresh_url, tmp_path, clock):
    made = []

    def make():
        app = create_app({"TESTING": True, "CLOCK": clock, "FSYNC": False, "TEMPMAIL": {
            "database_url": fresh_url, "uploads_dir": str(tmp_path / "uploads"), "domains": TEST_DOMAINS}})
        made.append(app)
        return app
    yield make
    dispose(made)


def versions(conn) -> list[str]:
    return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def schema_diffs(conn) -> list:
    return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.metadata)


def drop_everything(app) -> None:
    with app.app_context():
        db.drop_all()
        with db.engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))


def test_upgrade_on_an_empty_database_builds_the_models_schema(make_app):
    app = make_app()
    drop_everything(app)  # run the revision scripts themselves, not create_all
    result = app.test_cli_runner().invoke(db_cli, ["upgrade"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.engine.connect() as conn:
        assert versions(conn) == [HEAD]
        assert schema_diffs(conn) == []
        assert ops.prepare_database() == "current"


def test_first_start_creates_and_stamps(make_app):
    app = make_app()
    with app.app_context(), db.engine.connect() as conn:
        assert versions(conn) == [HEAD]
        assert schema_diffs(conn) == []
    result = app.test_cli_runner().invoke(db_cli, ["upgrade"])
    assert result.exit_code == 0, result.output


def fill_like_the_previous_release(url: str) -> None:
    """Tables as ``db.create_all()`` made them before migrations existed (the
    schema of revision 0001, built by its own script), with data."""
    app = create_app({"TESTING": True, "TEMPMAIL": {"database_url": url, "domains": TEST_DOMAINS}})
    drop_everything(app)
    result = app.test_cli_runner().invoke(db_cli, ["upgrade", "0001"])
    assert result.exit_code == 0, result.output
    dispose([app])
    engine = create_engine(resolve_db_url(url))
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO domains (id, name, type, custom, active) "
                          "VALUES (1, 'example.com', 'free', false, true)"))
        conn.execute(text("INSERT INTO mailboxes (id, address, username, domain_id, token, created_at, "
                          "expires_at) VALUES (7, 'kept@example.com', 'kept', 1, 't', :c, :e)"),
                     {"c": datetime(2030, 1, 1), "e": datetime(2030, 1, 2)})
        conn.execute(text("INSERT INTO messages (id, public_id, mailbox_id, envelope_from, envelope_to, "
                          "from_email, from_name, \"to\", cc, subject, body_text, body_html, is_read, size, "
                          "received_at) VALUES (42, :p, 7, '', '', 'a@b.c', '', '', '', "
                          "'survives the upgrade', '', '', false, 1, :r)"),
                     {"p": "p" * 46, "r": datetime(2030, 1, 1)})
        conn.execute(text("INSERT INTO attachments (id, message_id, filename, stored_path, size, content_type, "
                          "inline) VALUES (5, 42, 'a.txt', '20300101/gone.bin', 1, 'text/plain', false)"))
    engine.dispose()


def test_upgrade_keeps_the_data_of_a_filled_database(fresh_url, make_app, config_file_for):
    fill_like_the_previous_release(fresh_url)
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file_for(fresh_url)))
    # the real command line, as the deployment guide tells an operator to run it
    proc = subprocess.run([str(ROOT / ".venv/bin/flask"), "--app", "app", "db", "upgrade"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    app = make_app()
    with app.app_context():
        assert db.session.scalar(select(Message.subject).where(Message.id == 42)) == "survives the upgrade"
        # batch mode's table copies on SQLite must not cascade-delete child rows
        assert db.session.scalar(text("SELECT count(*) FROM attachments WHERE message_id = 42")) == 1
        with db.engine.connect() as conn:
            assert versions(conn) == [HEAD]
            assert schema_diffs(conn) == []


@pytest.fixture
def config_file_for(tmp_path):
    def write(url: str):
        import json
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"database_url": url, "uploads_dir": str(tmp_path / "uploads"),
                                    "domains": TEST_DOMAINS, "secret_key": "test"}))
        return path
    return write


def test_pending_revision_is_reported_then_applied(make_app, tmp_path, monkeypatch):
    """A later release adds a revision: start-up says `behind` (and creates
    nothing behind Alembic's back); `flask init-db` upgrades, keeping rows."""
    app = make_app()
    with app.app_context():
        Mailbox.create("stays", Domain.by_name("example.com"), 3600)
    scripts = tmp_path / "migrations"
    shutil.copytree(ops.MIGRATIONS_DIR, scripts)
    (scripts / "versions" / "9999_probe.py").write_text(
        "from alembic import op\nimport sqlalchemy as sa\n"
        f"revision = 'probe'\ndown_revision = '{HEAD}'\nbranch_labels = None\ndepends_on = None\n\n"
        "def upgrade():\n    with op.batch_alter_table('mailboxes') as batch:\n"
        "        batch.add_column(sa.Column('probe', sa.Integer(), nullable=True))\n\n"
        "def downgrade():\n    with op.batch_alter_table('mailboxes') as batch:\n"
        "        batch.drop_column('probe')\n")
    monkeypatch.setattr(ops, "MIGRATIONS_DIR", scripts)
    with app.app_context():
        assert ops.prepare_database() == "behind"
        result = app.test_cli_runner().invoke(args=["init-db"])
        assert result.exit_code == 0 and "Database ready (upgraded)." in result.stdout, result.output
        columns = [c["name"] for c in inspect(db.engine).get_columns("mailboxes")]
        assert "probe" in columns
        assert db.session.scalar(select(Mailbox.address)) == "stays@example.com"
        with db.engine.connect() as conn:
            assert versions(conn) == ["probe"]


def test_workers_starting_together_agree(make_app):
    app = make_app()
    drop_everything(app)
    states, errors = [], []

    def start():
        try:
            with app.app_context():
                states.append(ops.prepare_database())
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(states) == ["created", "current", "current", "current"]
    with app.app_context(), db.engine.connect() as conn:
        assert versions(conn) == [HEAD]


def test_downgrade_before_message_sources_makes_each_one_a_blob_again(make_app):
    """0006's downgrade: the bytes of messages kept in rows of their own
    become blobs again, which the older code reads (two copies of the same
    bytes: one blob, counted twice)."""
    import mailhandler
    raw = b"Subject: own row\r\n\r\nthe same bytes twice\r\n"
    app = make_app()
    with app.app_context():
        boxes = [Mailbox.create(name, Domain.by_name("example.com"), 3600).address for name in ("one", "two")]
        shas = {m.raw_sha256 for box in boxes for m in mailhandler.deliver(raw, [box])}
        assert db.session.execute(text("SELECT count(*) FROM message_sources")).scalar() == 2
    dispose([app])
    result = app.test_cli_runner().invoke(db_cli, ["downgrade", "0005"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.engine.connect() as conn:
        assert versions(conn) == ["0005"] and "message_sources" not in inspect(conn).get_table_names()
        assert conn.execute(text("SELECT sha256, refs FROM blobs")).all() == [(shas.pop(), 2)]
        assert conn.execute(text("SELECT data FROM blob_chunks")).scalars().all() == [raw]


def test_downgrade_before_attachment_spans_makes_each_one_a_blob_again(make_app):
    """0007's downgrade: an attachment kept as a span of its message's own
    row becomes a blob of its decoded bytes, named by its digest, which the
    older code reads; down past 0006 too, everything is blobs."""
    import mailhandler
    from test_attachment_spans import decoded, span_message
    raw = span_message()
    want = decoded(raw)
    app = make_app()
    with app.app_context():
        (msg,) = mailhandler.deliver(raw, [Mailbox.create("spans", Domain.by_name("example.com"), 3600).address])
        assert sum(a.in_source for a in msg.attachments) == 4
    dispose([app])
    result = app.test_cli_runner().invoke(db_cli, ["downgrade", "0006"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.engine.connect() as conn:
        assert versions(conn) == ["0006"]
        assert "source_start" not in {c["name"] for c in inspect(conn).get_columns("attachments")}
        rows = conn.execute(text("SELECT filename, sha256 FROM attachments")).all()
        chunks = dict(conn.execute(text("SELECT sha256, data FROM blob_chunks")).all())
        assert {name: bytes(chunks[sha]) for name, sha in rows} == want
        assert {sha: hashlib.sha256(bytes(data)).hexdigest() for sha, data in chunks.items()} == \
            {sha: sha for sha in chunks}
    dispose([app])
    result = app.test_cli_runner().invoke(db_cli, ["downgrade", "0005"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.engine.connect() as conn:
        data = conn.execute(text("SELECT c.data FROM blob_chunks c JOIN messages m ON m.raw_sha256 = c.sha256"))
        assert [bytes(d) for d in data.scalars()] == [raw]


def test_downgrade_to_the_first_release_keeps_every_file_reachable(make_app):
    """0002's downgrade: rows name their blob's file by a path again, and the
    file is there (the database backend's chunks written out first)."""
    import mailhandler
    app = make_app()
    with app.app_context():
        box = Mailbox.create("downgrade", Domain.by_name("example.com"), 3600)
        (msg,) = mailhandler.deliver(b"Subject: d\r\nContent-Type: application/zip\r\n\r\nPK", [box.address])
        msg_id = msg.id
    dispose([app])
    result = app.test_cli_runner().invoke(db_cli, ["downgrade", "0001"])
    assert result.exit_code == 0, result.output
    with app.app_context(), db.engine.connect() as conn:
        rows = conn.execute(text("SELECT raw_path FROM messages WHERE id = :i"), {"i": msg_id}).all()
        assert rows, conn.execute(text("SELECT id FROM messages")).all()
        paths = [rows[0][0]] + list(conn.execute(text("SELECT stored_path FROM attachments")).scalars())
        assert versions(conn) == ["0001"]
    root = app.config["UPLOADS_DIR"]
    assert len(paths) == 2 and all(os.path.isfile(os.path.join(root, p)) for p in paths)
