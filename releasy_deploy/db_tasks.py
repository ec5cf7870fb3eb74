"""`fab db.backup` and `fab db.backups`: a dump now (optionally copied to this machine and
verified), and the listing. `fab db.restore` is `restore_flow`."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .backups import Backup, backup_host, format_size, take_snapshot
from .db_state import gather_state
from .errors import BadInput, DeployError

__all__ = ["download_target", "download", "backup_task", "list_task"]


def download_target(path: str | os.PathLike, name: str | None = None) -> Path:
    """Where ``--download PATH`` writes: PATH itself, or PATH/NAME when PATH is a
    directory. Checked before anything runs (BadInput): the directory must exist, and an
    existing file is never overwritten. ``name`` None: only validate."""

    target = Path(path).expanduser()
    if target.is_dir():
        if name is None:
            return target
        target = target / name
    if target.exists() or target.is_symlink():
        raise BadInput(f"--download {target}: the file exists; choose another path or a"
                       f" directory (the dump's own name is used there)")
    if not target.parent.is_dir():
        raise BadInput(f"--download {target}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise BadInput(f"--download {target}: cannot write to {target.parent}")
    return target


def download(session, backup: Backup, dest: str | os.PathLike) -> tuple[Path, str]:
    """Copy ``backup`` to the operator's machine (0600), streamed over the executor, and
    verify it against the host's sha256 of the dump. Returns (path, sha256). Two round
    trips: the checksum, then the bytes."""
    target = download_target(dest, backup.name)
    conn = session.executor.conn(backup_host(session.inventory))
    res = conn.run(["sha256sum", "--", backup.path], sudo=True, mutates=False)
    expected = res.stdout.split()[0] if res.stdout.split() else ""
    data = conn.read_file(backup.path, sudo=True)
    if data is None:
        raise DeployError(f"{conn.name}: {backup.path} disappeared before it could be"
                          f" downloaded; `fab db.backups` lists what is there", host=conn.name)
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise DeployError(
            f"{conn.name}: the download of {backup.path} does not match the host's copy"
            f" (sha256 {got[:16]}... here, {expected[:16] or '?'}... there; {len(data)} bytes"
            f" received). Nothing was written; re-run `fab db.backup --download` or copy it"
            f" with scp.", host=conn.name)
    # Created 0600 and exclusively: a dump holds all of the application's data.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    conn.reporter.changed(conn.name, f"downloaded {backup.name} to {target} ({len(data)}"
                                     f" bytes, sha256 {got} verified)")
    return target, got



# ------------------------------------------------------------------------------ the tasks
def backup_task(session, *, download_to: str | None = None) -> Backup:
    """``fab db.backup``: a dump now (pg_dump -Fc as postgres / SQLite's online backup),
    named after the release running; optionally copied here and verified."""
    if download_to is not None:
        download_target(download_to)  # a bad path fails before anything runs
    st = gather_state(session)
    inv = session.inventory
    db = backup_host(inv).name
    if st.level is None:
        raise DeployError(f"{db}: cannot read the database's migration level: is the database"
                          f" set up and running? (`fab db.setup`, or `fab site` for SQLite)",
                          host=db)
    backup = take_snapshot(session, running=st.running_release, level=st.level,
                           existing=st.backups)
    if session.dry_run:
        if download_to is not None:
            session.reporter.would(db, f"download it to {download_target(download_to)}")
        return backup
    session.reporter.info(db, f"{backup.name}  {format_size(backup.size)}  taken"
                              f" {backup.when}  {backup.origin}")
    if download_to is not None:
        download(session, backup, download_to)
    return backup


def list_task(session) -> list[Backup]:
    """``fab db.backups``: every dump on the db host, oldest first (one round trip)."""
    return gather_state(session, with_apps=False).backups

