#!/usr/bin/env python3
"""A bounded HTTP(S) load generator for zero-downtime tests, run inside the lab's "outside"
network namespace (it plays the internet), e.g.:

    ip netns exec lab5-outside python3 lab/loadgen.py https://10.77.5.10/ \\
        --server-name releasy.lab.test --threads 4 --duration 30 --out /tmp/summary.json

N threads, each with one HTTP/1.1 keep-alive connection (http.client), send a fixed mix of
``GET /version``, ``GET /ready`` and ``POST /api/echo`` (small JSON body) at a steady total
rate. TLS is not verified (the lab's certificate is self-signed); SNI and Host are
``--server-name``. Every request is recorded: time, method, path, status or error, and the
``version`` of the JSON body (the stand-in's /version and /api/echo return it). OK means a
2xx answer; everything else is a failure (connection errors, timeouts, 5xx, and 4xx too: a
zero-downtime test must not hide a misrouted request).

Bounded on purpose: it only ever targets the lab's 10.77.x.y addresses, stops at
``--duration`` (hard cap 600 s), ``--max-requests`` (hard cap 1,000,000), when the
``--stop-file`` appears, or on SIGTERM/SIGINT. It then writes a JSON summary: total, ok,
failed, the first failures, failure kinds, the per-second version split, requests/s.
While running it prints one JSON progress line per ``--progress`` seconds on stdout.

Standard library only: it runs with any Python 3.9+ (the venv's, or the system python3).
`LoadGenerator` is the Python API the tests use; it starts this file as a subprocess in the
outside namespace and returns the parsed summary when stopped.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

LAB_NETWORK = ipaddress.ip_network("10.77.0.0/16")
MAX_DURATION_S = 600.0
MAX_REQUESTS = 1_000_000
MAX_THREADS = 32
FIRST_FAILURES_KEPT = 20
# One round of each thread's mix: mostly reads, a good share of non-idempotent POSTs
# (a proxy retries GETs on another upstream but never a POST that was already sent).
MIX: tuple[tuple[str, str], ...] = (
    ("GET", "/version"), ("POST", "/api/echo"), ("GET", "/ready"),
    ("POST", "/api/echo"), ("GET", "/version"),
)
#: --mix get-version: only idempotent reads, e.g. sequential probes of a fleet's latency.
MIXES: dict[str, tuple[tuple[str, str], ...]] = {"mixed": MIX, "get-version": (("GET", "/version"),)}
READY_LINE = "loadgen: running"


# --------------------------------------------------------------------------------------
# Target checks (pure)
# --------------------------------------------------------------------------------------
class UnsafeTarget(ValueError):
    """The URL is not a lab address: the generator refuses to send anything."""


def parse_target(url: str) -> tuple[str, str, int]:
    """(scheme, address, port) of a lab URL; raises UnsafeTarget for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeTarget(f"only http:// and https:// URLs, got {url!r}")
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UnsafeTarget(
            f"the target must be a lab IP address (10.77.x.y), not {host!r}") from None
    if address not in LAB_NETWORK:
        raise UnsafeTarget(f"refusing to load {address}: only the lab's {LAB_NETWORK} is allowed")
    if parts.path not in ("", "/") or parts.query:
        raise UnsafeTarget(f"give the base URL only (scheme://address[:port]/), got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeTarget(f"invalid port in {url!r}") from None
    return parts.scheme, str(address), port


# --------------------------------------------------------------------------------------
# Summary (pure: records in, JSON-able dict out)
# --------------------------------------------------------------------------------------
def failure_kind(record: dict) -> str | None:
    """None for a 2xx answer; else "HTTP 502", "ConnectionRefusedError", "timeout"..."""
    status = record.get("status")
    if record.get("error"):
        return record["error"].split(":", 1)[0]
    if status is not None and 200 <= status < 300:
        return None
    return f"HTTP {status}"


SLOW_MS = 1500.0


def latency(records: list[dict], slow_ms: float = SLOW_MS) -> dict:
    """Latency of every request (failed ones too), in ms: p50, p99 (nearest rank), max, and
    how many took longer than ``slow_ms``."""
    times = sorted(r["ms"] for r in records if r.get("ms") is not None)
    if not times:
        return {"p50": None, "p99": None, "max": None, "slow": 0, "slow_ms": slow_ms}

    def rank(q: float) -> float:
        return times[min(len(times) - 1, max(0, -(-len(times) * q // 100) - 1))]
    return {"p50": rank(50), "p99": rank(99), "max": times[-1],
            "slow": sum(1 for t in times if t > slow_ms), "slow_ms": slow_ms}


def summarize(records: list[dict], *, started: float, ended: float, stopped_by: str,
              config: dict) -> dict:
    """The JSON summary. ``records``: {t, method, path, status, error, version, ms}."""
    records = sorted(records, key=lambda r: r["t"])
    failures = [r for r in records if failure_kind(r) is not None]
    per_second: dict[int, Counter] = defaultdict(Counter)
    failed_per_second: Counter = Counter()
    for r in records:
        bucket = int(r["t"])
        if failure_kind(r) is None and r.get("version"):
            per_second[bucket][r["version"]] += 1
        elif failure_kind(r) is not None:
            failed_per_second[bucket] += 1
    duration = max(ended - started, 1e-9)
    return {
        "config": config,
        "stopped_by": stopped_by,
        "duration_s": round(duration, 3),
        "total": len(records),
        "ok": len(records) - len(failures),
        "failed": len(failures),
        "retried_stale_connections": sum(1 for r in records if r.get("retried")),
        "requests_per_s": round(len(records) / duration, 1),
        "latency_ms": latency(records),
        "failure_kinds": dict(Counter(failure_kind(r) for r in failures)),
        "failed_by_method": dict(Counter(r["method"] for r in failures)),
        "first_failures": failures[:FIRST_FAILURES_KEPT],
        "versions": dict(Counter(r["version"] for r in records
                                 if r.get("version") and failure_kind(r) is None)),
        # time bucket (whole seconds since start, as a string for JSON) -> {version: count}
        "per_second": {str(b): dict(c) for b, c in sorted(per_second.items())},
        "failed_per_second": {str(b): n for b, n in sorted(failed_per_second.items())},
    }


# --------------------------------------------------------------------------------------
# The generator process
# --------------------------------------------------------------------------------------
# A kept-alive connection the server closed under us, before any response byte came back.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _closed_while_idle(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive socket that is readable has been closed (or is closing) by the
    server: checked before reuse, as well-behaved HTTP clients do."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _Connection(http.client.HTTPSConnection):
    """HTTPS to an IP address with SNI = server_name (http.client would send the IP)."""

    def __init__(self, address: str, port: int, *, server_name: str, timeout: float) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the lab's certificate is self-signed
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


class _PlainConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scheme, self.address, self.port = parse_target(args.url)
        self.server_name = args.server_name or self.address
        self.stop = threading.Event()
        self.stopped_by = "duration"
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.issued = 0
        self.started = time.monotonic()

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return _Connection(self.address, self.port, server_name=self.server_name,
                               timeout=self.args.timeout)
        return _PlainConnection(self.address, self.port, timeout=self.args.timeout)

    def _claim(self) -> bool:
        """Count one more request against --max-requests; False once the cap is reached."""
        with self.lock:
            if self.issued >= self.args.max_requests:
                self.stopped_by = "max-requests"
                self.stop.set()
                return False
            self.issued += 1
            return True

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                  body: str) -> tuple[http.client.HTTPResponse, bytes]:
        headers = {"Host": self.server_name, "User-Agent": "releasy-lab-loadgen"}
        if method == "POST":
            headers["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=headers)
        else:
            conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp, resp.read()

    def worker(self, index: int) -> None:
        interval = self.args.threads / self.args.rate if self.args.rate > 0 else 0.0
        # Stagger the threads across one interval so the total rate is steady.
        next_at = time.monotonic() + interval * index / max(1, self.args.threads)
        conn: http.client.HTTPConnection | None = None
        step = index  # threads start at different points of the mix
        body = json.dumps({"loadgen": True, "thread": index, "note": "zero-downtime probe"})
        while not self.stop.is_set():
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                # Fell behind (a slow request): skip ahead rather than burst to catch up.
                next_at = max(next_at + interval, time.monotonic())
            if not self._claim():
                break
            mix = MIXES[self.args.mix]
            method, path = mix[step % len(mix)]
            step += 1
            t0 = time.monotonic()
            record: dict[str, Any] = {"t": round(t0 - self.started, 4), "method": method,
                                      "path": path, "status": None, "error": None,
                                      "version": None}
            try:
                if conn is not None and _closed_while_idle(conn):
                    conn.close()
                    conn = None
                reused = conn is not None
                if conn is None:
                    conn = self._connection()
                try:
                    resp, data = self._exchange(conn, method, path, body)
                except STALE_CONNECTION as exc:
                    if not reused:
                        raise
                    # The server closed a kept-alive connection just as we reused it (nginx
                    # does on every reload). Nothing reached the application: like curl,
                    # browsers and urllib3, retry once on a fresh connection, and count it.
                    record["retried"] = type(exc).__name__
                    conn.close()
                    conn = self._connection()
                    resp, data = self._exchange(conn, method, path, body)
                record["status"] = resp.status
                if resp.status == 503:  # the maintenance page says when to come back
                    record["retry_after"] = resp.getheader("Retry-After")
                try:
                    payload = json.loads(data) if data else None
                except ValueError:
                    payload = None
                if isinstance(payload, dict) and isinstance(payload.get("version"), str):
                    record["version"] = payload["version"]
                if resp.will_close:
                    conn.close()
                    conn = None
            except (socket.timeout, TimeoutError):
                record["error"] = "timeout"
            except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"[:200]
            if record["error"] is not None and conn is not None:
                conn.close()  # a fresh connection next time, like a real client
                conn = None
            record["ms"] = round((time.monotonic() - t0) * 1000, 2)
            with self.lock:
                self.records.append(record)
        if conn is not None:
            conn.close()

    def watch(self) -> None:
        """Stop at the deadline or when the stop file appears; print progress lines."""
        deadline = self.started + self.args.duration
        stop_file = Path(self.args.stop_file) if self.args.stop_file else None
        next_progress = time.monotonic() + self.args.progress
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                self.stopped_by = "duration"
                self.stop.set()
                break
            if stop_file is not None and stop_file.exists():
                self.stopped_by = "stop-file"
                self.stop.set()
                break
            if now >= next_progress:
                self.progress()
                next_progress = now + self.args.progress
            self.stop.wait(0.05)

    def progress(self) -> None:
        with self.lock:
            total = len(self.records)
            failed = sum(1 for r in self.records if failure_kind(r) is not None)
            last = next((r.get("version") for r in reversed(self.records) if r.get("version")),
                        None)
        line = {"t": round(time.monotonic() - self.started, 2), "total": total,
                "ok": total - failed, "failed": failed, "last_version": last}
        print(json.dumps(line), flush=True)

    def run(self) -> tuple[dict, list[dict]]:
        def on_signal(signum: int, _frame: Any) -> None:
            self.stopped_by = signal.Signals(signum).name
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(self.args.threads)]
        for t in threads:
            t.start()
        print(READY_LINE, flush=True)
        self.watch()
        # In-flight requests finish within --timeout; don't wait forever for a stuck one.
        for t in threads:
            t.join(timeout=self.args.timeout + 2)
        ended = time.monotonic()
        with self.lock:
            records = list(self.records)
        self.progress()
        config = {"url": self.args.url, "server_name": self.server_name,
                  "threads": self.args.threads, "rate": self.args.rate,
                  "duration": self.args.duration, "max_requests": self.args.max_requests,
                  "timeout": self.args.timeout, "mix": self.args.mix}
        return summarize(records, started=self.started, ended=ended,
                         stopped_by=self.stopped_by, config=config), records


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="base URL on a lab address, e.g. https://10.77.5.10/")
    p.add_argument("--server-name", help="TLS SNI and Host header (default: the address)")
    p.add_argument("--threads", type=_bounded(int, 1, MAX_THREADS), default=4)
    p.add_argument("--rate", type=_bounded(float, 0, 5000), default=200.0,
                   help="total requests per second (0: as fast as the threads go)")
    p.add_argument("--duration", type=_bounded(float, 0.1, MAX_DURATION_S), default=30.0,
                   help="seconds to run at most")
    p.add_argument("--max-requests", type=_bounded(int, 1, MAX_REQUESTS), default=100_000)
    p.add_argument("--timeout", type=_bounded(float, 0.1, 60), default=5.0,
                   help="seconds per request (connect and read)")
    p.add_argument("--mix", choices=sorted(MIXES), default="mixed",
                   help="mixed: GET /version, GET /ready, POST /api/echo (default);"
                        " get-version: GET /version only")
    p.add_argument("--stop-file", help="stop as soon as this file exists")
    p.add_argument("--out", help="write the JSON summary here (default: stdout)")
    p.add_argument("--records", help="also write every request as JSON lines here")
    p.add_argument("--progress", type=_bounded(float, 0.05, 60), default=0.5,
                   help="seconds between progress lines on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = Run(args)
    except UnsafeTarget as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    summary, records = run.run()
    if args.records:
        with open(args.records, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    if args.out:
        _write_json(Path(args.out), summary)
    else:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


# --------------------------------------------------------------------------------------
# Python API for tests
# --------------------------------------------------------------------------------------
class LoadGenerator:
    """Runs this file in the lab's outside namespace for the ``with`` block.

        with LoadGenerator("https://10.77.5.10/", server_name="releasy.lab.test") as load:
            load.wait_until(lambda p: p["ok"] >= 100, timeout=10)
            ...  # the rollout under test
        summary = load.summary  # also returned by load.stop()

    Leaving the block stops the generator (stop file, then SIGTERM, then SIGKILL, each
    with a deadline) and parses its summary into ``.summary``.
    """

    def __init__(self, url: str, *, server_name: str | None = None, threads: int = 4,
                 rate: float = 200.0, duration: float = 120.0, max_requests: int = 100_000,
                 timeout: float = 5.0, mix: str = "mixed", netns: str | None = None,
                 workdir: str | Path,
                 python: str = sys.executable, start_timeout: float = 15.0) -> None:
        parse_target(url)  # refuse before starting anything
        if netns is None:
            from lab.config import current_identity
            netns = current_identity().outside_ns
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stop_file = self.workdir / "loadgen.stop"
        self.out = self.workdir / "loadgen-summary.json"
        self.records_path = self.workdir / "loadgen-records.jsonl"
        self.timeout = timeout
        self.start_timeout = start_timeout
        for stale in (self.stop_file, self.out):
            stale.unlink(missing_ok=True)
        argv = [python, str(Path(__file__).resolve()), url, "--threads", str(threads),
                "--rate", str(rate), "--duration", str(duration),
                "--max-requests", str(max_requests), "--timeout", str(timeout), "--mix", mix,
                "--stop-file", str(self.stop_file), "--out", str(self.out),
                "--records", str(self.records_path)]
        if server_name:
            argv += ["--server-name", server_name]
        self.argv = ["ip", "netns", "exec", netns, *argv] if netns else argv
        self.proc: subprocess.Popen | None = None
        self.summary: dict | None = None
        self._latest: dict = {"t": 0.0, "total": 0, "ok": 0, "failed": 0, "last_version": None}
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stderr = self.workdir / "loadgen.stderr"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> LoadGenerator:
        stderr = self._stderr.open("wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=stderr,
                                     stdin=subprocess.DEVNULL, text=True)
        stderr.close()
        started = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.strip() == READY_LINE:
                    started.set()
                    continue
                try:
                    progress = json.loads(line)
                except ValueError:
                    continue
                with self._cond:
                    self._latest = progress
                    self._cond.notify_all()
            started.set()  # EOF: unblock start() if the process died early
            with self._cond:
                self._cond.notify_all()

        self._reader = threading.Thread(target=read, name="loadgen-reader", daemon=True)
        self._reader.start()
        if not started.wait(self.start_timeout) or self.proc.poll() is not None:
            self._kill()
            raise RuntimeError(f"load generator did not start: {self._stderr_tail()}")
        return self

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def progress(self) -> dict:
        """The latest progress line: {t, total, ok, failed, last_version}."""
        with self._cond:
            return dict(self._latest)

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """Wait (no fixed sleep) until ``predicate(progress)``; raise TimeoutError if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._latest):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None
                                 and not predicate(self._latest)):
                    raise TimeoutError(f"load generator progress never matched; last:"
                                       f" {self._latest}")
                self._cond.wait(min(left, 1.0))
            return dict(self._latest)

    def stop(self) -> dict:
        """Stop the generator (if still running) and return its parsed summary."""
        if self.summary is not None:
            return self.summary
        if self.proc is None:
            raise RuntimeError("load generator was never started")
        if self.proc.poll() is None:
            self.stop_file.touch()
            try:
                self.proc.wait(timeout=self.timeout + 10)
            except subprocess.TimeoutExpired:
                self._kill()
        if self._reader is not None:
            self._reader.join(timeout=5)
        try:
            self.summary = json.loads(self.out.read_text())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"load generator left no summary ({exc}): "
                               f"{self._stderr_tail()}") from None
        return self.summary

    def records(self) -> list[dict]:
        """Every request (after `stop`), for detailed assertions."""
        return [json.loads(line) for line in self.records_path.read_text().splitlines()]

    def _kill(self) -> None:
        assert self.proc is not None
        for sig, wait in ((signal.SIGTERM, self.timeout + 5), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)  # only ever the process we started, by its PID
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue

    def _stderr_tail(self) -> str:
        try:
            return self._stderr.read_text()[-2000:].strip() or "(no stderr)"
        except OSError:
            return "(no stderr)"


if __name__ == "__main__":
    sys.exit(main())
