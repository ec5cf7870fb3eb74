"""Blue/green deploy on a single host (registered as `deploy.bluegreen`)."""
from invoke import task

from releasy_deploy.cli import JSON_LOG_ENV, operator_task, session, use_json_log
from releasy_deploy.lazy import lazy_module

bg = lazy_module("releasy_deploy.bluegreen")


@task(help={
    "version": "release to deploy, e.g. 1.2.3 (its tarball must verify against the pinned"
               " sha256)",
    "wait": "seconds to wait for another deploy's lock instead of failing at once (exit 3)",
    "dry-run": "show what would change (upstream diff included) without changing anything",
    "json-log": f"also append one JSON object per event to this file (or set {JSON_LOG_ENV})",
    "yes": "do not ask for confirmation (required when stdin is not a terminal, e.g. cron)",
    "ready-timeout": "seconds the new instance has to answer /ready (default:"
                     " app.ready_timeout of the inventory)",
})
@operator_task(dry="dry_run")
def bluegreen(c, version, wait=0, dry_run=False, json_log=None, yes=False, ready_timeout=None):
    """Single host: start VERSION beside the live instance, switch the proxy, stop the old.

    The idle port of app.bluegreen_ports gets releasy@PORT with VERSION; once it answers
    /ready several times in a row the proxy switches to it, in-flight requests to the old
    instance finish, and the old one stops. Any failure before the switch leaves the old
    instance serving, untouched. Exit codes: 0 ok, 1 failed, 2 bad input, 3 lock busy,
    4 host unreachable.
    """
    use_json_log(json_log)
    with session(dry_run=dry_run, action="deploy.bluegreen", hooked=True, version=version) as s:
        try:
            outcome = bg.run(s, version, wait=wait, yes=yes, ready_timeout=ready_timeout)
        finally:
            if s.reporter.tally():  # no summary when nothing was contacted (bad input)
                s.reporter.summary()
        frm = outcome.from_version or "nothing"
        dry = " (dry run)" if outcome.dry_run else ""
        if outcome.result == "already live":
            print(f"deploy.bluegreen{dry}: {version} is already live on {outcome.host}"
                  f" ({outcome.live_unit}); nothing {'would be' if dry else 'was'} restarted")
        elif outcome.dry_run:
            print(f"deploy.bluegreen (dry run): {frm} -> {version} on {outcome.host} would go"
                  f" live as {outcome.live_unit}; nothing was changed")
        else:
            print(f"deploy.bluegreen: {frm} -> {version} live on {outcome.host} as"
                  f" {outcome.live_unit} (127.0.0.1:{outcome.live_port}),"
                  f" {outcome.seconds:.1f} s")
