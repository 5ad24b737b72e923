"""The operator CLI: every command an operator runs against a deployment.

Keys, tenants and their rules, topics, dead letters, imports, client transfers, rebuilds, the
audit trail and the secrets keyring. Service-specific commands live next to their service
(`services/<name>/cli.py`) and are mounted here, so this module only composes them.

The production image runs it as `python -m services.cli ...`. The `alliance` console script of
a development install is `tools/cli.py`: these commands plus the tools (run, bench, simulate,
docs, stack). This module never imports tools/ (tests/unit/test_architecture.py).

A broker or store that does not answer ends any command with one line naming it and what to
check, and exit status 2 (`OperatorGroup`), instead of a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import defaultdict
from datetime import UTC, datetime
from enum import StrEnum
from importlib import metadata
from typing import Annotated, Any, Literal, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer.core import TyperGroup

from shared import audit, auth, deadletters, topics
from shared.events import DeadLetterReason
from shared.kafka import Publisher, make_broker
from shared.mongo import database, make_client
from shared.settings import AuditSettings, KafkaSettings, MongoSettings
from shared.topic_admin import ensure_topics
from shared.topics import DEADLETTER
from shared.unreachable import EXIT_UNREACHABLE, BrokerUnreachable, describe

PACKAGE = "alliance-stream"
# How long a command waits for the broker before it reports it unreachable.
BROKER_WAIT_SECONDS = 5.0
# Records published per acknowledgement round of a replay.
REPLAY_CHUNK = 200
DATETIME_FORMATS = ["%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]


class OperatorGroup(TyperGroup):
    """The root command group: an unreachable broker or store is one line on stderr and exit 2."""

    def invoke(self, ctx: Any) -> Any:  # Typer's vendored click Context; typer exports no name for it
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # a command's own exit status and message (usage errors included)
        except Exception as exc:
            line = describe(exc)
            if line is None:
                raise
            typer.echo(line, err=True)
            raise typer.Exit(EXIT_UNREACHABLE) from None


app = typer.Typer(cls=OperatorGroup, help="Alliance Stream operator commands.", no_args_is_help=True,
                  add_completion=False)
keys_app = typer.Typer(help="API keys (stored hashed in MongoDB).", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their alliance rules.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
deadletters_app = typer.Typer(help=f"The dead-letter topic ({DEADLETTER}): inspect and replay its records.",
                              no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.add_typer(topics_app, name="topics")
app.add_typer(deadletters_app, name="deadletters")

Service = Literal["intake", "scoring", "alerts", "reporting"]
SERVICES: tuple[Service, ...] = get_args(Service)
# The services that consume, and so dead-letter.
Consumer = Literal["scoring", "alerts", "reporting"]


class SourceTopic(StrEnum):
    """Where a dead letter's record came from: every topic but the dead-letter one (names without
    the deployment's prefix)."""

    SUBMITTED = topics.SUBMITTED
    SCORED = topics.SCORED
    DETERIORATION = topics.DETERIORATION
    ALERT_STATUS = topics.ALERT_STATUS
    NOTIFY_RETRY = topics.NOTIFY_RETRY


def package_version() -> str:
    """The installed package's version (a source tree that was never installed has none)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{PACKAGE} {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    # Only the eager --version option lives here; the commands are the subcommands.
    del version
    # The Kafka client logs each failed connection attempt; an unreachable broker is reported in
    # one line by `OperatorGroup` instead.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").addFilter(_unclosed_after_failed_start)


def _unclosed_after_failed_start(record: logging.LogRecord) -> bool:
    # aiokafka does not close a producer or consumer whose start failed (the broker did not
    # answer), and complains when it is collected; the command has already said what happened.
    return not str(record.msg).startswith(("Unclosed AIOKafka",))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant id")],
    role: Annotated[auth.Role, typer.Option(help="what the key may do")],
    site: Annotated[str | None, typer.Option(help="bind the key to one site")] = None,
    label: Annotated[str, typer.Option(help="a note for operators")] = "",
) -> None:
    """Create an API key; the key itself is printed once, as the last line."""
    if problem := auth.tenant_id_problem(tenant):
        raise typer.BadParameter(problem, param_hint="--tenant")

    async def go() -> str:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            key, principal = await auth.create_key(database(client, settings), tenant, role, site, label)
            await audit.write_now(audit.audit_collection(client, settings, AuditSettings()), tenant_id=tenant,
                                  action="keys.create", target=principal.key_id)
        finally:
            await client.close()
        typer.echo(f"key id {principal.key_id} tenant={tenant} role={role} site={site or '*'}", err=True)
        return key

    typer.echo(asyncio.run(go()))


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at is not None else "-"


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys; default: every tenant")] = None,
) -> None:
    """List keys: id, tenant, role, site, created, revoked, label (never a key or its hash)."""

    async def go() -> list[auth.KeyInfo]:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            return await auth.list_keys(database(client, settings), tenant)
        finally:
            await client.close()

    rows = asyncio.run(go())
    typer.echo(f"{'key id':16}  {'tenant':20}  {'role':6}  {'site':12}  {'created':20}  {'revoked':20}  label")
    for k in rows:
        revoked = _when(k.revoked_at) if k.revoked_at else ("yes" if k.revoked else "-")
        typer.echo(f"{k.key_id:16}  {k.tenant_id:20}  {k.role:6}  {k.site_id or '*':12}  {_when(k.created_at):20}  "
                   f"{revoked:20}  {k.label}")
    typer.echo(f"{len(rows)} keys", err=True)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (effective within 30 s everywhere); `keys list` shows the ids."""

    async def go() -> bool:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            db = database(client, settings)
            doc = await db[auth.KEYS].find_one({"key_id": key_id}, {"tenant_id": 1})
            revoked = await auth.revoke_key(db, key_id)
            if doc is not None:
                await audit.write_now(audit.audit_collection(client, settings, AuditSettings()),
                                      tenant_id=doc["tenant_id"], action="keys.revoke", target=key_id,
                                      outcome="allowed" if revoked else "invalid")
            return revoked
        finally:
            await client.close()

    if not asyncio.run(go()):
        typer.echo("no such key (or already revoked)", err=True)
        raise typer.Exit(1)
    typer.echo("revoked")


@topics_app.command("create")
def topics_create(
    wait: Annotated[float, typer.Option(min=0.0, help="seconds to keep trying while the broker does not answer "
                                                      "(a deployment job may wait for a starting broker)")]
    = BROKER_WAIT_SECONDS,
) -> None:
    """Create every topic with the configured partitions, replication factor and retention."""
    created = asyncio.run(ensure_topics(KafkaSettings(), timeout=wait))
    typer.echo(f"created {len(created)} topics: {', '.join(created) or '-'}")


@app.command("serve")
def serve(service: Annotated[Service, typer.Argument(help="the service to run")]) -> None:
    """Run one service in the foreground."""
    os.execv(sys.executable, [sys.executable, "-m", f"services.{service}"])


# ---- dead letters ----------------------------------------------------------------------------------

ReasonOption = Annotated[DeadLetterReason | None, typer.Option(help="only this reason")]
SourceTopicOption = Annotated[SourceTopic | None, typer.Option(help="only records that came from this topic")]
TenantOption = Annotated[str | None, typer.Option(help="only this tenant's (the tenant the record names)")]
ServiceOption = Annotated[Consumer | None, typer.Option(help="only those this service dead-lettered")]
SinceOption = Annotated[datetime | None, typer.Option(formats=DATETIME_FORMATS,
                                                      help="only those dead-lettered at or after this time "
                                                           "(ISO 8601, UTC if no offset)")]


def _selection(kafka: KafkaSettings, reason: DeadLetterReason | None, source_topic: SourceTopic | None,
               tenant: str | None, service: Consumer | None, since: datetime | None,
               ids: list[str] | None = None) -> deadletters.Selection:
    start = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    return deadletters.Selection(
        reason=None if reason is None else reason.value,
        source_topic=None if source_topic is None else kafka.topics().prefix + source_topic.value,
        tenant=tenant, service=service, since=start, event_ids=frozenset(ids or ()))


def _read_dead_letters(kafka: KafkaSettings) -> list[deadletters.Stored]:
    stored, bad = asyncio.run(deadletters.read(kafka, timeout_seconds=BROKER_WAIT_SECONDS))
    if bad:
        typer.echo(f"{bad} records on {kafka.topics().deadletter} are not dead letters (skipped)", err=True)
    return stored


def _line(s: deadletters.Stored) -> str:
    dl = s.letter
    source = f"{dl.source_topic}/{dl.source_partition if dl.source_partition is not None else '-'}" \
             f"@{dl.source_offset if dl.source_offset is not None else '-'}"
    detail = " ".join(dl.detail.split())
    return (f"{_when(dl.occurred_at)}  {dl.event_id}  {dl.service:9}  {dl.reason:18}  "
            f"tenant={dl.tenant_id or '-'}  {source}  {detail[:100]}")


@deadletters_app.command("list")
def deadletters_list(
    reason: ReasonOption = None,
    source_topic: SourceTopicOption = None,
    tenant: TenantOption = None,
    service: ServiceOption = None,
    since: SinceOption = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many, the newest")] = 100,
) -> None:
    """List dead letters, oldest first: when, id, service, reason, tenant, source record, detail (never the payload)."""
    kafka = KafkaSettings()
    wanted = _selection(kafka, reason, source_topic, tenant, service, since)
    rows = [s for s in _read_dead_letters(kafka) if wanted.matches(s.letter)]
    for s in rows[-limit:]:
        typer.echo(_line(s))
    typer.echo(f"{len(rows)} dead letters" + (f", the newest {limit} shown" if len(rows) > limit else ""), err=True)


@deadletters_app.command("show")
def deadletters_show(event_id: Annotated[str, typer.Argument(help="the dead letter's event_id (from `list`)")]) -> None:
    """Print one dead letter whole, as JSON: the original record's payload, key and headers included."""
    kafka = KafkaSettings()
    found = [s for s in _read_dead_letters(kafka) if s.letter.event_id == event_id]
    if not found:
        typer.echo(f"no dead letter {event_id} on {kafka.topics().deadletter}", err=True)
        raise typer.Exit(1)
    s = found[0]
    doc = {"dead_letter_partition": s.partition, "dead_letter_offset": s.offset, **s.letter.model_dump(mode="json")}
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


async def _publish(kafka: KafkaSettings, chosen: list[deadletters.Stored], progress: Progress) -> None:
    broker = make_broker(kafka, "cli-replay")
    try:
        try:
            await asyncio.wait_for(broker.start(), BROKER_WAIT_SECONDS)
        except TimeoutError as exc:
            raise BrokerUnreachable(f"no answer within {BROKER_WAIT_SECONDS:g} s") from exc
        publisher = Publisher(broker, kafka.publish_timeout_seconds)
        task = progress.add_task("replaying", total=len(chosen))
        for start in range(0, len(chosen), REPLAY_CHUNK):
            chunk = chosen[start:start + REPLAY_CHUNK]
            try:
                await publisher.publish_all([deadletters.replay_record(s) for s in chunk])
            except TimeoutError as exc:
                raise BrokerUnreachable(f"not acknowledged within {kafka.publish_timeout_seconds:g} s; "
                                        f"{start} of {len(chosen)} replayed") from exc
            progress.advance(task, len(chunk))
    finally:
        await broker.stop()


@deadletters_app.command("replay")
def deadletters_replay(
    event_id: Annotated[list[str] | None, typer.Option("--id", help="this dead letter (repeatable)")] = None,
    reason: ReasonOption = None,
    source_topic: SourceTopicOption = None,
    tenant: TenantOption = None,
    service: ServiceOption = None,
    since: SinceOption = None,
    every: Annotated[bool, typer.Option("--all", help="replay every replayable dead letter (no other "
                                                       "criterion needed)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be replayed; publish nothing")] = False,
) -> None:
    """Publish the chosen dead letters' original records (value, key, headers) to their source topics again.

    Fix the cause first (a code fix deployed, the data corrected). Consumers are idempotent, so a
    record replayed twice, or partly applied before, is applied once; one that fails again is
    dead-lettered again. Failed deliveries (`delivery_failed`) are requeued with `alliance alerts retry`."""
    kafka = KafkaSettings()
    wanted = _selection(kafka, reason, source_topic, tenant, service, since, event_id)
    if not wanted.narrowed and not every:
        raise typer.BadParameter("choose what to replay (--id, --reason, --source-topic, --tenant, --service, "
                                 "--since) or pass --all", param_hint="--all")
    chosen: list[deadletters.Stored] = []
    skipped = 0
    matched: set[str] = set()
    for s in _read_dead_letters(kafka):
        if not wanted.matches(s.letter):
            continue
        matched.add(s.letter.event_id)
        if problem := deadletters.replay_problem(s.letter, kafka.topics()):
            typer.echo(f"skipped {s.letter.event_id} ({s.letter.reason}): {problem}", err=True)
            skipped += 1
        else:
            chosen.append(s)
    missing = wanted.event_ids - matched
    if dry_run:
        for s in chosen:
            r = deadletters.replay_record(s)
            typer.echo(f"would replay {s.letter.event_id} ({s.letter.reason}) to {r.topic} "
                       f"key={s.letter.key or '-'} {len(r.value)} bytes headers={','.join(sorted(r.headers)) or '-'}")
        typer.echo(f"dry run: {len(chosen)} would be replayed, {skipped} skipped", err=True)
        return
    if chosen:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
            asyncio.run(_publish(kafka, chosen, progress))
    # Said before the audit entries are written: if the store fails now, the replay has happened.
    typer.echo(f"replayed {len(chosen)} dead letters, {skipped} skipped")
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for s in chosen:
        by_tenant[s.letter.tenant_id or "*"].append(s.letter.event_id)
    for tenant_id, ids in by_tenant.items():
        asyncio.run(audit.record_cli(tenant_id=tenant_id, action="deadletters.replay", target=",".join(ids)))
    if missing:
        typer.echo(f"not found: {', '.join(sorted(missing))}", err=True)
        raise typer.Exit(1)


def mount_operator_commands() -> None:
    """Mount every service's commands on `app` (call once, before running it)."""
    from services.alerts import cli as alerts_cli
    from services.intake import cli as intake_cli
    from services.reporting import cli as reporting_cli
    from services.scoring import cli as scoring_cli

    app.add_typer(intake_cli.app, name="intake")
    app.add_typer(intake_cli.clients_app, name="clients")
    app.add_typer(scoring_cli.app, name="scoring")
    app.add_typer(alerts_cli.app, name="alerts")
    # `alliance secrets new-key | rotate | reseal`: the same commands as `alliance alerts secrets ...`.
    app.add_typer(alerts_cli.secrets_app, name="secrets")
    app.add_typer(reporting_cli.app, name="reporting")
    app.add_typer(reporting_cli.audit_app, name="audit")
    app.command("import")(intake_cli.import_csv)
    tenants_app.command("set-rules")(scoring_cli.set_rules)
    tenants_app.command("show-rules")(scoring_cli.show_rules)


def main() -> None:
    """Entry point of `python -m services.cli`."""
    mount_operator_commands()
    app()


if __name__ == "__main__":
    main()
