"""Child processes that die with the process that started them.

A broker, store or service started by a test run or a bench must not outlive it: when pytest is
killed (`timeout`, SIGKILL, an OOM kill) its `finally` blocks never run, and the children it started
in their own session (so that a terminal's Ctrl-C reaches only pytest, which then stops them in
order) kept running with parent pid 1, burning CPU for everyone on the machine.

Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`) is set in the child between fork and exec.
It fires when the *thread* that forked the child ends, not the process, so every child is forked
from one daemon thread that lives exactly as long as the process: a child started from a
short-lived worker thread (`asyncio.to_thread(stack.start_mongo)`) would otherwise be killed when
that thread is retired. Elsewhere than Linux the children are started as plain `Popen`s.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, cast

_PR_SET_PDEATHSIG = 1

_Request = tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]


def _die_with(parent: int, sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` arming the parent-death signal (None where prctl does not exist)."""
    if not sys.platform.startswith("linux"):
        return None
    # Looked up before fork: after fork only the call itself runs.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody will signal us
            os.kill(os.getpid(), sig)

    return preexec


class _Spawner:
    """One daemon thread that forks every tied child (see the module docstring for why)."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def popen(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
        with self._lock:
            # A forked copy of this process has no such thread: start one of its own.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._requests = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, args=(self._requests,),
                                                name="lifeline-spawner", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
            done: Future[subprocess.Popen[bytes]] = Future()
            self._requests.put((done, argv, kwargs))
        return done.result()

    @staticmethod
    def _serve(requests: queue.SimpleQueue[_Request]) -> None:
        while True:
            done, argv, kwargs = requests.get()
            try:
                done.set_result(cast("subprocess.Popen[bytes]", subprocess.Popen(argv, **kwargs)))
            except BaseException as exc:  # handed to the caller, raised there
                done.set_exception(exc)


_spawner = _Spawner()


def popen_tied(argv: list[str], *, death_signal: int = signal.SIGKILL, **kwargs: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(argv, **kwargs)` whose child gets `death_signal` when this process dies.

    SIGKILL by default: with the parent gone nobody escalates a graceful stop that hangs, and one
    did (secantusd-py was still stopping 60 s after its SIGTERM in a suite run). The store's data
    and the durable broker's log survive kill -9 (both checked), and the services
    are at-least-once consumers; a normal stop still goes through each one's SIGTERM first."""
    kwargs["preexec_fn"] = _die_with(os.getpid(), death_signal)
    return _spawner.popen(argv, kwargs)
