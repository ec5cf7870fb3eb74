"""The bench's fleet-size measurements (issue 15): CLI start-up, the first `fab site` on
fresh hosts, the scale curve (no-op site and status at 10, 20 and 40 app hosts behind 2
proxies), a rolling deploy over 40 hosts in batches of 5, and the lab's memory per host."""
from __future__ import annotations

import re
from pathlib import Path

from benchlib import Budget, FabRun, fab, median, parse_ts, say, settle

from lab import lab as lab_ops
from lab import machine
from lab.config import current_identity

FIRST_SITE_APPS = 3  # the 5-host split lab
FIRST_VERSION, NEXT_VERSION = "1.0.0", "1.1.0"


def cli_start(inventory: Path, budget: Budget, runs: int = 5) -> dict:
    """`fab --list` and `fab inventory.check` (no connection), median wall time."""
    settle(budget)
    listing = [fab(inventory, "--list", budget=budget, timeout=60).seconds for _ in range(runs)]
    check = [fab(inventory, "inventory.check", budget=budget, timeout=60).seconds
             for _ in range(runs)]
    return {"list_s": round(median(listing), 3), "inventory_check_s": round(median(check), 3),
            "samples": runs}


def first_site(budget: Budget, runs: int = 3) -> dict:
    """The first `fab site` on freshly booted hosts (a new 5-host lab each time)."""
    walls, phases = [], []
    for i in range(runs):
        lab_ops.down()
        inventory = lab_ops.up(lab_ops.LabRequest("split", FIRST_SITE_APPS))
        say(f"first site {i + 1}/{runs} ...")
        run = fab(inventory, "site", "--version", FIRST_VERSION, budget=budget, timeout=900)
        walls.append(run.seconds)
        phases.append({m.group(1): float(m.group(2)) for m in re.finditer(
            r"^\[site\] (\w+) done in ([\d.]+) s", run.proc.stdout, re.MULTILINE)})
    return {"wall_s": round(median(walls), 2), "samples_s": [round(w, 2) for w in walls],
            "phases_s": phases}


def _rss_mb(host: str) -> float | None:
    """Resident memory of one lab host (its cgroup: cgroup v1 total_rss + total_shmem, or
    v2 anon + shmem), in MB."""
    for d in machine.cgroup_dirs(current_identity(), host):
        stat = d / "memory.stat"
        if not stat.exists():
            continue
        values = dict((k, int(v)) for k, v in (line.split() for line in
                                               stat.read_text().splitlines()))
        if "total_rss" in values:
            used = values["total_rss"] + values.get("total_shmem", 0)
        else:
            used = values.get("anon", 0) + values.get("shmem", 0)
        return round(used / 1e6, 1)
    return None


def lab_memory(hosts: list[str]) -> dict:
    """Memory per host by role (proxy, app, db) and the mean, on the running lab."""
    per_host = {h: _rss_mb(h) for h in hosts}
    known = {h: v for h, v in per_host.items() if v is not None}
    roles: dict[str, list[float]] = {}
    for h, v in known.items():
        roles.setdefault(re.sub(r"\d+$", "", h), []).append(v)
    return {"mean_mb": round(sum(known.values()) / len(known), 1) if known else None,
            "by_role_mb": {r: round(sum(v) / len(v), 1) for r, v in roles.items()},
            "total_mb": round(sum(known.values()), 1), "hosts": len(known)}


def scale_point(inventory: Path, budget: Budget, runs: int = 3) -> dict:
    """On the first N app hosts of the big lab: converge once (the proxies' upstreams, the
    db's pg_hba and the firewall follow N), then time no-op sites and status."""
    # On a firewalled fleet `fab site` opens the db's 5432 for the new app hosts before its
    # app tier starts them (`firewall.open_ahead`): no separate firewall step needed.
    fab(inventory, "site", "--version", FIRST_VERSION, budget=budget, timeout=900)
    settled = settle(budget)
    noop = [fab(inventory, "site", budget=budget, timeout=300) for _ in range(runs)]
    for r in noop:
        if not re.search(r"^site: 0 changed", r.proc.stdout, re.MULTILINE):
            raise RuntimeError("a second `fab site` was not a no-op")
    status = [fab(inventory, "status", budget=budget, timeout=300, check=False)
              for _ in range(runs)]
    return {"noop_site_s": round(median([r.seconds for r in noop]), 3),
            "status_s": round(median([r.seconds for r in status]), 3),
            "noop_site_cpu_s": round(median([r.cpu_s for r in noop]), 3),
            "status_cpu_s": round(median([r.cpu_s for r in status]), 3),
            "noop_site_machine_cpu_s": round(median([r.machine_cpu_s for r in noop]), 2),
            "status_machine_cpu_s": round(median([r.machine_cpu_s for r in status]), 2),
            "round_trips_max": max(noop[-1].round_trips().values()), "settled_s": settled}


def _batch_floor(run: FabRun, start: float, end: float, apps: set[str],
                 proxies: set[str]) -> float:
    """What a batch cannot avoid: the proxies' drain wait (the longest proxy) plus the
    slowest host's restart until it answers /ready."""
    inside = [c for c in run.of("command") if start - 0.002 <= parse_ts(c["ts"]) <= end + 0.002]
    drain: dict[str, float] = {}
    start_ready: dict[str, float] = {}
    for c in inside:
        if c["host"] in proxies and "wait for old nginx workers" in c["command"]:
            drain[c["host"]] = drain.get(c["host"], 0.0) + c["seconds"]
        elif c["host"] in apps and ("restart releasy.service" in c["command"]
                                    or "releasy-ready" in c["command"]):
            start_ready[c["host"]] = start_ready.get(c["host"], 0.0) + c["seconds"]
    return max(drain.values(), default=0.0) + max(start_ready.values(), default=0.0)


def rolling_batches(inventory: Path, budget: Budget, apps: list[str], proxies: list[str],
                    batch: int = 5) -> dict:
    """`fab deploy.rolling --batch N` over every app host: per batch, its time above the
    floor (drain wait + the slowest restart until ready) is the tool's overhead."""
    run = fab(inventory, "deploy.rolling", "--version", NEXT_VERSION, "--batch", str(batch),
              "--yes", budget=budget, timeout=900, trace=True)
    opened: dict[tuple[str, str], float] = {}
    batches = []
    for e in run.of("stage"):
        key = (e["stage"], e["host"])
        if "seconds" not in e:
            opened[key] = parse_ts(e["ts"])
        elif key in opened and e["stage"] in ("migrate", "roll"):
            start, end = opened.pop(key), parse_ts(e["ts"])
            floor = _batch_floor(run, start, end, set(apps), set(proxies))
            batches.append({"label": e["host"], "seconds": round(float(e["seconds"]), 3),
                            "floor_s": round(floor, 3),
                            "overhead_s": round(float(e["seconds"]) - floor, 3)})
    overheads = [b["overhead_s"] for b in batches]
    return {"app_hosts": len(apps), "batch": batch, "wall_s": round(run.seconds, 2),
            "batches": batches,
            "overhead_per_batch_s": round(median(overheads), 3) if overheads else None,
            "max_overhead_per_batch_s": max(overheads, default=None)}


# Targets (issue 15): name in the JSON -> the largest value that meets it.
TARGETS = {"first_site_s": 15.0, "cli_start_s": 0.2, "task_start_s": 0.25,
           "noop_site_s": 1.0, "rolling_overhead_per_host_s": 1.0,
           "rolling_overhead_per_batch_s": 1.0}
MAX_GROWTH = 2.0  # from the smallest to the largest fleet of the scale curve


def _get(m: dict, name: str, key: str):
    r = m.get(name) or {}
    return None if "error" in r or "skipped" in r else r.get(key)


def summary(m: dict, sizes: tuple[int, ...]) -> dict:
    """The results under fixed names (a script compares runs by these)."""
    cli = m.get("cli_start") or {}
    fanout_cli = (m.get("fanout") or {}).get("cli") or {}
    fanout = {str(n): v["wall_s"] for n, v in fanout_cli.items()}
    scale_ = {}
    for n in sizes:
        point = m.get(f"scale_{n}") or {}
        if "noop_site_s" in point:
            # The *_cpu_s: the fab process's own CPU time (the client's share of the curve);
            # *_machine_cpu_s: every core's busy time meanwhile (the client and the lab).
            fan = fanout_cli.get(str(n)) or {}
            scale_[str(n)] = {"noop_site_s": point["noop_site_s"], "status_s": point["status_s"],
                              "fanout_s": fanout.get(str(n)),
                              "noop_site_cpu_s": point.get("noop_site_cpu_s"),
                              "status_cpu_s": point.get("status_cpu_s"),
                              "fanout_cpu_s": fan.get("cpu_s"),
                              "noop_site_machine_cpu_s": point.get("noop_site_machine_cpu_s"),
                              "status_machine_cpu_s": point.get("status_machine_cpu_s"),
                              "fanout_machine_cpu_s": fan.get("machine_cpu_s")}
    starts = [v for v in (cli.get("list_s"), cli.get("inventory_check_s")) if v is not None]
    return {
        "first_site_s": _get(m, "first_site", "wall_s"),
        "cli_start_s": max(starts) if starts else None,
        "task_start_s": _get(m, "site_noop", "startup_s"),
        "noop_site_s": _get(m, "site_noop", "wall_s"),
        "status_s": _get(m, "status", "wall_s"),
        "rolling_s": _get(m, "rolling_batches", "wall_s"),
        "rolling_overhead_per_host_s": _get(m, "rolling", "overhead_per_host_amortized_s"),
        "rolling_overhead_per_batch_s": _get(m, "rolling_batches", "overhead_per_batch_s"),
        "fanout_s": fanout,
        "scale": scale_,
        "lab_mem_per_host_mb": _get(m, "lab_memory", "mean_mb"),
    }


# The scale curve's metrics, as their names start (``noop_site_s``, ``noop_site_cpu_s``...).
CURVE_METRICS = ("noop_site", "status", "fanout")


def curve_ends(points: dict) -> tuple[str, str] | None:
    """The keys of the smallest and the largest scale point (None: fewer than two)."""
    sizes = sorted(points, key=int)
    return (sizes[0], sizes[-1]) if len(sizes) >= 2 else None


def growth(points: dict, metric: str) -> float | None:
    """``metric`` at the largest scale point over the smallest (None: not measured)."""
    ends = curve_ends(points)
    if ends is None:
        return None
    first, last = points[ends[0]].get(metric), points[ends[1]].get(metric)
    return round(last / first, 2) if first and last else None


def floor_budget(floor: dict, points: dict) -> dict | None:
    """What the SSH floor takes of the growth budget. The floor is our executor connecting
    to each app host and running `true`, in-process (no CLI start-up, no reads: the fan-out
    measurement's ``in_process``, by host count). ``MAX_GROWTH`` lets each metric grow
    from the smallest to the largest scale point by its value at the smallest times
    ``MAX_GROWTH - 1``; the floor's own growth over the same points is part of that."""
    ends = curve_ends(points)
    if ends is None or ends[0] not in floor or ends[1] not in floor:
        return None
    lo, hi = ends
    grown = floor[hi]["wall_s"] - floor[lo]["wall_s"]
    metrics = {}
    for metric in (f"{m}_s" for m in CURVE_METRICS):
        a, b = points[lo].get(metric), points[hi].get(metric)
        if a and b:
            allowed = a * (MAX_GROWTH - 1)
            metrics[metric] = {"allowed_growth_s": round(allowed, 3),
                               "growth_s": round(b - a, 3),
                               "floor_share_of_allowed": round(grown / allowed, 2)}
    return {"from_hosts": int(lo), "to_hosts": int(hi), "floor_growth_s": round(grown, 3),
            "metrics": metrics}


def check_targets(s: dict) -> list[dict]:
    """Every target with its value and verdict (None: not measured)."""
    out = []
    for name, limit in TARGETS.items():
        v = s.get(name)
        out.append({"name": name, "value": v, "target": f"<= {limit:g}",
                    "met": None if v is None else v <= limit})
    sizes = sorted(s["scale"], key=int)
    for metric in (f"{m}_s" for m in CURVE_METRICS):
        ratio = growth(s["scale"], metric)
        out.append({"name": f"scale.{metric} {sizes[0] if sizes else '?'}->"
                            f"{sizes[-1] if sizes else '?'} hosts",
                    "value": ratio, "target": f"<= {MAX_GROWTH:g}x",
                    "met": None if ratio is None else ratio <= MAX_GROWTH})
    return out
