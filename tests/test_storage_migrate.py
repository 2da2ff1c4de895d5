"""``flask storage migrate --to database|filesystem`` on both databases: the
documented procedure (copy while mail arrives, switch the configuration,
run again to catch up and drop the old copies) with every message readable
at each step, and a run SIGKILLed half-way that a second run completes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

import mailhandler
import retention
import storage
from conftest import ROOT
from models import Blob, BlobChunk, Domain, Mailbox, Message, db

DIRECTIONS = [("filesystem", "database"), ("database", "filesystem")]


def store_some(box: Mailbox, count: int, parts: int = 2, size: int = 4096, tag: str = "m") -> list[int]:
    """``count`` messages with ``parts`` random attachments each; their ids."""
    ids = []
    for n in range(count):
        atts = [{"filename": f"a{i}.bin", "data": os.urandom(size)} for i in range(parts)]
        raw = f"Subject: {tag}{n}\r\n\r\nbody {tag}{n}\r\n".encode()
        ids.append(mailhandler.store_message(box, {"subject": f"{tag}{n}"}, raw, atts).id)
    return ids


def every_blob_reads_back() -> int:
    """Each blob row's bytes hash to its name; returns how many were checked."""
    names = list(db.session.scalars(select(Blob.sha256)))
    for sha in names:
        assert hashlib.sha256(storage.read(sha)).hexdigest() == sha
    return len(names)


def held_by(backend: str) -> set[str]:
    """The blob names ``backend`` holds a copy of."""
    if backend == "database":
        return set(db.session.scalars(select(BlobChunk.sha256).distinct()))
    root = storage.uploads_dir() / "blobs"
    # A .tmp file is a copy a kill cut short: never a blob (the orphan sweep removes it).
    if not root.exists():
        return set()
    return {p.name for p in root.rglob("*") if p.is_file() and storage.is_blob_name(p.name)}


def download_all(app, ids: list[int]) -> None:
    """Every attachment of these messages downloads through api.php, whole."""
    with app.app_context():
        atts = [a for i in ids for a in db.session.get(Message, i).attachments]
        urls = [(a.legacy_url(), a.sha256) for a in atts]
    client = app.test_client()
    for url, sha in urls:
        resp = client.get(url)
        assert resp.status_code == 200 and hashlib.sha256(resp.data).hexdigest() == sha


@pytest.mark.parametrize("source,target", DIRECTIONS)
def test_migrate_while_mail_arrives_then_switch_and_catch_up(app_factory, source, target):
    old = app_factory({"storage": {"backend": source, "inline_max_bytes": 0}})
    with old.app_context():
        box = Mailbox.create("moving", Domain.by_name("example.com"), 7200)
        first = store_some(box, 5)
        total = db.session.scalar(select(func.count(Blob.sha256)))
    result = old.test_cli_runner().invoke(args=["storage", "migrate", "--to", target])
    assert result.exit_code == 0, result.output
    assert f"copied {total} blobs" in result.output and "0 old copies removed" in result.output
    assert f'"storage": {{"backend": "{target}"}}' in result.output
    with old.app_context():
        assert held_by(target) == held_by(source) == set(db.session.scalars(select(Blob.sha256)))
        # Mail keeps arriving on the old backend between the two runs.
        later = store_some(db.session.get(Mailbox, box.id), 3, tag="late")
        # Two parts each, and the raw unless the database backend kept it in a row of its own.
        late = db.session.scalar(select(func.count(Blob.sha256))) - total
        db.session.rollback()
    new = app_factory({"storage": {"backend": target, "inline_max_bytes": 0}})
    download_all(new, first + later)  # the late blobs are read from the old backend meanwhile
    with new.app_context():  # a late message deleted before the catch-up takes its old copies along
        doomed = db.session.get(Message, later.pop())
        # Its raw bytes are a blob unless the database backend kept them in a row of their own.
        raw_blob = {doomed.raw_sha256} if storage.own_source(doomed.id) is None else set()
        gone = raw_blob | {a.sha256 for a in doomed.attachments}
        storage.commit_removal(doomed.delete())
        assert not gone & (held_by("database") | held_by("filesystem"))
        late -= len(gone)
    result = new.test_cli_runner().invoke(args=["storage", "migrate", "--to", target])
    assert result.exit_code == 0, result.output
    assert f"copied {late} blobs" in result.output and f"{total + late} old copies removed" in result.output
    with new.app_context():
        assert held_by(source) == set() and every_blob_reads_back() == total + late
        assert held_by(target) == set(db.session.scalars(select(Blob.sha256)))
    download_all(new, first + later)
    again = new.test_cli_runner().invoke(args=["storage", "migrate", "--to", target])
    assert again.exit_code == 0 and f"{total + late} already there" in again.output


def test_migrating_to_the_filesystem_keeps_small_blobs_as_rows(app_factory):
    """With ``storage.inline_max_bytes`` (128 KiB as shipped) the filesystem
    backend keeps small blobs as rows: moving there from the database backend
    writes only the large ones out as files, and every blob reads back."""
    old = app_factory({"storage": {"backend": "database"}})
    with old.app_context():
        box = Mailbox.create("mixed", Domain.by_name("example.com"), 7200)
        ids = store_some(box, 2, parts=1, size=4096) + store_some(box, 2, parts=1, size=300_000, tag="big")
        sizes = dict(db.session.execute(select(Blob.sha256, Blob.size)).all())
    new = app_factory({"storage": {"backend": "filesystem"}})
    for _ in range(2):  # the second run finds everything in place
        result = new.test_cli_runner().invoke(args=["storage", "migrate", "--to", "filesystem"])
        assert result.exit_code == 0, result.output
    with new.app_context():
        big = {sha for sha, size in sizes.items() if size > 128 * 1024}
        assert len(big) == 2 and held_by("filesystem") == big
        assert held_by("database") == set(sizes) - big
        assert every_blob_reads_back() == len(sizes)
    download_all(new, ids)


def test_migrate_reports_missing_and_corrupt_blobs(app_factory):
    app = app_factory({"storage": {"inline_max_bytes": 0}})
    with app.app_context():
        box = Mailbox.create("damaged", Domain.by_name("example.com"), 7200)
        msg = db.session.get(Message, store_some(box, 1)[0])
        lost, bad = msg.attachments[0].sha256, msg.attachments[1].sha256
        storage.blob_path(lost).unlink()
        storage.blob_path(bad).write_bytes(b"not what was stored")
    result = app.test_cli_runner().invoke(args=["storage", "migrate", "--to", "database"])
    assert result.exit_code == 1
    assert f"1 blobs missing (left as they are): {lost}" in result.output
    assert f"1 blobs corrupt (left as they are): {bad}" in result.output
    with app.app_context():
        assert held_by("database") == {msg.raw_sha256}


# --------------------------------------------------------------------------
# interrupted and resumed

def migrate_process(config: Path, target: str) -> subprocess.Popen:
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config))
    env.pop("DATABASE_URL", None)
    return subprocess.Popen([str(ROOT / ".venv" / "bin" / "flask"), "--app", "app", "storage", "migrate",
                             "--to", target, "--batch-size", "50"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def copied_so_far(engine, target: str, uploads: Path) -> int:
    """Blobs the target holds, seen from outside the migrating process."""
    if target == "filesystem":
        return sum(1 for p in (uploads / "blobs").rglob("*") if p.is_file() and storage.is_blob_name(p.name))
    with engine.connect() as conn:
        return conn.scalar(text("SELECT count(DISTINCT sha256) FROM blob_chunks"))


def kill_mid_way(proc: subprocess.Popen, url: str, target: str, uploads: Path, total: int) -> int:
    """SIGKILL the migration once a tenth of the blobs are copied; returns how
    many the target held at the kill. The process is stopped (SIGSTOP) while
    it is counted, so it cannot finish between the count and the kill."""
    engine = create_engine(url)  # one for every count: a new one per poll let a fast run finish unseen
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            done = copied_so_far(engine, target, uploads)
            if done >= total // 10:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return done
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.002)
    finally:
        engine.dispose()
    raise AssertionError(f"the migration ended before it could be interrupted: {proc.communicate()}")


@pytest.mark.parametrize("source,target", DIRECTIONS)
def test_a_killed_migration_resumes(app_factory, tmp_path, source, target):
    app = app_factory({"storage": {"backend": source, "inline_max_bytes": 0}})
    uploads = Path(app.config["UPLOADS_DIR"])
    with app.app_context():
        box = Mailbox.create("resume", Domain.by_name("example.com"), 7200)
        store_some(box, 60, parts=2, size=16384)
        total = db.session.scalar(select(func.count(Blob.sha256)))
        url = db.engine.url.render_as_string(hide_password=False)
    config = tmp_path / "migrate.json"
    config.write_text(json.dumps(dict(app.config["TEMPMAIL"], secret_key=app.config["SECRET_KEY"])))
    first = migrate_process(config, target)
    at_kill = kill_mid_way(first, url, target, uploads, total)
    assert 0 < at_kill < total
    second = migrate_process(config, target)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()
    report = out.decode()
    copied = int(report.split("copied ")[1].split(" ")[0])
    present = int(report.split("), ")[1].split(" already")[0])
    print(f"\n[storage migrate {source}->{target}] {total} blobs: killed with {at_kill} copied, "
          f"the second run copied {copied} and found {present} already there")
    assert copied + present == total and present >= at_kill
    assert f"Copying {total} blobs to the {target}" in err.decode()  # the progress bar, on stderr
    with app.app_context():
        assert held_by(target) == set(db.session.scalars(select(Blob.sha256)))
        complete_copies(target)


def complete_copies(target: str) -> None:
    """Every copy in ``target`` is whole: its bytes hash to its name, whatever
    the kill interrupted (a chunk transaction, a file being written)."""
    for sha in held_by(target):
        if target == "database":
            data = b"".join(storage.stream_rows(db.engine, sha))
        else:
            data = storage.blob_path(sha).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
    if target == "filesystem":  # a file the kill cut short is only ever a .tmp, which the sweep removes
        retention.remove_orphans(grace_seconds=0)
        assert not [p for p in (storage.uploads_dir() / "blobs").rglob("*") if p.is_file()
                    and not storage.is_blob_name(p.name)]
