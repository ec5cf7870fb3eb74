#!/usr/bin/env python3
"""`make bench`: what the operator tasks cost on the local lab, against the network floor.

Brings up the lab (LAB_ID from the environment, like every lab command), measures, prints a
table, writes bench/results/latest.json and always tears the lab down at the end:

1. floor: one `true` over an open connection and a new connection + `true`, through our
   Executor (plus the same with TCP_NODELAY cleared, and plain OpenSSH with and without a
   ControlMaster, for comparison);
2. a no-op `fab site` on the split lab: wall time, SSH round trips and connections per host
   (counted by the executor, read from the CLI's JSON log);
3. `fab deploy.rolling` over 3 app hosts: per host, the unavoidable part (drain wait,
   restart, start until /ready, the last measured from the app's own "listening" journal
   line) and the tool's own overhead, from the rollout's stage events and the executor's
   command trace (RELEASY_TRACE=1);
4. fan-out of a trivial command to 1, 5, 10 and 20 app hosts (`fab run --tier app -- true`
   when that task exists, and always the same through Executor.each in-process);
5. `fab status` on the split lab (skipped with a note while the task does not exist).

Every step has a deadline and the whole run a budget (well under 10 minutes on a 2-core
machine). Needs root (the lab does).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from lab import lab as lab_ops  # noqa: E402
from lab.config import current_identity, topology_hosts  # noqa: E402
from releasy_deploy.inventory import load_inventory  # noqa: E402

# Targets (issue 6).
SITE_MAX_ROUND_TRIPS = 2  # issue 15: one read per host, + the proxy's smoke test
ROLLING_MAX_OVERHEAD_S = 1.0
FANOUT_MAX_RATIO = 2.0

FANOUT_SIZES = (1, 10, 20, 40)  # app hosts; the largest lab also has 2 proxies
FANOUT_PROXIES = 2
SCALE_SIZES = (10, 20, 40)  # the scale curve: no-op site, status and fan-out
ROLLING_BATCH = 5
APPS_FOR_ROLLING = 3  # the split lab used for items 1, 2, 3 and 5
FROM_VERSION, TO_VERSION = "1.0.0", "1.1.0"
# systemd-nspawn hosts each hold several inotify instances; the kernel default (128 per
# user) is not enough for the 22-host fan-out lab (systemd fails: "Too many open files").
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
INOTIFY_NEEDED = 1024

from benchlib import (  # noqa: E402
    RESULTS, TOTAL_BUDGET_S, Budget, FabRun, OutOfTime, cpu_busy_sample, fab, fab_tasks,
    median, ms, parse_ts, quiet_executor, say, settle)
import scale  # noqa: E402


# --------------------------------------------------------------------------------------
# 1. Round-trip floor
# --------------------------------------------------------------------------------------
def measure_floor(inventory: Path, budget: Budget, host: str = "app1") -> dict:
    inv = load_inventory(inventory)
    deadline = time.monotonic() + budget.timeout(90)

    def repeat(n: int, fn: Callable[[], None]) -> list[float]:
        out = []
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
        return out

    with quiet_executor(inv) as ex:
        c = ex.conn(host)
        repeat(5, lambda: c.run(["true"], mutates=False))  # connect, warm up
        open_conn = repeat(50, lambda: c.run(["true"], mutates=False))
        # The same connection with Nagle's algorithm back on: what TCP_NODELAY saves.
        c.transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        nagle = repeat(15, lambda: c.run(["true"], mutates=False))

    def new_connection() -> None:
        with quiet_executor(inv) as ex:
            ex.conn(host).run(["true"], mutates=False)

    new_conn = repeat(10, new_connection)

    ident = current_identity()
    base = lab_ops.ssh_base(ident)
    openssh_new = repeat(5, lambda: subprocess.run([*base, host, "true"], check=True,
                                                   timeout=20, capture_output=True))
    openssh_mux: list[float] = []
    with tempfile.TemporaryDirectory(prefix="releasy-bench-cm-") as tmp:
        control = ["-o", f"ControlPath={tmp}/cm", "-o", "ControlPersist=60"]
        # -fN: the master goes to the background once authenticated; `-O exit` ends it
        # (ControlPersist ends it anyway after 60 s idle).
        master = subprocess.run([*base, *control, "-o", "ControlMaster=yes", "-fN", host],
                                timeout=20, capture_output=True)
        if master.returncode == 0:
            try:
                repeat(2, lambda: subprocess.run([*base, *control, host, "true"], timeout=20,
                                                 capture_output=True, check=True))
                openssh_mux = repeat(15, lambda: subprocess.run(
                    [*base, *control, host, "true"], timeout=20, capture_output=True,
                    check=True))
            finally:
                subprocess.run([*base, *control, "-O", "exit", host], timeout=20,
                               capture_output=True)
    return {
        "host": host,
        "executor_open_connection_ms": ms(median(open_conn)),
        "executor_open_connection_samples": len(open_conn),
        "executor_open_connection_without_tcp_nodelay_ms": ms(median(nagle)),
        "executor_new_connection_ms": ms(median(new_conn)),
        "executor_new_connection_samples": len(new_conn),
        "openssh_new_connection_ms": ms(median(openssh_new)),
        "openssh_controlmaster_ms": ms(median(openssh_mux)) if openssh_mux else None,
    }


# --------------------------------------------------------------------------------------
# 2. No-op `fab site`
# --------------------------------------------------------------------------------------
def measure_site(inventory: Path, budget: Budget, runs: int = 3) -> dict:
    provision = fab(inventory, "site", "--version", FROM_VERSION, budget=budget, timeout=420)
    settled = settle(budget)
    walls, last = [], None
    for _ in range(runs):
        last = fab(inventory, "site", budget=budget, timeout=120, trace=True)
        if not re.search(r"^site: 0 changed", last.proc.stdout, re.MULTILINE):
            raise RuntimeError("the second `fab site` was not a no-op:\n"
                               + "\n".join(last.proc.stdout.splitlines()[-12:]))
        walls.append(last.seconds)
    assert last is not None
    trips, conns = last.round_trips(), last.connections()
    phases = {}
    for e in last.of("info"):
        m = re.fullmatch(r"(\w+) done in ([\d.]+) s", e.get("message", ""))
        if e.get("host") == "site" and m:
            phases[m.group(1)] = float(m.group(2))
    summary = next((e for e in last.of("summary")), {})
    commands = [e for e in last.of("command")]
    critical = site_critical_path(last)
    connects = {e["host"]: e["seconds"] for e in commands if e["command"] == "(ssh connect)"}
    slowest = sorted((e for e in commands if e["command"] != "(ssh connect)"),
                     key=lambda e: -e["seconds"])[:5]
    return {
        "provision_wall_s": round(provision.seconds, 2),
        "settled_s": settled,
        "wall_s": round(median(walls), 3),
        "wall_samples_s": [round(w, 3) for w in walls],
        "task_elapsed_s": summary.get("elapsed_s"),
        "round_trips": trips,
        "max_round_trips_per_host": max(trips.values()) if trips else None,
        "connections": conns,
        "connect_s": connects,
        "phases_s": phases,
        "critical_path_s": critical,
        "startup_s": last.startup_s(),
        "slowest_commands": [{"host": e["host"], "seconds": e["seconds"],
                              "command": e["command"].splitlines()[0][:100]} for e in slowest],
        "target_max_round_trips": SITE_MAX_ROUND_TRIPS,
        "meets_target": bool(trips) and max(trips.values()) <= SITE_MAX_ROUND_TRIPS
        and all(n == 1 for n in conns.values()),
    }


def site_critical_path(run: FabRun) -> dict[str, float]:
    """Where a no-op site's time goes. The tier phases run one after the other; in each,
    the busiest host (its connection set-up plus its commands) is the critical path. What
    is left of the task's time is local work (Python, rendering, the thread pool)."""
    marks = [(parse_ts(e["ts"]), e["message"]) for e in run.of("info") if e.get("host") == "site"]
    starts = [t for t, msg in marks if re.fullmatch(r"--- \w+ ---", msg)]
    if not starts:
        return {}
    windows = [(a, b) for a, b in zip(starts, [*starts[1:], float("inf")])]
    commands = run.of("command")
    connect = remote = 0.0
    for a, b in windows:
        busy: dict[str, list[float]] = {}
        for c in commands:
            if a - 0.002 <= parse_ts(c["ts"]) < b:
                kind = 0 if c["command"] == "(ssh connect)" else 1
                busy.setdefault(c["host"], [0.0, 0.0])[kind] += c["seconds"]
        if busy:
            host_connect, host_remote = max(busy.values(), key=sum)
            connect += host_connect
            remote += host_remote
    elapsed = next((e.get("elapsed_s") for e in run.of("summary")), None) or 0.0
    return {"ssh_connect": round(connect, 3), "remote_commands": round(remote, 3),
            "local": round(max(0.0, elapsed - connect - remote), 3)}


# --------------------------------------------------------------------------------------
# 3. Rolling deploy, stage by stage
# --------------------------------------------------------------------------------------
def _listening_times(host: str, since: float) -> list[float]:
    """When releasy.service logged "listening" on HOST since ``since`` (epoch seconds): the
    moment migrations were done and the port bound, from the app's own journal. The lab's
    hosts share this machine's clock."""
    ident = current_identity()
    # sudo: app2 logs in as `deploy`, who may not read the system journal.
    proc = lab_ops.operator_ssh(ident, host, "sudo", "-n", "journalctl", "-u",
                                "releasy.service", "-o", "short-unix", "--no-pager", "--since",
                                f"@{int(since) - 1}", timeout=30, check=False)
    times = []
    for line in proc.stdout.splitlines():
        stamp, _, rest = line.partition(" ")
        if "listening on" in rest:
            try:
                times.append(float(stamp))
            except ValueError:
                pass
    return times


def measure_rolling(inventory: Path, budget: Budget) -> dict:
    inv = load_inventory(inventory)
    apps = [h.name for h in inv.hosts_in("app")]
    proxies = {h.name for h in inv.hosts_in("proxy")}
    started_at = time.time()
    run = fab(inventory, "deploy.rolling", "--version", TO_VERSION, "--yes", budget=budget,
              timeout=300, trace=True)
    commands = run.of("command")
    for cmd in commands:
        cmd["t"] = parse_ts(cmd["ts"])
    # Stage windows: the start event has no "seconds", the end event has them.
    opened: dict[tuple[str, str], float] = {}
    stages: list[dict] = []
    for e in run.of("stage"):
        key = (e["stage"], e["host"])
        if "seconds" not in e:
            opened[key] = parse_ts(e["ts"])
        elif key in opened:
            stages.append({"stage": e["stage"], "label": e["host"], "start": opened.pop(key),
                           "end": parse_ts(e["ts"]), "seconds": float(e["seconds"])})
    summary = next((e for e in run.of("summary")), {})
    per_host = []
    for st in stages:
        if st["label"] not in apps:
            continue
        host = st["label"]
        # ts has millisecond resolution: a little slack at both ends of the window.
        inside = [c for c in commands if st["start"] - 0.002 <= c["t"] <= st["end"] + 0.002]

        def total(where: Callable[[dict], bool]) -> float:
            return sum(c["seconds"] for c in inside if where(c))

        drain = total(lambda c: c["host"] in proxies and "wait for old nginx workers" in c["command"])
        reload = total(lambda c: c["host"] in proxies and "nginx -t" in c["command"])
        restart = [c for c in inside if c["host"] == host
                   and "restart releasy.service" in c["command"]]
        ready = total(lambda c: c["host"] == host and "releasy-ready" in c["command"])
        restart_s = sum(c["seconds"] for c in restart)
        # The unavoidable start: from the restart command to the app's own "listening".
        listening = [t for t in _listening_times(host, started_at)
                     if restart and t >= restart[0]["t"] - 0.01 and t <= st["end"]]
        true_start = (listening[0] - restart[0]["t"]) if listening else None
        measured_start = restart_s + ready
        floor = drain + (true_start if true_start is not None else measured_start)
        lag = measured_start - true_start if true_start is not None else 0.0
        overhead = st["seconds"] - floor
        per_host.append({
            "host": host, "stage": st["stage"], "stage_s": round(st["seconds"], 3),
            "drain_wait_s": round(drain, 3),
            "start_until_ready_s": round(true_start, 3) if true_start is not None else None,
            "restart_plus_ready_poll_s": round(measured_start, 3),
            "ready_poll_lag_s": round(lag, 3) if true_start is not None else None,
            "nginx_reload_s": round(reload, 3),
            "other_overhead_s": round(overhead - lag - reload, 3),
            "round_trips": len(inside),
            "floor_s": round(floor, 3),
            "overhead_s": round(overhead, 3),
        })
    shared = {st["stage"]: round(st["seconds"], 3) for st in stages if st["label"] not in apps}
    pipeline_s = ((max(s["end"] for s in stages) - min(s["start"] for s in stages))
                  if stages else None)
    floors = sum(h["floor_s"] for h in per_host)
    return {
        "from": FROM_VERSION, "to": TO_VERSION, "app_hosts": len(apps),
        "wall_s": round(run.seconds, 3),
        "task_elapsed_s": summary.get("elapsed_s"),
        "pipeline_s": round(pipeline_s, 3) if pipeline_s is not None else None,
        "shared_stages_s": shared,
        "per_host": per_host,
        "round_trips": run.round_trips(),
        "overhead_per_host_amortized_s": round((pipeline_s - floors) / len(per_host), 3)
        if per_host and pipeline_s is not None else None,
        "max_overhead_per_host_s": max((h["overhead_s"] for h in per_host), default=None),
        "target_max_overhead_s": ROLLING_MAX_OVERHEAD_S,
        "meets_target": bool(per_host) and len(per_host) == len(apps)
        and max(h["overhead_s"] for h in per_host) <= ROLLING_MAX_OVERHEAD_S,
    }


# --------------------------------------------------------------------------------------
# 4. Fan-out
# --------------------------------------------------------------------------------------
def subset_inventory(n: int, out_dir: Path) -> Path:
    """The inventory `lab.up --apps N` would write (same names and addresses), for the
    first N app hosts of the running 20-app lab; local paths made absolute."""
    ident = current_identity()
    request = lab_ops.LabRequest("split", n, proxies=FANOUT_PROXIES)
    data = yaml.safe_load(lab_ops.lab_inventory(
        ident, topology_hosts("split", n, proxies=FANOUT_PROXIES), request))
    sd = ident.state_dir
    data["known_hosts"] = str(sd / data["known_hosts"])
    data["ssh"]["identity_file"] = str(sd / data["ssh"]["identity_file"])
    data["secrets"]["file"] = str(sd / data["secrets"]["file"])
    data["release"]["source"] = str(sd / data["release"]["source"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"hosts-apps-{n}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def measure_fanout(budget: Budget, use_cli: bool, reps: int = 7, cli_reps: int = 5) -> dict:
    inv_dir = RESULTS / f"inventories{current_identity().lab_id or ''}"
    inventories = {n: subset_inventory(n, inv_dir) for n in FANOUT_SIZES}
    invs = {n: load_inventory(p) for n, p in inventories.items()}
    biggest = invs[max(FANOUT_SIZES)]
    with quiet_executor(biggest, max_parallel=64) as ex:  # warm up every host once
        ex.each(biggest.hosts_in("app"), lambda c: c.run(["true"], mutates=False))
    deadline = time.monotonic() + budget.timeout(150)
    inproc: dict[int, list[dict]] = {n: [] for n in FANOUT_SIZES}
    # The executor's previous bound (16 workers): the largest size again, for comparison.
    narrow: list[float] = []
    for _ in range(reps):  # interleaved, so a burst of load elsewhere hits every size alike
        for n in FANOUT_SIZES:
            if time.monotonic() > deadline:
                break
            inv = invs[n]
            ex = quiet_executor(inv)
            b0, t0 = cpu_busy_sample()
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            ex.each(inv.hosts_in("app"), lambda c: c.run(["true"], mutates=False))
            wall = time.perf_counter() - started
            b1, t1 = cpu_busy_sample()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            ex.close()
            inproc[n].append({"wall": wall, "busy": (b1 - b0) / max(1, t1 - t0),
                              "client_cpu": (r1.ru_utime + r1.ru_stime)
                              - (r0.ru_utime + r0.ru_stime)})
        if time.monotonic() < deadline:
            with quiet_executor(biggest, max_parallel=16) as ex:
                started = time.perf_counter()
                ex.each(biggest.hosts_in("app"), lambda c: c.run(["true"], mutates=False))
                narrow.append(time.perf_counter() - started)
    result: dict[str, Any] = {"sizes": list(FANOUT_SIZES), "in_process": {}, "cli": None}
    for n, samples in inproc.items():
        result["in_process"][str(n)] = {
            "wall_s": round(median([s["wall"] for s in samples]), 3),
            "min_wall_s": round(min(s["wall"] for s in samples), 3),
            "machine_cpu_busy": round(median([s["busy"] for s in samples]), 2),
            "client_cpu_s": round(median([s["client_cpu"] for s in samples]), 3),
            "samples": len(samples),
        }
    ip = result["in_process"]
    one, most = str(min(FANOUT_SIZES)), str(max(FANOUT_SIZES))
    result["in_process_ratio"] = round(ip[most]["wall_s"] / ip[one]["wall_s"], 2)
    result["max_parallel"] = quiet_executor(biggest).max_parallel
    result["in_process_max_parallel_16_s"] = round(median(narrow), 3) if narrow else None
    if use_cli:
        walls: dict[int, list[float]] = {n: [] for n in FANOUT_SIZES}
        cpus: dict[int, list[float]] = {n: [] for n in FANOUT_SIZES}
        machine: dict[int, list[float]] = {n: [] for n in FANOUT_SIZES}
        trips: dict[int, dict[str, int]] = {}
        startup = [fab(inventories[1], "inventory.check", budget=budget, timeout=60).seconds
                   for _ in range(2)]
        for _ in range(cli_reps):
            for n in FANOUT_SIZES:
                r = fab(inventories[n], "run", "--tier", "app", "--", "true", budget=budget,
                        timeout=60)
                walls[n].append(r.seconds)
                cpus[n].append(r.cpu_s)
                machine[n].append(r.machine_cpu_s)
                trips[n] = r.round_trips()
        result["cli"] = {
            str(n): {"wall_s": round(median(walls[n]), 3), "min_wall_s": round(min(walls[n]), 3),
                     "cpu_s": round(median(cpus[n]), 3),
                     "machine_cpu_s": round(median(machine[n]), 2), "samples": len(walls[n]),
                     "max_round_trips_per_host": max(trips[n].values(), default=None)}
            for n in FANOUT_SIZES}
        result["cli_startup_s"] = round(median(startup), 3)
        result["cli_ratio"] = round(median(walls[max(FANOUT_SIZES)])
                                    / median(walls[min(FANOUT_SIZES)]), 2)
        result["cli_ratio_of_fastest"] = round(min(walls[max(FANOUT_SIZES)])
                                               / min(walls[min(FANOUT_SIZES)]), 2)
        result["measured_with"] = "fab run --tier app -- true"
        ratio = result["cli_ratio"]
    else:
        result["measured_with"] = ("Executor.each in-process (connect + `true` per host):"
                                   " `fab run` does not exist yet")
        ratio = result["in_process_ratio"]
    result["ratio"] = ratio
    result["target_max_ratio"] = FANOUT_MAX_RATIO
    result["meets_target"] = ratio <= FANOUT_MAX_RATIO
    return result


# --------------------------------------------------------------------------------------
# 5. `fab status`
# --------------------------------------------------------------------------------------
def measure_status(inventory: Path, budget: Budget, runs: int = 3) -> dict:
    settle(budget)
    walls, last = [], None
    for _ in range(runs):
        last = fab(inventory, "status", budget=budget, timeout=120, check=False)
        walls.append(last.seconds)
    assert last is not None
    trips = last.round_trips()
    return {"wall_s": round(median(walls), 3), "wall_samples_s": [round(w, 3) for w in walls],
            "exit_code": last.proc.returncode, "round_trips": trips,
            "max_round_trips_per_host": max(trips.values()) if trips else None}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def render(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*map(str, r)).rstrip() for r in rows]
    return "\n".join(lines)


def table(results: dict) -> str:
    """The summary table, then the rollout's per-host split."""
    rows: list[tuple[str, str, str, str]] = []
    m = results["measurements"]

    def usable(name: str, label: str) -> bool:
        r = m.get(name)
        if r is None or "error" in r or "skipped" in r:
            why = ("not run" if r is None else "ERROR: " + r["error"].splitlines()[0]
                   if "error" in r else "skipped: " + r["skipped"])
            rows.append((label, why[:100], "", ""))
            return False
        return True

    if usable("floor", "1 floor"):
        f = m["floor"]
        rows += [
            ("1 `true` on an open connection", f"{f['executor_open_connection_ms']} ms", "", ""),
            ("  same, TCP_NODELAY off (Nagle)",
             f"{f['executor_open_connection_without_tcp_nodelay_ms']} ms", "", ""),
            ("  new connection + `true`", f"{f['executor_new_connection_ms']} ms", "", ""),
            ("  OpenSSH: new connection / ControlMaster",
             f"{f['openssh_new_connection_ms']} / {f['openssh_controlmaster_ms']} ms", "", ""),
        ]
    if usable("site_noop", "2 no-op `fab site`"):
        s = m["site_noop"]
        rows += [
            ("2 no-op `fab site`", f"{s['wall_s']:.2f} s (in the task: {s['task_elapsed_s']} s)",
             "", ""),
            ("  round trips per host",
             " ".join(f"{h}={n}" for h, n in sorted(s["round_trips"].items())),
             f"<= {SITE_MAX_ROUND_TRIPS}", verdict(s["meets_target"])),
            ("  connections per host", " ".join(f"{h}={n}" for h, n in
                                               sorted(s["connections"].items())), "1", ""),
            ("  tier phases, one after the other",
             ", ".join(f"{k} {v:g}" for k, v in s["phases_s"].items()) + " s", "", ""),
            ("  critical path: connect / remote / local",
             " / ".join(f"{s['critical_path_s'].get(k, '?')}" for k in
                        ("ssh_connect", "remote_commands", "local")) + " s", "", ""),
        ]
    if usable("rolling", "3 `fab deploy.rolling`"):
        r = m["rolling"]
        rows += [
            (f"3 `fab deploy.rolling` ({r['app_hosts']} app hosts)",
             f"{r['wall_s']:.2f} s (pipeline {r['pipeline_s']} s)", "", ""),
            ("  max overhead of one host", f"{r['max_overhead_per_host_s']} s",
             f"<= {ROLLING_MAX_OVERHEAD_S:g} s", verdict(r["meets_target"])),
            ("  overhead per host, all stages amortized",
             f"{r['overhead_per_host_amortized_s']} s", "", ""),
        ]
    if usable("fanout", "4 fan-out"):
        fo = m["fanout"]
        ip = fo["in_process"]
        if fo["cli"]:
            rows.append(("4 `fab run --tier app -- true`, median",
                         ", ".join(f"{n}: {fo['cli'][str(n)]['wall_s']:.2f}" for n in fo["sizes"])
                         + f" s (start-up {fo['cli_startup_s']:.2f} s)", "", ""))
            rows.append(("  fastest run",
                         ", ".join(f"{n}: {fo['cli'][str(n)]['min_wall_s']:.2f}" for n in fo["sizes"])
                         + f" s ({fo['cli_ratio_of_fastest']}x)", "", ""))
        rows.append(("  in-process Executor.each" if fo["cli"] else "4 in-process Executor.each",
                     ", ".join(f"{n}: {ip[str(n)]['wall_s']:.3f}" for n in fo["sizes"])
                     + f" s ({fo['in_process_ratio']}x)", "", ""))
        rows.append((f"  {max(fo['sizes'])} hosts, 16 workers instead of {fo['max_parallel']}",
                     f"{fo['in_process_max_parallel_16_s']} s", "", ""))
        rows.append(("  machine CPU busy meanwhile",
                     ", ".join(f"{n}: {ip[str(n)]['machine_cpu_busy']:.0%}" for n in fo["sizes"]),
                     "", ""))
        rows.append((f"  {max(fo['sizes'])} hosts / 1 host, medians",
                     f"{fo['ratio']}x ({'fab run' if fo['cli'] else 'in-process'})",
                     f"<= {FANOUT_MAX_RATIO:g}x", verdict(fo["meets_target"])))
    if usable("status", "5 `fab status`"):
        st = m["status"]
        rows.append(("5 `fab status`", f"{st['wall_s']:.2f} s (exit {st['exit_code']}, max"
                     f" {st['max_round_trips_per_host']} round trips per host)", "", ""))
    text = render(rows, ("measurement", "value", "target", "verdict"))
    r = m.get("rolling", {})
    if r.get("per_host"):
        def num(v: float | None) -> str:
            return "?" if v is None else f"{v:.2f}"
        host_rows = [(h["host"], h["stage"], num(h["stage_s"]), num(h["drain_wait_s"]),
                      num(h["start_until_ready_s"]), num(h["floor_s"]), num(h["overhead_s"]),
                      num(h["ready_poll_lag_s"]), num(h["nginx_reload_s"]),
                      num(h["other_overhead_s"]), h["round_trips"])
                     for h in r["per_host"]]
        text += ("\n\n`fab deploy.rolling` per host (seconds; floor = drain wait + start until"
                 " the app logs \"listening\"):\n" + render(host_rows, (
                     "host", "stage", "total", "drain", "start", "floor", "overhead",
                     "=poll lag", "+reload", "+other", "round trips")))
        text += ("\nshared stages: " + ", ".join(f"{k} {v:g}" for k, v in
                                                 r["shared_stages_s"].items()) + " s")
    return text


def notes(results: dict) -> list[str]:
    """The closing note: every target that was not met, with the measured figure and why."""
    m = results["measurements"]
    out = []
    s = m.get("site_noop", {})
    if s.get("meets_target") is False:
        out.append(f"no-op site: {s.get('round_trips')} round trips / {s.get('connections')}"
                   f" connections per host (target <= {SITE_MAX_ROUND_TRIPS}, 1 connection)")
    r = m.get("rolling", {})
    if r.get("meets_target") is False:
        out.append(f"rolling: max overhead per host {r.get('max_overhead_per_host_s')} s"
                   f" (target <= {ROLLING_MAX_OVERHEAD_S:g} s); see per_host in the JSON")
    amortized = r.get("overhead_per_host_amortized_s")
    if amortized is not None and amortized > ROLLING_MAX_OVERHEAD_S:
        out.append(f"rolling: counting the shared stages too (preflight, stage, backup, finish"
                   f" and the gaps between stages), the overhead is {amortized} s per host for"
                   f" {r.get('app_hosts')} hosts; the shared part is paid once per rollout, so"
                   f" it shrinks per host as hosts are added")
    for h in r.get("per_host", []):
        if (h.get("ready_poll_lag_s") or 0) > 0.2:
            out.append(f"rolling: {h['host']} answered /ready {h['ready_poll_lag_s']} s before"
                       f" the tool noticed (the readiness probe sleeps between tries): the"
                       f" largest part of the overhead")
            break
    fo = m.get("fanout", {})
    if fo.get("meets_target") is False and fo.get("cli"):
        out.append(f"fan-out: `fab run` on {max(fo['sizes'])} hosts took {fo['ratio']}x one host"
                   f" (target <= {FANOUT_MAX_RATIO:g}x); fastest runs: {fo['cli_ratio_of_fastest']}x")
    if fo.get("in_process_ratio", 0) > FANOUT_MAX_RATIO:
        ip = fo["in_process"]
        most = str(max(fo["sizes"]))
        out.append(
            f"fan-out without the CLI's start-up: {most} hosts took {fo['in_process_ratio']}x"
            f" one host. While the {most} handshakes ran, this machine's CPU was"
            f" {ip[most]['machine_cpu_busy']:.0%} busy: every lab host's sshd runs on the same"
            f" {os.cpu_count()} cores (our client used {ip[most]['client_cpu_s']} s of CPU for"
            f" all {most}), so the server side of the handshakes queues here in a way it does"
            f" not on real hosts")
    growth = client_cpu_growth(results.get("scale") or {})
    if growth:
        out.append("the client's own CPU time (the fab process) from the smallest to the largest"
                   " scale point: " + ", ".join(f"{k} {v}x" for k, v in growth.items())
                   + "; the rest of each host's cost is its sshd and probes, which on this lab"
                   " share the runner's cores")
    busy = machine_busy(results.get("scale") or {})
    if busy:
        out.append("the whole machine's CPU time per run (every core: our client and the lab's"
                   " hosts) from the smallest to the largest scale point: "
                   + ", ".join(f"{k} {v['growth']}x" for k, v in busy.items())
                   + "; at the largest point the cores were "
                   + ", ".join(f"{v['busy']:.0%}" for v in busy.values())
                   + " busy and our client's share of that CPU was "
                   + ", ".join(f"{v['client_share']:.0%}" for v in busy.values())
                   + (": with the cores saturated, the wall time follows the CPU the lab's"
                      " hosts need" if min(v["busy"] for v in busy.values()) >= 0.9 else ""))
    floor = results.get("ssh_floor")
    if floor and floor["metrics"]:
        names = {"noop_site_s": "no-op site", "status_s": "status", "fanout_s": "fan-out"}
        parts = floor["metrics"].items()
        out.append(
            f"the SSH floor (our executor connecting to each app host and running `true`,"
            f" in-process: no CLI, no reads) grew {floor['floor_growth_s']} s from"
            f" {floor['from_hosts']} to {floor['to_hosts']} app hosts. <= {scale.MAX_GROWTH:g}x"
            f" lets " + ", ".join(f"{names[k]} grow {v['allowed_growth_s']} s" for k, v in parts)
            + "; they grew " + ", ".join(f"{v['growth_s']} s" for _, v in parts)
            + ". The floor alone takes " + ", ".join(
                f"{v['floor_share_of_allowed']:.0%}" for _, v in parts) + " of those budgets")
    if "fanout" in m and not {"error", "skipped"} & set(m["fanout"]) and not m["fanout"]["cli"]:
        out.append("fan-out was measured in-process: `fab run` (fabfile/adhoc.py) does not"
                   " exist yet")
    if "status" in m and "skipped" in m["status"]:
        out.append(f"status: {m['status']['skipped']}")
    for name, res in m.items():
        if "error" in res:
            out.append(f"{name}: failed: {res['error'].splitlines()[0]}")
    return out


def client_cpu_growth(points: dict) -> dict[str, float]:
    """Metric -> the client CPU time at the largest scale point over the smallest."""
    found = {m: scale.growth(points, f"{m}_cpu_s") for m in scale.CURVE_METRICS}
    return {m: g for m, g in found.items() if g is not None}


def machine_busy(points: dict) -> dict[str, dict]:
    """Metric -> the machine's CPU growth over the scale curve and, at its largest point,
    how busy the cores were and the client's share of that CPU."""
    found: dict[str, dict] = {}
    ends = scale.curve_ends(points)
    if ends is None:
        return found
    largest = points[ends[1]]
    for m in scale.CURVE_METRICS:
        grown = scale.growth(points, f"{m}_machine_cpu_s")
        machine, wall = largest.get(f"{m}_machine_cpu_s"), largest.get(f"{m}_s")
        client = largest.get(f"{m}_cpu_s")
        if grown is None or not machine or not wall or client is None:
            continue
        found[m] = {"growth": grown, "busy": machine / (wall * (os.cpu_count() or 1)),
                    "client_share": client / machine}
    return found


# --------------------------------------------------------------------------------------
def ensure_inotify_instances() -> str | None:
    try:
        current = int(INOTIFY_INSTANCES.read_text())
    except (OSError, ValueError):
        return None
    if current >= INOTIFY_NEEDED:
        return None
    INOTIFY_INSTANCES.write_text(f"{INOTIFY_NEEDED}\n")
    return (f"raised fs.inotify.max_user_instances {current} -> {INOTIFY_NEEDED}"
            f" (a {max(FANOUT_SIZES) + 2}-host lab needs more than the default)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-fanout", action="store_true",
                        help="skip item 4 (needs a 22-host lab)")
    parser.add_argument("--skip-first-site", action="store_true",
                        help="skip the first `fab site` on three fresh labs")
    parser.add_argument("--keep-lab", action="store_true",
                        help="leave the lab up at the end (default: tear it down)")
    parser.add_argument("--output", default=str(RESULTS / "latest.json"),
                        help="where to write the JSON results")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (the lab uses namespaces, mounts and systemd-nspawn)",
              file=sys.stderr)
        return 2
    budget = Budget(TOTAL_BUDGET_S)
    ident = current_identity()
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                    "python": platform.python_version(), "kernel": platform.release()},
        "lab_id": ident.lab_id or None,
        "measurements": {},
    }
    m = results["measurements"]

    def measure(name: str, fn: Callable[[], dict]) -> None:
        say(f"{name} ...")
        t0 = time.monotonic()
        try:
            m[name] = fn()
        except OutOfTime as exc:
            m[name] = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not hide the rest
            m[name] = {"error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=5)}
        say(f"{name} done in {time.monotonic() - t0:.1f} s")

    try:
        note = ensure_inotify_instances()
        if note:
            say(note)
            results["machine"]["note"] = note
        tasks = fab_tasks()
        if args.skip_first_site:
            m["first_site"] = {"skipped": "--skip-first-site"}
        else:
            measure("first_site", lambda: scale.first_site(budget))
        say(f"lab.up --apps {APPS_FOR_ROLLING} (LAB_ID={ident.lab_id or 'unset'})")
        t0 = time.monotonic()
        inventory = lab_ops.up(lab_ops.LabRequest("split", APPS_FOR_ROLLING))
        results["lab_up_s"] = round(time.monotonic() - t0, 1)
        measure("floor", lambda: measure_floor(inventory, budget))
        measure("site_noop", lambda: measure_site(inventory, budget))
        if "status" in tasks:
            measure("status", lambda: measure_status(inventory, budget))
        else:
            m["status"] = {"skipped": "`fab status` does not exist yet (fabfile/status.py)"}
        # Once the lab is provisioned and idle: right after lab.up its hosts were still
        # settling, and the CLI's start-up measured their load as much as its own.
        measure("cli_start", lambda: scale.cli_start(inventory, budget))
        if "error" in m.get("site_noop", {}):
            m["rolling"] = {"error": "not run: the lab was not provisioned (fab site failed)"}
        else:
            measure("rolling", lambda: measure_rolling(inventory, budget))
        if args.skip_fanout:
            m["fanout"] = {"skipped": "--skip-fanout"}
        else:
            big = max(FANOUT_SIZES)
            say(f"lab.up --apps {big} --proxies {FANOUT_PROXIES} (replaces the lab)")
            t0 = time.monotonic()
            try:
                lab_ops.up(lab_ops.LabRequest("split", big, proxies=FANOUT_PROXIES))
                results["fanout_lab_up_s"] = round(time.monotonic() - t0, 1)
                inv_dir = RESULTS / f"inventories{ident.lab_id or ''}"
                subsets = {n: subset_inventory(n, inv_dir) for n in FANOUT_SIZES}
                measure("fanout", lambda: measure_fanout(budget, use_cli="run" in tasks))
                for n in SCALE_SIZES:
                    measure(f"scale_{n}", lambda n=n: scale.scale_point(subsets[n], budget))
                hosts = [h.name for h in load_inventory(subsets[big]).hosts]
                measure("lab_memory", lambda: scale.lab_memory(hosts))
                apps = [h for h in hosts if h.startswith("app")]
                proxies = [h for h in hosts if h.startswith("proxy")]
                measure("rolling_batches", lambda: scale.rolling_batches(
                    subsets[big], budget, apps, proxies, batch=ROLLING_BATCH))
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - lab.up raises SystemExit
                m["fanout"] = {"error": f"lab.up --apps {big} failed: {exc}"}
    finally:
        if not args.keep_lab:
            say("lab.down")
            lab_ops.down()
    results["total_s"] = round(time.monotonic() - started, 1)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    results.update(scale.summary(m, SCALE_SIZES))  # the fixed names, at the top level
    results["targets"] = scale.check_targets(results)
    results["ssh_floor"] = scale.floor_budget(
        ((m.get("fanout") or {}).get("in_process") or {}), results["scale"])
    results["missed"] = [t["name"] for t in results["targets"] if t["met"] is False]
    results["notes"] = notes(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{results['machine']['cpus']} CPUs, load average {results['machine']['load_avg_at_start'][0]:.2f}"
          f" at start; bench took {results['total_s']} s; results in {out}")
    print("\ntargets (issue 15):")
    print(render([(t["name"], "not measured" if t["value"] is None else t["value"], t["target"],
                   verdict(t["met"])) for t in results["targets"]],
                 ("target", "value", "limit", "verdict")))
    print(f"missed: {', '.join(results['missed']) or 'none'}")
    print("\nscale curve (seconds; fan-out = `fab run --tier app -- true`; client CPU = the"
          " fab process's own CPU time):")
    print(render([(n, p["noop_site_s"], p["status_s"], p["fanout_s"], p.get("noop_site_cpu_s"),
                   p.get("status_cpu_s"), p.get("fanout_cpu_s"))
                  for n, p in results["scale"].items()],
                 ("app hosts", "no-op site", "status", "fan-out", "client CPU: no-op site",
                  "status", "fan-out")))
    print("\nCPU time per run (seconds; machine = every core's busy time: our client and the"
          " lab's hosts):")
    print(render([(n, p.get("noop_site_machine_cpu_s"), p.get("status_machine_cpu_s"),
                   p.get("fanout_machine_cpu_s")) for n, p in results["scale"].items()],
                 ("app hosts", "machine: no-op site", "status", "fan-out")))
    print(f"status {results['status_s']} s, rolling over {max(SCALE_SIZES)} hosts (batch"
          f" {ROLLING_BATCH}) {results['rolling_s']} s, lab memory per host"
          f" {results['lab_mem_per_host_mb']} MB")
    if results["notes"]:
        print("\nnotes:")
        for n in results["notes"]:
            print(f"  - {n}")
    # Missed targets are explained in the notes; a measurement that could not run is a failure.
    return 1 if any("error" in r for r in m.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
