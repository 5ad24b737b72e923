"""The operator CLI (`alliance`, services/cli.py) against the real broker and store, and against
closed ports: `--version`, `keys list`, `deadletters list | show | replay`, choices for enumerated
options, and one line with a hint and exit status 2 when the store or the broker does not answer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from typer.testing import CliRunner, Result

from services import cli
from services.alerts import cli as alerts_cli
from shared import auth
from shared.events import CLIENT_TRANSFER, RECORD_TYPE_HEADER, DeadLetter, DeadLetterReason
from shared.kafka import CORRELATION_HEADER, InboundRecord, dead_letter_record
from shared.mongo import Document
from tests.support.services import Namespace
from tests.support.stack import StackUnderTest
from tools.harness import EventPublisher
from tools.recorder import Record, TopicRecorder
from tools.stack import free_port

ROOT = Path(__file__).resolve().parents[2]


async def invoke(app: Any, *args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def flat(text: str) -> str:
    """Text without the error box and its line breaks (usage errors are drawn in a box)."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.fixture
def cli_env(namespace_m: Namespace, monkeypatch: pytest.MonkeyPatch) -> Namespace:
    for name, value in namespace_m.env().items():
        monkeypatch.setenv(name, value)
    return namespace_m


@pytest.fixture
async def db(namespace_m: Namespace, mongo: AsyncMongoClient[Document]) -> Any:
    return mongo[namespace_m.database]


# ---- version and choices ----------------------------------------------------------------------------


async def test_version_prints_the_installed_package_version() -> None:
    result = await invoke(cli.app, "--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"alliance-stream {metadata.version('alliance-stream')}"


async def test_a_role_outside_the_choices_is_refused_naming_them_and_no_key_is_made(
        cli_env: Namespace, db: Any) -> None:
    tenant = f"choice-{uuid.uuid4().hex[:6]}"
    result = await invoke(cli.app, "keys", "create", "--tenant", tenant, "--role", "superuser")
    assert result.exit_code == 2 and "'submit', 'read', 'admin'" in flat(result.output)
    assert await db[auth.KEYS].count_documents({"tenant_id": tenant}) == 0


async def test_a_delivery_status_outside_the_choices_is_refused(cli_env: Namespace) -> None:
    result = await invoke(alerts_cli.app, "deliveries", "--status", "lost")
    assert result.exit_code == 2 and "'pending', 'delivered', 'failed', 'cancelled'" in flat(result.output)


# ---- keys list --------------------------------------------------------------------------------------


async def test_keys_list_shows_id_tenant_role_site_created_and_revoked_never_the_key_or_its_hash(
        cli_env: Namespace, db: Any) -> None:
    tenant = f"keys-{uuid.uuid4().hex[:6]}"
    key, kept = await auth.create_key(db, tenant, "read", "north", "dashboard")
    _, gone = await auth.create_key(db, tenant, "admin")
    assert await auth.revoke_key(db, gone.key_id)

    result = await invoke(cli.app, "keys", "list", "--tenant", tenant)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {kept.key_id, gone.key_id}
    assert rows[kept.key_id][1:4] == [tenant, "read", "north"] and rows[kept.key_id][5:] == ["-", "dashboard"]
    assert rows[gone.key_id][1:4] == [tenant, "admin", "*"] and rows[gone.key_id][5].endswith("Z")
    assert key not in result.output and auth.hash_key(key) not in result.output


async def test_keys_list_shows_only_the_tenant_asked_for(cli_env: Namespace, db: Any) -> None:
    mine, other = f"mine-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    _, p = await auth.create_key(db, mine, "submit")
    _, q = await auth.create_key(db, other, "submit")
    result = await invoke(cli.app, "keys", "list", "--tenant", mine)
    assert p.key_id in result.stdout and q.key_id not in result.stdout and other not in result.stdout


# ---- dead letters -----------------------------------------------------------------------------------


@dataclass
class Letters:
    tenant: str
    transfer: DeadLetter  # a client transfer scoring set aside (headers kept)
    oversized: DeadLetter  # a scored session reporting could not store
    delivery: DeadLetter  # a delivery alerts gave up on
    transfer_value: bytes


@pytest.fixture(scope="module")
async def letters(namespace_m: Namespace) -> AsyncIterator[Letters]:
    """Three dead letters on the namespace's dead-letter topic, the first one twice (a redelivery's copy)."""
    topics = namespace_m.kafka().topics()
    tenant = f"dl-{uuid.uuid4().hex[:6]}"
    value = json.dumps({"record_type": CLIENT_TRANSFER, "event_id": "t-1", "tenant_id": tenant,
                        "client_id": "client-1", "site_id": "south"}).encode()
    transfer = InboundRecord(topics.submitted, 2, 40, f"{tenant}:client-1".encode(), value,
                             {CORRELATION_HEADER: "corr-transfer", RECORD_TYPE_HEADER: CLIENT_TRANSFER}, 0)
    scored = InboundRecord(topics.scored, 1, 7, f"other-{tenant}:client-2".encode(), b'{"session": "big"}', {}, 0)
    records = [dead_letter_record("scoring", transfer, DeadLetterReason.PERMANENT_ERROR, "refused", topics.deadletter,
                                  tenant),
               dead_letter_record("reporting", scored, DeadLetterReason.RECORD_TOO_LARGE, "at its cap",
                                  topics.deadletter, f"other-{tenant}")]
    delivery = DeadLetter(event_id=str(uuid.uuid4()), tenant_id=tenant, occurred_at=datetime.now(UTC), service="alerts",
                          reason=DeadLetterReason.DELIVERY_FAILED, detail="delivery d-1 failed",
                          source_topic=topics.deterioration, key=f"{tenant}:client-1", payload="{}")
    publisher = EventPublisher(namespace_m.stack.bootstrap)
    await publisher.start()
    try:
        for r in [records[0], records[0], records[1]]:
            await publisher.publish_raw(topics.deadletter, r.value, r.key)
        await publisher.publish_raw(topics.deadletter, delivery.model_dump_json().encode())
    finally:
        await publisher.stop()
    yield Letters(tenant, DeadLetter.model_validate_json(records[0].value),
                  DeadLetter.model_validate_json(records[1].value), delivery, value)


def listed_ids(result: Result) -> list[str]:
    return [line.split()[1] for line in result.stdout.splitlines()]


async def test_list_shows_each_dead_letter_once_and_never_its_payload(cli_env: Namespace, letters: Letters) -> None:
    result = await invoke(cli.app, "deadletters", "list")
    assert result.exit_code == 0, result.output
    assert sorted(listed_ids(result)) == sorted([letters.transfer.event_id, letters.oversized.event_id,
                                                 letters.delivery.event_id])
    assert "client-transfer" not in result.stdout and '{"session"' not in result.stdout


async def test_list_filters_by_reason_source_topic_tenant_service_and_time(cli_env: Namespace,
                                                                          letters: Letters) -> None:
    async def ids(*args: str) -> list[str]:
        result = await invoke(cli.app, "deadletters", "list", *args)
        assert result.exit_code == 0, result.output
        return listed_ids(result)

    assert await ids("--reason", "record_too_large") == [letters.oversized.event_id]
    assert await ids("--source-topic", "srs.submitted.v1") == [letters.transfer.event_id]
    assert sorted(await ids("--tenant", letters.tenant)) == sorted([letters.transfer.event_id,
                                                                     letters.delivery.event_id])
    assert await ids("--service", "alerts") == [letters.delivery.event_id]
    assert await ids("--since", "2100-01-01") == []


async def test_show_prints_the_whole_dead_letter_with_payload_key_and_headers(cli_env: Namespace,
                                                                             letters: Letters) -> None:
    result = await invoke(cli.app, "deadletters", "show", letters.transfer.event_id)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["payload"] == letters.transfer_value.decode() and shown["key"] == f"{letters.tenant}:client-1"
    assert shown["headers"] == {CORRELATION_HEADER: "corr-transfer", RECORD_TYPE_HEADER: CLIENT_TRANSFER}
    assert (shown["source_partition"], shown["source_offset"]) == (2, 40)


async def test_show_of_an_unknown_id_fails(cli_env: Namespace, letters: Letters) -> None:
    result = await invoke(cli.app, "deadletters", "show", "no-such-letter")
    assert result.exit_code == 1 and "no dead letter no-such-letter" in result.output


async def read_topic(stack: StackUnderTest, topic: str, seconds: float = 2.0) -> list[Record]:
    recorder = await TopicRecorder(stack.bootstrap, topic).start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await recorder.poll()
        return recorder.records
    finally:
        await recorder.stop()


async def test_replay_publishes_the_original_value_key_and_headers_to_the_source_topic_and_is_audited(
        cli_env: Namespace, letters: Letters, db: Any) -> None:
    result = await invoke(cli.app, "deadletters", "replay", "--id", letters.transfer.event_id)
    assert result.exit_code == 0, result.output
    assert "replayed 1 dead letters, 0 skipped" in result.stdout  # the redelivery's copy is published once

    topics = cli_env.kafka().topics()
    [replayed] = await read_topic(cli_env.stack, topics.submitted)
    assert (replayed.key, replayed.value) == (f"{letters.tenant}:client-1".encode(), letters.transfer_value)
    assert replayed.headers[CORRELATION_HEADER] == "corr-transfer"
    assert replayed.headers[RECORD_TYPE_HEADER] == CLIENT_TRANSFER
    entry = await db["audit"].find_one({"tenant_id": letters.tenant, "action": "deadletters.replay"})
    assert entry is not None and entry["target"] == letters.transfer.event_id


async def test_a_dry_run_says_what_would_be_replayed_and_publishes_nothing(cli_env: Namespace,
                                                                          letters: Letters) -> None:
    result = await invoke(cli.app, "deadletters", "replay", "--reason", "record_too_large", "--dry-run")
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert line.startswith(f"would replay {letters.oversized.event_id} (record_too_large) to "
                           f"{cli_env.kafka().topics().scored}")
    assert await read_topic(cli_env.stack, cli_env.kafka().topics().scored) == []


async def test_a_failed_delivery_is_skipped_naming_the_command_that_requeues_it(cli_env: Namespace,
                                                                               letters: Letters) -> None:
    result = await invoke(cli.app, "deadletters", "replay", "--service", "alerts", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"alliance alerts retry --tenant {letters.tenant}" in result.stderr and result.stdout == ""


async def test_a_replay_without_any_criterion_is_refused(cli_env: Namespace) -> None:
    result = await invoke(cli.app, "deadletters", "replay")
    assert result.exit_code == 2 and "--all" in flat(result.output)


# ---- an unanswering store or broker -----------------------------------------------------------------

STORE_COMMANDS = [
    ("keys", "create", "--tenant", "t", "--role", "admin"),
    ("keys", "list"),
    ("alerts", "deliveries", "--tenant", "t"),
    ("tenants", "show-rules", "--tenant", "t"),
    ("audit", "export"),
]
BROKER_COMMANDS = [
    ("topics", "create"),
    ("deadletters", "list"),
    ("deadletters", "replay", "--all"),
    ("clients", "transfer", "c1", "--tenant", "t", "--site", "s"),
]


@dataclass
class Run:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def closed() -> tuple[int, dict[str, Run]]:
    """Every command above run as `alliance` (tools/cli.py) with the store and broker on a closed port;
    the runs are concurrent, all at once, as each mostly waits for its timeout (how long: see the
    in-process test below, as start-up times vary too much on a shared machine). What is checked here
    is the message, so the store's timeout is 1 s rather than 5."""
    port = free_port()  # nothing listens there
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "ALLIANCE_MONGO_URL": f"mongodb://alliance:pw-s3cret@127.0.0.1:{port}/?directConnection=true",
           "ALLIANCE_MONGO_TIMEOUT_MS": "1000", "ALLIANCE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}

    def run(args: tuple[str, ...]) -> Run:
        done = subprocess.run([sys.executable, "-m", "tools.cli", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=180, check=False)
        return Run(done.returncode, done.stderr)

    commands = [*STORE_COMMANDS, *BROKER_COMMANDS]
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        runs = dict(zip((" ".join(c) for c in commands), pool.map(run, commands), strict=True))
    return port, runs


UNANSWERING = [(" ".join(c), "MongoDB", "ALLIANCE_MONGO_URL") for c in STORE_COMMANDS] + [
    (" ".join(c), "Kafka", "ALLIANCE_KAFKA_BOOTSTRAP") for c in BROKER_COMMANDS]


@pytest.mark.parametrize(("command", "named", "setting"), UNANSWERING)
def test_a_command_fails_in_one_line_naming_the_unanswering_store_or_broker_and_the_setting_to_check(
        closed: tuple[int, dict[str, Run]], command: str, named: str, setting: str) -> None:
    port, runs = closed
    run = runs[command]
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"error: {named} at 127.0.0.1:{port} did not answer") and "Hint:" in line
    assert setting in line and "pw-s3cret" not in line


# How long a command may take to report an unanswering store or broker, in-process (no start-up):
# the store's timeout and the broker wait are 5 s each; `topics create` used to try for 30 s.
REPORTED_WITHIN_SECONDS = 15.0


@pytest.mark.parametrize("command", [("keys", "list"), ("topics", "create"), ("deadletters", "list")])
async def test_an_unanswering_store_or_broker_is_reported_within_seconds(
        monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]) -> None:
    port = free_port()
    monkeypatch.setenv("ALLIANCE_MONGO_URL", f"mongodb://127.0.0.1:{port}/?directConnection=true")
    monkeypatch.setenv("ALLIANCE_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    start = time.monotonic()
    result = await invoke(cli.app, *command)
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert time.monotonic() - start < REPORTED_WITHIN_SECONDS
