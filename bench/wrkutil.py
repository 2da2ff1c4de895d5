"""Running Debian's ``wrk`` and reading its ``--latency`` report."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import common

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors plus non-2xx/3xx answers


def to_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * UNITS[unit]


def parse(output: str) -> WrkResult:
    """Pick requests/s, the 50%/99% latency lines and the error counts."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(rps, p50, p99, requests, errors + (int(non2xx.group(1)) if non2xx else 0))


def run(url: str, seconds: float, connections: int = 50, threads: int = 2,
        headers: dict | None = None) -> WrkResult:
    """One wrk run against ``url`` (bounded by ``seconds``, 5 s request timeout)."""
    cmd = [common.ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
           "--timeout", "5s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    res = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed: {res.stderr or res.stdout}")
    return parse(res.stdout)
