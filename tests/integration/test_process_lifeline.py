"""Processes the test kit starts die with the process that started them (tools/lifeline.py): a
killed pytest (`timeout`, SIGKILL) leaves no broker, store or service behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tools.processes import ROOT

# A parent that starts a local stack (broker and store), prints the children's pids, then waits.
_STACK_PARENT = """
import json, sys, time
from pathlib import Path
from tools.stack import LocalStack, free_port
stack = LocalStack(Path(sys.argv[1]), kafka_port=free_port(), mongo_port=free_port(), mongo_memory=True)
stack.start_kafka()
stack.start_mongo()
print(json.dumps([p.pid for p in stack.procs.values()]), flush=True)
time.sleep(600)
"""

# A parent that starts a child from a worker thread which then ends, prints its pid, then waits.
_THREAD_PARENT = """
import json, threading, time
from tools.lifeline import popen_tied
started = []
worker = threading.Thread(target=lambda: started.append(popen_tied(["sleep", "600"])))
worker.start()
worker.join()
print(json.dumps([started[0].pid]), flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reaped-late child of a dead parent still has a /proc entry)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _start_parent(script: str, *args: str) -> tuple[subprocess.Popen[str], list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert parent.stdout is not None
    return parent, [int(pid) for pid in json.loads(parent.stdout.readline())]


def _all_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_stack_dies_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    parent, pids = _start_parent(_STACK_PARENT, str(tmp_path))
    try:
        assert len(pids) == 2 and all(_running(pid) for pid in pids)
        parent.kill()
        parent.wait()
        assert _all_gone(pids, timeout=30), "broker or store outlived the killed parent"
    finally:
        parent.kill()
        _kill_all(pids)


def test_a_child_started_from_a_finished_worker_thread_lives_as_long_as_its_process(tmp_path: Path) -> None:
    parent, pids = _start_parent(_THREAD_PARENT)
    try:
        time.sleep(0.5)  # a child tied to the finished thread would be signalled at once
        assert all(_running(pid) for pid in pids), "the child died with the thread that started it"
        parent.kill()
        parent.wait()
        assert _all_gone(pids, timeout=10), "the child outlived the killed parent"
    finally:
        parent.kill()
        _kill_all(pids)
