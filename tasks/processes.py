"""An in-process run's processes and signals: Prefect's ephemeral API server dies with the run, and Ctrl-C or
SIGTERM stop the run within seconds.

`guard_ephemeral_server` starts the ephemeral API server that Prefect would start at the flow's first API call
(the same instance: Prefect reuses it) and puts it under a watchdog (`lanpo_core.procs`), so even a SIGKILL of the
run does not leave it running.

`stop_on_signals` turns SIGINT and SIGTERM into `Interrupted` in the main thread: the flow unwinds through its
`finally` blocks (the MLflow run ends KILLED, the rollout engine and the verifier workers are closed). A Python
handler runs only when the main thread next executes Python code, and the unwinding itself may block (a long C
call, a process that does not stop): a thread woken by the signal itself (`signal.set_wakeup_fd`) forces the exit
`grace` seconds after the first signal, or at once on a second one, ending the MLflow run KILLED and killing the
child processes first. Either way the run resumes with the same command (stage cache, atomic checkpoints).
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from lanpo_core.procs import WATCHDOGS, start_watchdog, stop_processes, stop_watchdog

from . import tracking

log = logging.getLogger(__name__)

GRACE_SECONDS = 5.0
"""Seconds between the first signal and the forced exit."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


_server_watchdog = None


def guard_ephemeral_server() -> str | None:
    """Start Prefect's ephemeral API server, watched so that it dies with this process; its URL (None when a
    Prefect server is configured, PREFECT_API_URL, or ephemeral mode is off)."""
    global _server_watchdog
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    server = SubprocessASGIServer()  # the instance Prefect's `get_client` starts and uses
    server.start()
    if _server_watchdog is None and server.server_process is not None:
        _server_watchdog = start_watchdog([server.server_process.pid])
        # registered after Prefect's own `stop` (atexit runs last-in first-out): the watchdog goes first, then
        # Prefect stops its server
        atexit.register(stop_watchdog, _server_watchdog)
    return server.api_url


def _force_exit(signum: int, reason: str) -> None:
    """End the MLflow runs KILLED, stop the child processes (not the watchdogs: they clean up after them), exit."""
    import psutil

    try:
        os.write(2, f"\nlanpo: {reason}; forcing the exit\n".encode())
    except OSError:
        pass
    tracking.end_active_runs("KILLED")
    stop_processes([p for p in psutil.Process().children(recursive=True) if p.pid not in WATCHDOGS], timeout=4,
                   patience=0)
    os._exit(128 + signum)


def _watch(read_fd: int, grace: float, received: list[int]) -> None:
    first: int | None = None
    deadline = None
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
        ready, _, _ = select.select([read_fd], [], [], timeout)
        if not ready:
            _force_exit(first, f"still running {grace:.0f} s after {signal.Signals(first).name}")
        data = os.read(read_fd, 64)
        if not data:
            return  # closed: the context ended
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            received.append(signum)
            if first is None:
                first, deadline = signum, time.monotonic() + grace
            else:
                _force_exit(first, f"second signal ({signal.Signals(signum).name})")


@contextmanager
def stop_on_signals(grace: float = GRACE_SECONDS) -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, and the process exits at the latest `grace` seconds
    later (at once on a second signal), with status 128 + the signal. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_signals works only in the main thread")
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd needs it: the C signal handler must never block
    raised: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        # once: a second signal must not cut the unwinding short with a new exception (the watcher then forces the
        # exit, with the first signal's status)
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    # Prefect swaps in its own SIGTERM handler while a flow runs; the wakeup fd is written by the C-level handler
    # for every signal with a Python handler, whichever that is.
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    received: list[int] = []
    watcher = threading.Thread(target=_watch, args=(read_fd, grace, received), name="lanpo-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        if not received and not raised:
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the watcher reads EOF and returns
            watcher.join(timeout=5)
            os.close(read_fd)
        # else the handlers and the watcher stay, with its deadline (a second signal still forces the exit), while
        # the interpreter exits: Prefect stops its server, the rollout engine closes at exit


def exit_status(exc: BaseException) -> int | None:
    """The exit status for a run stopped by a signal (130, 143), None for any other exception."""
    from prefect.exceptions import TerminationSignal

    if isinstance(exc, Interrupted):
        return exc.exit_status
    if isinstance(exc, TerminationSignal):
        return 128 + exc.signal
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return None

