"""The operator CLI: every command an operator runs against a deployment.

Keys, tenants and their rules, topics, imports, client transfers, rebuilds, the audit trail and
the secrets keyring. Service-specific commands live next to their service
(`services/<name>/cli.py`) and are mounted here, so this module only composes them.

The production image runs it as `python -m services.cli ...`. The `alliance` console script of
a development install is `tools/cli.py`: these commands plus the tools (run, bench, simulate,
docs, stack). This module never imports tools/ (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated

import typer

from shared import audit, auth
from shared.mongo import database, make_client
from shared.settings import AuditSettings, KafkaSettings, MongoSettings
from shared.topic_admin import ensure_topics

app = typer.Typer(help="Alliance Stream operator commands.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="API keys (stored hashed in MongoDB).", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their alliance rules.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.add_typer(topics_app, name="topics")

SERVICES = ("intake", "scoring", "alerts", "reporting")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant id")],
    role: Annotated[str, typer.Option(help="submit | read | admin")],
    site: Annotated[str | None, typer.Option(help="bind the key to one site")] = None,
    label: Annotated[str, typer.Option(help="a note for operators")] = "",
) -> None:
    """Create an API key; the key itself is printed once, as the last line."""
    if role not in auth.ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(auth.ROLES)}", param_hint="--role")
    if problem := auth.tenant_id_problem(tenant):
        raise typer.BadParameter(problem, param_hint="--tenant")

    async def go() -> str:
        settings = MongoSettings()
        client = make_client(settings)
        try:
            key, principal = await auth.create_key(database(client, settings), tenant, role, site, label)
            await audit.write_now(audit.audit_collection(client, settings, AuditSettings()), tenant_id=tenant,
                                  action="keys.create", target=principal.key_id)
        finally:
            await client.close()
        typer.echo(f"key id {principal.key_id} tenant={tenant} role={role} site={site or '*'}", err=True)
        return key

    typer.echo(asyncio.run(go()))


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (effective within 30 s everywhere)."""

    async def go() -> bool:
        settings = MongoSettings()
        client = make_client(settings)
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
        typer.echo("no such key", err=True)
        raise typer.Exit(1)
    typer.echo("revoked")


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic with the configured partitions, replication factor and retention."""
    created = asyncio.run(ensure_topics(KafkaSettings()))
    typer.echo(f"created {len(created)} topics: {', '.join(created) or '-'}")


@app.command("serve")
def serve(service: Annotated[str, typer.Argument(help=" | ".join(SERVICES))]) -> None:
    """Run one service in the foreground."""
    if service not in SERVICES:
        raise typer.BadParameter(f"one of {', '.join(SERVICES)}")
    os.execv(sys.executable, [sys.executable, "-m", f"services.{service}"])


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
