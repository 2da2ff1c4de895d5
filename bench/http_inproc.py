"""CPU time per request of the bench's HTTP endpoints, in-process.

The Flask app of a checkout answers ``--requests`` requests per endpoint
through the WSGI test client (no gunicorn, no network): the app's own cost
per request, measured as the process's CPU time (``thread_time``), which
other work on a shared machine disturbs far less than wall time. Use it to
compare changes (``--compare DIR`` runs another checkout alternately); the
served figures come from ``http_api.py``.

Endpoints: ``/api.php/inbox/{email}`` and ``/api.php/email/{id}`` on an
api.php mailbox of 50 messages, ``/api/messages?email=`` with a Bearer key
(quota counted) on a User API mailbox of 50 (every fifth message with a
20 KB attachment, as in http_api.py).

Run: ``.venv/bin/python bench/http_inproc.py [--requests 300] [--compare DIR] [--profile]``
(``--profile``: a cProfile of each endpoint's measured requests, kept in
``bench/results/inproc-*.prof``, its top printed)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[3])
import common
from app import create_app
import mailhandler
requests, key, legacy, owned = int(sys.argv[1]), sys.argv[2], sys.argv[4], sys.argv[5]
profile_dir = sys.argv[6] if len(sys.argv) > 6 else ""
app = create_app()
client = app.test_client()
auth = {"Authorization": f"Bearer {key}"}
inbox = client.get(f"/api.php/inbox/{legacy}").get_json()
first = inbox["emails"][0]["id"]
urls = {"inbox": (f"/api.php/inbox/{legacy}", {}), "email": (f"/api.php/email/{first}", {}),
        "messages": (f"/api/messages?email={owned}", auth)}
out = {}
for name, (url, headers) in urls.items():
    for _ in range(20):  # warm-up
        client.get(url, headers=headers)
    samples = []
    if profile_dir:  # one cProfile per endpoint, of the measured requests only
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    for _ in range(requests):
        c0 = time.thread_time()
        resp = client.get(url, headers=headers)
        samples.append(time.thread_time() - c0)
        assert resp.status_code == 200, (url, resp.status_code, resp.data[:300])
    if profile_dir:
        prof.disable()
        prof.dump_stats(f"{profile_dir}/inproc-{name}.prof")
    samples.sort()
    out[name] = {"median_ms": samples[len(samples) // 2] * 1000, "p90_ms": samples[int(len(samples) * .9)] * 1000,
                 "bytes": len(resp.data)}
print(json.dumps(out))
'''


def fill(box: common.Sandbox) -> tuple[str, str, str]:
    """An api.php mailbox and a User API mailbox of 50 messages each, and the key."""
    box.init_db()
    legacy = box.mailboxes(["reader"])[0]
    key = box.api_key()
    code = ("import sys\nfrom app import create_app\nfrom models import User, Domain\nimport mailpolicy\n"
            "app = create_app()\nwith app.app_context():\n"
            "    user = User.query.filter_by(email='bench@users.test').one()\n"
            "    box = mailpolicy.open_mailbox('user-api', Domain.by_name(sys.argv[1]), None, 86400, '', "
            "limit=None, user_id=user.id)\n"
            "    print(box.address)\n")
    owned = subprocess.run([str(common.PYTHON), "-c", code, common.DOMAIN], env=box.env(), cwd=box.code,
                           check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    deliver = ("import sys\nsys.path.insert(0, sys.argv[1])\nimport common\nfrom app import create_app\n"
               "import mailhandler\napp = create_app()\nwith app.app_context():\n"
               "    for rcpt in sys.argv[2:]:\n"
               "        for n in range(50):\n"
               "            blob = bytes(range(256)) * 80 + n.to_bytes(4, 'big') if n % 5 == 0 else None\n"
               "            raw = common.sample_message(rcpt, n, blob).as_bytes()\n"
               "            mailhandler.deliver(raw, [rcpt], 'sender@source.test', 'bench')\n")
    subprocess.run([str(common.PYTHON), "-c", deliver, str(common.BENCH), legacy, owned], env=box.env(),
                   cwd=box.code, check=True, capture_output=True)
    return key, legacy, owned


def measure(code: Path, requests: int, profile_dir: str = "") -> dict:
    with common.Sandbox("http-inproc", code=code) as box:
        key, legacy, owned = fill(box)
        res = subprocess.run([str(common.PYTHON), "-c", CHILD, str(requests), key, str(common.BENCH), legacy, owned,
                              profile_dir],
                             env=box.env(), cwd=code, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="In-process CPU time per request.")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--code", default=str(common.ROOT))
    parser.add_argument("--compare", help="another checkout, measured alternately")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="also write a cProfile per endpoint to bench/results/inproc-*.prof and print its top")
    args = parser.parse_args(argv)
    if args.profile:
        (common.BENCH / "results").mkdir(exist_ok=True)
        args.repeat = 1
    print(f"in-process CPU ms per request, {args.requests} requests each  ({common.machine_line()})")
    codes = [Path(args.code)] + ([Path(args.compare)] if args.compare else [])
    results: dict = {c: [] for c in codes}
    for rep in range(args.repeat):
        for code in codes:
            res = measure(code, args.requests, str(common.BENCH / "results") if args.profile else "")
            results[code].append(res)
            common.log(f"  [{rep + 1}] {code}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res.items()))
    names = list(next(iter(results.values()))[0])
    rows = [[str(code)] + [f"{statistics.median(r[n]['median_ms'] for r in rs):.2f}" for n in names]
            for code, rs in results.items()]
    print(common.table(rows, ["code"] + [f"{n} CPU ms" for n in names]))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.profile:
        print_profiles(names)


def print_profiles(names: list[str], top: int = 25) -> None:
    """The functions with the most own time and the most cumulative time per endpoint
    (the CPU figures above include cProfile's own overhead)."""
    import pstats
    for name in names:
        path = common.BENCH / "results" / f"inproc-{name}.prof"
        print(f"\n=== {name}: {path}")
        for order in ("tottime", "cumulative"):
            pstats.Stats(str(path)).sort_stats(order).print_stats(top)


if __name__ == "__main__":
    main()
