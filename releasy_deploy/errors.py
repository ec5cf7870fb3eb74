"""Errors the deploy toolkit raises on purpose.

Every `DeployError` carries a one-screen message that names the host and says what to do
next, so the CLI can print ``str(exc)`` and exit without a traceback. Messages are built by
the executor with secrets already masked: never put raw command output into one yourself.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping


class DeployError(Exception):
    """Base class: an expected, actionable failure (print the message, not a traceback)."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadInput(DeployError):
    """Operator input (a flag, an artifact, a plan that would hurt) is wrong; nothing was
    changed (exit code 2)."""


class LockHeld(DeployError):
    """Another task holds the environment's deploy lock (exit code 3)."""


class StepFailed(DeployError):
    """A step of a flow failed on a host and the flow stopped (exit code 1, or 4 when the
    cause was an unreachable host); the message says where everything stands."""

    def __init__(self, message: str, *, host: str | None = None,
                 cause: BaseException | None = None, unreachable: bool | None = None) -> None:
        super().__init__(message, host=host)
        self.cause = cause
        self.unreachable = (is_unreachable(cause) if unreachable is None and cause is not None
                            else bool(unreachable))


class RestoreFailed(StepFailed):
    """A database restore did not finish (failed, timed out, interrupted). ``applied``:
    whether its transaction committed, as read on the database (None: could not be read)."""

    def __init__(self, message: str, *, host: str | None = None,
                 cause: BaseException | None = None, applied: bool | None = None) -> None:
        super().__init__(message, host=host, cause=cause)
        self.applied = applied


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (so every flow
    recovers the same way), told apart for the exit code (143, not 130)."""


def interruption(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM that ended a flow: ``exc`` itself or what caused it (a flow
    that recovered from an interruption raises its failure with the interruption as cause)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = getattr(exc, "cause", None)
        seen += 1
    return None


class HostKeyError(DeployError):
    """The host's SSH key is unknown or differs from known_hosts: never connect anyway."""


class UnreachableError(DeployError):
    """TCP connect, SSH handshake or authentication failed, or the connection dropped."""


class ConnectionDropped(UnreachableError):
    """The SSH connection was up, then lost while a command ran (the command may or may not
    have completed). Unlike a refused or timed-out connect, the host did let us in."""


class SudoError(DeployError):
    """The SSH user is not root and cannot run ``sudo -n`` (missing NOPASSWD rule or sudo)."""


class RemoteCommandError(DeployError):
    """A remote command exited non-zero (with ``check=True``)."""

    def __init__(
        self,
        host: str,
        command: str,
        exit_code: int | None,
        stderr_tail: str,
        *,
        hint: str | None = None,
    ) -> None:
        self.command = command  # rendered and masked
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail  # masked
        status = f"exit code {exit_code}" if exit_code is not None else "no exit code"
        lines = [f"{host}: remote command failed ({status}): {command}"]
        if stderr_tail.strip():
            lines.append("  output (last lines):")
            lines.extend(f"    {line}" for line in stderr_tail.rstrip("\n").splitlines())
        lines.append(
            "  "
            + (
                hint
                or "fix the cause shown above on the host (or in the inventory) and re-run;"
                " steps that already succeeded are skipped"
            )
        )
        super().__init__("\n".join(lines), host=host)


class CommandTimeoutError(RemoteCommandError):
    """A remote command did not finish within its timeout (its channel was closed)."""


class ParallelError(DeployError):
    """Raised by `Executor.each` after every host finished, when at least one failed.

    ``failures`` maps host name -> exception; ``results`` holds the hosts that succeeded.
    """

    def __init__(
        self,
        failures: Mapping[str, BaseException],
        results: Mapping[str, object],
        *,
        mask: Callable[[str], str] | None = None,
    ) -> None:
        self.failures = dict(failures)
        self.results = dict(results)
        ok = ", ".join(sorted(self.results)) or "none"
        lines = [f"{len(self.failures)} of {len(self.failures) + len(self.results)} hosts failed:"]
        for name in sorted(self.failures):
            exc = self.failures[name]
            text = str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"
            first, *rest = text.splitlines() or [""]
            first = first.removeprefix(f"{name}: ")  # most messages already name the host
            lines.append(f"- {name}: {first}")
            lines.extend(f"    {line}" for line in rest)
        lines.append(f"succeeded: {ok}")
        text = "\n".join(lines)
        # Foreign exceptions (KeyError, OSError...) were not built by the executor: mask them.
        super().__init__(mask(text) if mask else text)


def first_line(exc: BaseException, host: str | None = None) -> str:
    """The first line of an error's message (its type name when it has none), without a
    leading "HOST: " when ``host`` is given: for one-line summaries that name the host."""
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.removeprefix(f"{host}: ") if host else line


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` means "could not reach the host(s)" (bad host key included): for a
    parallel failure, when every host failed that way."""
    if isinstance(exc, (UnreachableError, HostKeyError)):
        return True
    if isinstance(exc, StepFailed):
        return exc.unreachable
    if isinstance(exc, ParallelError):
        return bool(exc.failures) and all(is_unreachable(e) for e in exc.failures.values())
    return False


class HostRefusedError(BadInput):
    """What a host runs rules the request out (an unsupported release, a PostgreSQL major
    its release does not offer): bad input found on the host, exit 2, nothing touched."""
