"""The query plans of the per-message statements of a delivery, on SQLite and PostgreSQL.

Fills a database (the app's own schema, ``init-db``) with one mailbox of
``--messages`` messages and as many again spread over other mailboxes,
then prints ``EXPLAIN`` (SQLite: ``EXPLAIN QUERY PLAN``; PostgreSQL:
``EXPLAIN (ANALYZE, BUFFERS)``) of the duplicate filter's statement
(``mailhandler.EARLIER_UNTAGGED``/``EARLIER_TAGGED``), run exactly as the
daemon runs it, and its time at two mailbox sizes: the plan must seek the
``(raw_sha256, mailbox_id)`` index, never walk the mailbox, so its time
does not grow with the mailbox.

PostgreSQL is a throw-away cluster (``initdb`` + ``pg_ctl`` of the Debian
package, as the test suite starts it), skipped when not installed.

Run: ``.venv/bin/python bench/explain.py [--messages 20000] [--db sqlite,postgresql]``
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHILD = r'''
import hashlib, sys, time, json
from datetime import timedelta
from sqlalchemy import insert, select, text
from app import create_app
import mailhandler, idgen
from models import Mailbox, Message, Domain, db
from clock import now
n = int(sys.argv[1])
app = create_app()
out = {}
with app.app_context():
    dom = Domain.by_name("bench.test")
    big = Mailbox.create("bigbox", dom, 86400)
    others = [Mailbox.create(f"other{i}", dom, 86400) for i in range(10)]
    db.session.commit()
    t = Message.__table__
    def rows(box_ids, count, salt):
        for i in range(count):
            yield {"public_id": idgen.new_public_id(), "mailbox_id": box_ids[i % len(box_ids)],
                   "envelope_from": "sender@source.test", "envelope_to": "x", "received_at": now(),
                   "raw_sha256": hashlib.sha256(f"{salt}{i}".encode()).hexdigest(), "size": 2048,
                   "subject": f"m{i}", "body_text": "x" * 200}
    def fill(box_ids, count, salt):
        batch = []
        for row in rows(box_ids, count, salt):
            batch.append(row)
            if len(batch) == 2000:
                db.session.execute(insert(t), batch); batch = []
        if batch:
            db.session.execute(insert(t), batch)
        db.session.commit()
    dialect = db.engine.dialect.name
    def plan(stmt, params):
        bound = stmt.params(**{k: v for k, v in params.items() if k in stmt.compile().params})
        sql = str(bound.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
        prefix = "EXPLAIN QUERY PLAN " if dialect == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS) "
        rows = db.session.connection().exec_driver_sql(prefix + sql)
        return [" | ".join(str(c) for c in r) if dialect == "sqlite" else r[0] for r in rows]
    def timed(stmt, params, repeat=2000):
        conn = db.session.connection()
        start = time.perf_counter()
        for _ in range(repeat):
            conn.execute(stmt, params).scalar()
        return (time.perf_counter() - start) / repeat * 1e6
    for label, count in (("small", 200), ("big", n)):
        fill([big.id], count if label == "small" else n - 200, label)
        fill([o.id for o in others], count if label == "small" else n - 200, label + "o")
        if dialect == "postgresql":
            db.session.commit(); db.session.execute(text("ANALYZE")); db.session.commit()
        else:
            db.session.execute(text("ANALYZE")); db.session.commit()
        total = db.session.scalar(select(db.func.count()).select_from(t).where(t.c.mailbox_id == big.id))
        miss = {"sha": "0" * 64, "mailbox_id": big.id, "tag": None, "envelope_from": "sender@source.test",
                "since": now() - timedelta(hours=1)}
        hit = dict(miss, sha=hashlib.sha256(f"{label}0".encode()).hexdigest())
        out[label] = {"mailbox_messages": total,
                      "plan_miss": plan(mailhandler.EARLIER_UNTAGGED, miss),
                      "plan_tagged": plan(mailhandler.EARLIER_TAGGED, dict(miss, tag="x")),
                      "us_miss": timed(mailhandler.EARLIER_UNTAGGED, miss),
                      "us_hit": timed(mailhandler.EARLIER_UNTAGGED, hit)}
print(json.dumps(out))
'''


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None)


class Postgres:
    """A throw-away PostgreSQL cluster (run as ``nobody`` when we are root)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tempmail-explain-pg-"))
        self.port = common.free_port()
        self.pre = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody", "nogroup")
        self.data = str(self.dir / "data")
        subprocess.run(self.pre + [pg_bin("initdb"), "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                   "--no-locale"], check=True, stdout=subprocess.DEVNULL, cwd=self.dir)
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(self.pre + [pg_bin("pg_ctl"), "-D", self.data, "-o", opts, "-w", "-l",
                                   str(self.dir / "log"), "start"], check=True, stdout=subprocess.DEVNULL, cwd=self.dir)

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run(self.pre + [pg_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(db_kind: str, messages: int) -> dict:
    import json
    pg = Postgres() if db_kind == "postgresql" else None
    try:
        extra = {"database_url": pg.url()} if pg else {}
        with common.Sandbox("explain", **extra) as box:
            box.init_db()
            res = subprocess.run([str(common.PYTHON), "-c", CHILD, str(messages)], env=box.env(), cwd=common.ROOT,
                                 capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-3000:])
            return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        if pg:
            pg.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Query plans of the duplicate filter.")
    parser.add_argument("--messages", type=int, default=20000, help="messages in the big mailbox")
    parser.add_argument("--db", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    print(f"duplicate filter query plans  ({common.machine_line()})")
    for kind in [k for k in args.db.split(",") if k]:
        if kind == "postgresql" and not pg_bin("initdb"):
            print("\npostgresql: not installed (apt-get install postgresql), skipped")
            continue
        out = run(kind, args.messages)
        for label, r in out.items():
            print(f"\n{kind}, mailbox of {r['mailbox_messages']:,} messages: lookup {r['us_miss']:.0f} us (miss), "
                  f"{r['us_hit']:.0f} us (hit)")
            print("  plan (untagged):\n    " + "\n    ".join(r["plan_miss"]))
            if label == "big":
                print("  plan (tagged):\n    " + "\n    ".join(r["plan_tagged"]))


if __name__ == "__main__":
    main()
