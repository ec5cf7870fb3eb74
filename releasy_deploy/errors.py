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


class HostKeyError(DeployError):
    """The host's SSH key is unknown or differs from known_hosts: never connect anyway."""


class UnreachableError(DeployError):
    """TCP connect, SSH handshake or authentication failed, or the connection dropped."""


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


class HostRefusedError(DeployError):
    """What a host runs rules the request out (an unsupported release, a PostgreSQL major
    its release does not offer): bad input found on the host, exit 2, nothing touched."""

    exit_code_hint = 2
