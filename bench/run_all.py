"""Run every benchmark in turn (``make bench``) and keep the printed figures.

Each script runs in its own process with its default (or ``--quick``) size;
what it prints goes to the terminal and to ``bench/results/<date>.txt``
(git-ignored), ready to be copied into ``bench/README.md``. A failing script
is reported and the others still run.

Run: ``.venv/bin/python bench/run_all.py [--quick] [--only smtp_ingest,http_api]``
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPTS = ["smtp_ingest", "delivery_latency", "http_api", "scale", "memory", "capacity"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated script names")
    args = parser.parse_args(argv)
    common.ensure_profilers()
    out_dir = common.BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.txt"
    failed = []
    with open(out, "w") as fh:
        for name in [n for n in args.only.split(",") if n]:
            cmd = [str(common.PYTHON), str(common.BENCH / f"{name}.py")] + (["--quick"] if args.quick else [])
            common.log(f"== {name}")
            start = time.monotonic()
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=common.ROOT)
            text = f"== {name} ({time.monotonic() - start:.0f} s)\n{res.stdout}\n"
            print(text, flush=True)
            fh.write(text)
            if res.returncode != 0:
                failed.append(name)
    print(f"figures saved in {out}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
