"""`fab site`: provision every tier in dependency order, then the firewall.

db first (the app needs its password), then app (the proxy's upstreams must answer), then
proxy, then the firewall last so a rule mistake cannot stop the earlier steps from
finishing. Hosts of one tier run in parallel inside each tier's setup."""
from __future__ import annotations

import time
from typing import Iterable

from .cli import Session
from .tiers import app, db, firewall, proxy
from .errors import DeployError

STEPS = ("db", "app", "proxy", "firewall")


def smoke_argv(server_name: str) -> list[str]:
    """On a proxy host: GET /ready through nginx's TLS site, as a client would."""
    return ["curl", "-ksS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
            "--resolve", f"{server_name}:443:127.0.0.1", f"https://{server_name}/ready"]


def smoke_test(session: Session) -> None:
    """End-to-end check: every proxy answers /ready with 200 from a Releasy instance."""
    argv = smoke_argv(session.inventory.tls.server_name)

    def check(conn):
        result = conn.run(argv, check=False, mutates=False)
        if result.stdout.strip() != "200":
            raise DeployError(
                f"{conn.name}: https://{session.inventory.tls.server_name}/ready through the "
                f"proxy answered {result.stdout.strip() or result.stderr.strip()!r}, not 200; "
                "check `fab app.setup` output and the app hosts' journals", host=conn.name)
        session.reporter.info(conn.name, "https /ready through the proxy: 200")

    session.executor.each(session.inventory.hosts_in("proxy"), check)


def run(session: Session, version: str | None = None, rotate: Iterable[str] = ()
        ) -> dict[str, int]:
    """Converge the whole inventory; returns the change tally summed over hosts.

    The app hosts' secrets are checked first, so a secret that would drift is refused
    (exit 2) before any tier is touched."""
    started = time.monotonic()
    secrets = app.resolve_secrets(session, rotate)
    for step in STEPS:
        step_started = time.monotonic()
        session.reporter.info("site", f"--- {step} ---")
        if step == "db":
            db.setup(session)
        elif step == "app":
            app.setup(session, version, secrets=secrets)
        elif step == "proxy":
            proxy.setup(session)
        else:
            firewall.apply(session)
        session.reporter.info("site", f"{step} done in {time.monotonic() - step_started:.1f} s")
    if not session.dry_run:
        smoke_test(session)
    tally = session.reporter.tally()
    totals = {
        "changed": sum(t.changed for t in tally.values()),
        "unchanged": sum(t.unchanged for t in tally.values()),
        "would": sum(t.would for t in tally.values()),
    }
    session.reporter.summary()
    verb = "would change" if session.dry_run else "changed"
    count = totals["would"] + totals["changed"] if session.dry_run else totals["changed"]
    print(f"site: {count} {verb}, {totals['unchanged']} unchanged, "
          f"{len(session.inventory.hosts)} hosts, {time.monotonic() - started:.1f} s")
    return totals
