"""A service as a child process (`python -m services.<name>`), as the bench and the tests run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tools.lifeline import popen_tied

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServiceProcess:
    """One service process on its own port, its output appended to `log_path`."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or restart) the process."""
        env = {**os.environ, **self.env, f"ALLIANCE_{self.name.upper()}_PORT": str(self.port),
               "PYTHONPATH": str(ROOT)}
        out = open(self.log_path, "ab")
        self.proc = popen_tied([sys.executable, "-m", f"services.{self.name}"], env=env, cwd=ROOT,
                               stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until /readyz answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=3)
                if r.status_code == 200:
                    return
                last = r.text[:200]
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {last}; see {self.log_path}")

    def kill(self) -> None:
        """kill -9 (fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
