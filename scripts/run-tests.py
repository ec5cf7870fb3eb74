#!/usr/bin/env python3
"""`make test`: the whole suite as N shards at once (3 unless RELEASY_TEST_SHARDS says),
each pytest on its own lab.

The lab tests spend most of their time waiting on hosts (apt, timers, load windows), so
labs side by side cut the wall time on the 2-core machine. Shard I runs the units of lab
work (the tests of a lab shape) `tests/integration/conftest.py` assigns to it
(`--lab-shard I/N`; shard 1 also runs the unit tests) with LAB_ID set so its hosts,
addresses and state never meet another shard's; the image cache is shared (its builds
take a lock). Each shard's output goes to .lab-logs/shard-I.log and, line by line with an
`[I]` prefix, to this terminal. The exit code is the first failing shard's (0 when all
pass). Ctrl-C or SIGTERM is passed on to the shards (by the PIDs started here), which tear
their labs down.

`RELEASY_TEST_SHARDS=1` runs the suite as one plain pytest (also what extra pytest
arguments do: `scripts/run-tests.py tests/unit -q`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".lab-logs"
# Measured on the 2-core machine with whole lab shapes as units: 2 shards 18 min, 3 shards
# 13.7-15.4 min (the machine 87% busy); more cannot beat the split lab's own 13-15 min.
DEFAULT_SHARDS = 3
# Shard I > 1 runs on LAB_ID base + 100 + I - 2 (shard 2: 101 with no LAB_ID set); the
# operator's own lab, LAB_ID or the default one, stays shard 1's.
LAB_ID_OFFSET = 100


def shard_lab_id(base: str, index: int) -> str:
    """The LAB_ID of shard ``index`` (1-based) when the operator's is ``base`` ('' = none)."""
    if index == 1:
        return base
    return str((int(base or 0) + LAB_ID_OFFSET + index - 2) % 200 + 1)


def _pump(index: int, proc: subprocess.Popen, log: Path, lock: threading.Lock) -> None:
    with log.open("w") as out:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.write(line)
            out.flush()
            with lock:
                sys.stdout.write(f"[{index}] {line}")
                sys.stdout.flush()


def main(argv: list[str]) -> int:
    count = int(os.environ.get("RELEASY_TEST_SHARDS", DEFAULT_SHARDS))
    pytest = [sys.executable, "-m", "pytest"]
    if argv or count <= 1:
        return subprocess.call([*pytest, *argv], cwd=ROOT)
    LOGS.mkdir(exist_ok=True)
    base = os.environ.get("LAB_ID", "")
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    lock = threading.Lock()

    def forward(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for index in range(1, count + 1):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        lab_id = shard_lab_id(base, index)
        if lab_id:
            env["LAB_ID"] = lab_id
        proc = subprocess.Popen([*pytest, f"--lab-shard={index}/{count}", "-p",
                                 "no:cacheprovider"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(index, proc, LOGS / f"shard-{index}.log",
                                                    lock), daemon=True)
        pump.start()
        pumps.append(pump)
    codes = [p.wait() for p in procs]
    for pump in pumps:
        pump.join()
    for index, code in enumerate(codes, 1):
        print(f"shard {index}/{count}: exit code {code} (log: {LOGS / f'shard-{index}.log'})")
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
