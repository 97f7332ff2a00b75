"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

A small watchdog process, started in its own session (so a signal to the parent's process group does not reach
it), polls its parent id; once the parent is gone (the watchdog was re-parented) it removes the given folders and
terminates, then kills, the given processes and their descendants. Processes are named by pid and start time, so a
reused pid is never killed.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from typing import Any, Iterable

_WATCHDOG = r"""
import os, shutil, sys, time
ppid, folders = int(sys.argv[1]), [d for d in sys.argv[2].split(os.pathsep) if d]
targets = [tuple(x.split(":")) for x in sys.argv[3:]]
while os.getppid() == ppid:
    time.sleep(0.5)
for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)
import psutil
procs = []
for pid, created in targets:
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 0.01:
            procs.append(p)
            procs.extend(p.children(recursive=True))
    except psutil.Error:
        pass
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
gone, alive = psutil.wait_procs(procs, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


WATCHDOGS: set[int] = set()
"""Pids of the watchdogs this process started (a forced exit leaves them to do their work)."""


def start_watchdog(procs: Iterable[Any], folders: Iterable[str] = ()) -> subprocess.Popen | None:
    """Watch this process: when it dies, terminate (then kill) `procs` (psutil processes, or pids) with their
    descendants and remove `folders`. Returns the watchdog (None when there is nothing to watch over); stop it with
    `stop_watchdog` once the processes were shut down normally."""
    import psutil

    targets = []
    for p in procs:
        try:
            p = p if isinstance(p, psutil.Process) else psutil.Process(int(p))
            targets.append(f"{p.pid}:{p.create_time()}")
        except psutil.Error:
            pass  # already gone
    folders = [str(f) for f in folders]
    if not targets and not folders:
        return None
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), os.pathsep.join(folders), *targets],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        close_fds=True)
    WATCHDOGS.add(watchdog.pid)
    return watchdog


def stop_watchdog(watchdog: subprocess.Popen | None) -> None:
    """Stop a watchdog without it touching what it watches."""
    if watchdog is None:
        return
    WATCHDOGS.discard(watchdog.pid)
    watchdog.terminate()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def stop_processes(procs: list[Any], timeout: float = 10.0, patience: float | None = None) -> list[int]:
    """Give the psutil processes `patience` seconds (default timeout / 2) to exit by themselves, then terminate,
    then kill the rest (timeout / 4 each); reap our own children. Returns the pids that survived."""
    import psutil

    patience = timeout / 2 if patience is None else patience
    _, alive = psutil.wait_procs([p for p in procs if p.is_running()], timeout=patience)
    for stop in ("terminate", "kill"):
        for p in alive:
            try:
                getattr(p, stop)()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=timeout / 4)
    multiprocessing.active_children()  # joins (reaps) finished multiprocessing children
    for p in procs:  # any remaining zombie that is our direct child
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    return [p.pid for p in alive]
