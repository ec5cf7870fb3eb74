"""Host steps that run in threads beside a flow's own steps: `fab site` converges the
firewall of a host whose firewall was off (a first install) as soon as that host's packages
are in, while the other hosts still install and the later steps run.

`Beside.wait` joins every step started and raises their failures together (a
`ParallelError`, as `Executor.each` does). `Beside.finish` is for the way out of a flow
that failed or was interrupted: it waits for the steps to end (they are bounded) and
reports their failures instead of raising them, so the flow's own error stays the one the
operator sees and acts on.
"""
from __future__ import annotations

import threading
from typing import Callable

from .errors import ParallelError
from .output import Reporter

__all__ = ["Beside"]


class Beside:
    """Steps started by `start`, one daemon thread per host (a second Ctrl-C while the
    flow waits for them still ends the process). ``what`` names them in messages; ``label``
    is the line prefix those go out under (the flow's name)."""

    def __init__(self, *, what: str, label: str, reporter: Reporter) -> None:
        self.what = what
        self._label = label
        self._reporter = reporter
        self._threads: dict[str, threading.Thread] = {}
        self._failures: dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def start(self, host: str, step: Callable[[], object]) -> None:
        """Run ``step()`` for ``host`` now, in its own thread."""
        thread = threading.Thread(target=self._run, args=(host, step), daemon=True,
                                  name=f"{self.what} {host}")
        with self._lock:
            self._threads[host] = thread
        thread.start()

    def _run(self, host: str, step: Callable[[], object]) -> None:
        try:
            step()
        except ParallelError as exc:  # a step that ran `Executor.each` on its host
            with self._lock:
                self._failures.update(exc.failures)
        except BaseException as exc:  # noqa: BLE001 - handed to the flow's thread
            with self._lock:
                self._failures[host] = exc

    def _join(self, *, say: bool = False) -> tuple[list[str], dict[str, BaseException]]:
        """Wait for every step started so far; (their hosts, their failures), once."""
        with self._lock:
            threads = list(self._threads.items())
        running = [host for host, t in threads if t.is_alive()]
        if say and running:
            self._reporter.info(self._label, f"waiting for {self.what} of"
                                             f" {', '.join(running)} to end (begun beside the"
                                             f" other steps; its steps are bounded)")
        for _, thread in threads:
            thread.join()
        with self._lock:
            failures, self._failures = self._failures, {}
            joined, self._threads = list(self._threads), {}
        return joined, failures

    def wait(self) -> None:
        """Join every step; raise their failures (`ParallelError`), once."""
        joined, failures = self._join()
        if failures:
            ok = {h: None for h in joined if h not in failures}
            raise ParallelError(failures, ok, mask=self._reporter.masker)

    def finish(self) -> None:
        """Join every step still running (saying which); report (not raise) their
        failures."""
        _, failures = self._join(say=True)
        for host, exc in failures.items():
            said = str(exc).removeprefix(f"{host}: ") or type(exc).__name__
            self._reporter.error(host, f"{self.what}, begun beside the other steps, failed"
                                       f" too: {said}")
