"""`alliance run`: the whole system on one machine, on the embedded broker and store.

Starts the durable local stack (Tansu on s3 over localbucket + SecantusDB, data under
`.alliance/`), the four services as separate processes, a demo tenant with keys, demo
clinicians whose webhooks go to a small receiver run here, and a low-rate simulated clinic
network so a new user sees live data. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import typer

from services.alerts.secretbox import new_key
from shared import auth
from shared.mongo import database, make_client
from shared.settings import SERVICE_PORTS, MongoSettings
from tools.stack import LocalStack

SERVICES = ("intake", "scoring", "alerts", "reporting")
DEMO_TENANT = "demo"
DEMO_SITES = ("north", "south")
DEMO_CLINICIANS = {"c-1": "north", "c-2": "north", "c-3": "south"}


def _local_secret(path: Path) -> str:
    """A keyring that encrypts webhook secrets at rest, kept beside the local data (mode 0600)."""
    if not path.exists():
        path.write_text(new_key("local1"))
        path.chmod(0o600)
    return path.read_text().strip()


def _ensure_demo_keys(state_dir: Path, mongo: MongoSettings) -> dict[str, str]:
    """Demo keys survive restarts of the local system (the store is durable)."""
    path = state_dir / "demo-keys.json"

    async def go() -> dict[str, str]:
        client = make_client(mongo, admin=True)
        try:
            db = database(client, mongo)
            await auth.ensure_indexes(db)
            if path.exists():
                keys: dict[str, str] = json.loads(path.read_text())
                store = auth.KeyStore(db, ttl_seconds=0)
                if all([await store.lookup(k) for k in keys.values()]):
                    return keys
            keys = {}
            for role in ("submit", "read", "admin"):
                keys[role], _ = await auth.create_key(db, DEMO_TENANT, role, label="demo")
            path.write_text(json.dumps(keys))
            path.chmod(0o600)
            return keys
        finally:
            await client.close()

    return asyncio.run(go())


class _Receiver(BaseHTTPRequestHandler):
    log_path: Path = Path("webhooks.log")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with self.log_path.open("a") as f:
            f.write(json.dumps({"webhook_id": self.headers.get("webhook-id"),
                                "event": self.headers.get("x-alliance-event"), "bytes": len(body)}) + "\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def _start_receiver(port: int, log_path: Path) -> ThreadingHTTPServer:
    _Receiver.log_path = log_path
    server = ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return True
        time.sleep(0.5)
    return False


def run(
    rate: float = typer.Option(2.0, help="simulated submissions per second (0 = no simulator)"),
    state_dir: Path = typer.Option(Path(".alliance"), help="data and logs"),
    memory: bool = typer.Option(False, help="memory broker (faster, loses the log on restart)"),
    receiver_port: int = typer.Option(8010, help="port of the demo webhook receiver"),
) -> None:
    """Run broker, store, all four services, demo data and a simulator until Ctrl-C."""
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    stack = LocalStack(state_dir / "data", durable=not memory)
    typer.echo("starting broker and store ...")
    stack.start()
    # A local run is the one place alerts runs in dev mode (it has a generated keyring all the same).
    env = {**os.environ, **stack.env(), "ALLIANCE_ALERTS_ALLOW_PRIVATE_TARGETS": "true",
           "ALLIANCE_ALERTS_DEV_MODE": "true",
           "ALLIANCE_ALERTS_SECRETS_KEYS": _local_secret(state_dir / "secrets-keys"), "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    receiver: ThreadingHTTPServer | None = None
    stop = threading.Event()
    try:
        keys = _ensure_demo_keys(state_dir, MongoSettings(url=stack.mongo_url))
        for name in SERVICES:
            out = open(logs / f"{name}.log", "ab")
            procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env,
                                           stdout=out, stderr=subprocess.STDOUT)
        urls = {n: f"http://127.0.0.1:{SERVICE_PORTS[n]().port}" for n in SERVICES}
        for name in SERVICES:
            if not _wait_ready(urls[name], procs[name], timeout=120):
                typer.echo(f"{name} did not become ready; see {logs / (name + '.log')}", err=True)
                raise typer.Exit(1)
        typer.echo(f"all four services ready in {time.monotonic() - started:.1f}s")
        receiver = _start_receiver(receiver_port, logs / "webhooks.log")
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        # Clinician webhooks are signed with the tenant's secret; a fresh one each run (the demo
        # receiver logs deliveries without verifying them; a real receiver would).
        signing = httpx.post(f"{urls['alerts']}/v1/webhook-secret", headers=admin, timeout=10)
        signing.raise_for_status()
        for clinician, site in DEMO_CLINICIANS.items():
            httpx.put(f"{urls['alerts']}/v1/clinicians/{clinician}", headers=admin, timeout=10, json={
                "site_id": site, "email": f"{clinician}@clinic.example",
                "webhook_url": f"http://127.0.0.1:{receiver_port}/alliance"}).raise_for_status()
        typer.echo("")
        for name, url in urls.items():
            typer.echo(f"  {name:<10} {url}   ({url}/readyz, {url}/metrics)")
        typer.echo(f"  dashboard  {urls['reporting']}/dashboard  (sign in with the read key)")
        typer.echo(f"  webhooks   received by 127.0.0.1:{receiver_port}, logged to {logs / 'webhooks.log'}")
        typer.echo(f"\n  tenant '{DEMO_TENANT}' keys:")
        for role, key in keys.items():
            typer.echo(f"    {role:<7} {key}")
        typer.echo(f"    webhook signing secret: {signing.json()['secret']}")
        typer.echo(f"\n  logs in {logs}; Ctrl-C stops everything\n")
        if rate > 0:
            out = open(logs / "simulator.log", "ab")
            procs["simulator"] = subprocess.Popen([sys.executable, "-m", "tools.cli", "simulate", "--tenants", "1",
                                    "--sites", str(len(DEMO_SITES)), "--clinicians", str(len(DEMO_CLINICIANS)),
                                    "--clients", "40", "--rate", str(rate), "--duration", str(7 * 24 * 3600),
                                    "--url", urls["intake"], "--keys", keys["submit"], "--quiet",
                                    "--roster", ",".join(f"{c}@{s}" for c, s in DEMO_CLINICIANS.items())],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        watchdog = threading.Thread(target=lambda: asyncio.run(_watch(stack, stop)), daemon=True)
        watchdog.start()
        while not stop.is_set():
            for name, p in procs.items():
                if p.poll() is not None and name != "simulator":
                    typer.echo(f"{name} exited ({p.returncode}); see {logs / (name + '.log')}", err=True)
                    stop.set()
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        # Ctrl-C arrives as KeyboardInterrupt, not through `stop`: set it, or the topic watchdog
        # keeps calling the stopped broker and its waiting worker thread holds the exit forever.
        stop.set()
        typer.echo("stopping ...")
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if receiver is not None:
            receiver.shutdown()
        stack.stop()
        typer.echo("stopped")


async def _watch(stack: LocalStack, stop: threading.Event) -> None:
    task = asyncio.create_task(stack.watch_topics())
    await asyncio.to_thread(stop.wait)
    task.cancel()
