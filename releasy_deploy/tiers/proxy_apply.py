"""Applying a change to nginx on one proxy host: staged uploads, then ONE remote script
(`commands.nginx.apply_script`) that moves them over the live files, checks them with
``nginx -t`` (rolled back if refused) and reloads only when something changed; its exit
codes become errors that say what to fix. Reportable items carry their uploads and
operations (`Item`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..commands import nginx as cmd
from ..errors import DeployError, RemoteCommandError
from ..executor import HostConnection, tail

__all__ = ["APPLY_TIMEOUT", "NginxConfigRejected", "Upload", "Item", "report_item", "upload",
           "apply"]

APPLY_TIMEOUT = cmd.LOCK_TIMEOUT + cmd.RELOAD_TIMEOUT + 60


class NginxConfigRejected(DeployError):
    """``nginx -t`` refused the new files; they were rolled back, nothing was reloaded."""


@dataclass
class Upload:
    """A file to upload (to a staging path) before the apply script runs."""

    data: bytes
    path: str
    mode: int
    secret: bool = False


@dataclass
class Item:
    """One reportable line of a run: what, whether it changes, its diff, and the uploads
    and script operations that make it so."""

    what: str
    changed: bool
    diff: str | None = None
    diff_path: str | None = None
    uploads: list[Upload] = field(default_factory=list)
    ops: list[cmd.Op] = field(default_factory=list)


def report_item(c: HostConnection, item: Item) -> None:
    """Report ``item`` (changed / unchanged / would change), with its diff."""
    if not item.changed:
        c.reporter.unchanged(c.name, item.what)
        return
    if c.dry_run:
        c.reporter.would(c.name, f"change: {item.what}")
    else:
        c.reporter.changed(c.name, item.what)
    if item.diff:
        c.reporter.diff(c.name, item.diff_path or item.what, item.diff)


def upload(c: HostConnection, uploads: Sequence[Upload]) -> None:
    """Upload the staged files; on a failure remove those already uploaded."""
    done: list[str] = []
    try:
        for u in uploads:
            c.put_bytes(u.data, u.path, mode=u.mode, secret=u.secret)
            done.append(u.path)
    except BaseException:
        if done:  # best effort: do not leave staged copies behind
            try:
                c.run(["rm", "-f", "--", *done], sudo=True, check=False)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                pass
        raise


def apply(c: HostConnection, ops: Sequence[cmd.Op], *, enable: bool, fix_hint: str,
           rejected: Sequence[Item] = ()) -> dict[str, list[str]]:
    """Run the apply script; map its exit codes to actionable errors."""
    script = cmd.apply_script(ops, backup_parent=cmd.CONF_DIR, enable=enable)
    res = c.run_script(script, sudo=True, check=False, timeout=APPLY_TIMEOUT,
                       label="swap nginx config, nginx -t, reload if changed")
    markers = cmd.parse_markers(res.stdout)
    if res.exit_code == 0:
        for line in res.stderr.splitlines():
            if "[warn]" in line:
                c.reporter.info(c.name, "nginx -t: " + cmd.tidy_nginx_messages(c.mask(line)))
        return markers
    said = tail(cmd.tidy_nginx_messages(c.mask(res.stderr.strip() or res.stdout.strip())))
    quoted = "\n".join(f"    {line}" for line in said.splitlines()) or "    (no output)"
    if res.exit_code == cmd.EXIT_CONFIG_REJECTED:
        for item in rejected:  # what was refused, to see the offending lines in context
            if item.diff:
                c.reporter.info(c.name, f"rejected: {item.what}")
                c.reporter.diff(c.name, item.diff_path or item.what, item.diff)
        raise NginxConfigRejected(
            f"{c.name}: nginx rejected the new configuration (nginx -t). The previous files"
            f" were restored and nginx was not reloaded: it keeps serving the old"
            f" configuration.\n  nginx -t said:\n{quoted}\n"
            f"  (file names and line numbers refer to the rejected new version)\n"
            f"  Fix: {fix_hint}", host=c.name)
    if res.exit_code == cmd.EXIT_SERVICE_FAILED:
        raise DeployError(
            f"{c.name}: nginx could not start or apply the new configuration; the previous"
            f" files were restored.\n{quoted}\n  Fix: check `journalctl -u nginx` and"
            f" /var/log/nginx/error.log on {c.name} (a port already in use?), then re-run.",
            host=c.name)
    if res.exit_code == cmd.EXIT_LOCKED:
        raise DeployError(f"{c.name}: {said}", host=c.name)
    raise RemoteCommandError(
        c.name, f"sh -s  # script: swap nginx config ({len(ops)} operations)",
        res.exit_code, said,
        hint=f"the previous files were restored; fix the cause on {c.name} and re-run")
