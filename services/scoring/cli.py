"""Operator commands of the scoring service.

`set_rules` / `show_rules` are mounted as `alliance tenants set-rules` / `show-rules` (and are
also `alliance scoring set-rules` / `show-rules`). They read MongoDB settings from the
environment (`ALLIANCE_MONGO_URL`, `ALLIANCE_MONGO_DATABASE`). A change reaches running scoring
processes within their rules cache time (ALLIANCE_SCORING_RULES_CACHE_SECONDS, 5 s by default).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Annotated

import typer

from services.scoring.rules import (
    FLAG_NAMES,
    OPERATORS,
    SCORED_OUTCOME,
    InstrumentOverride,
    Operator,
    OutcomeRules,
    TenantRules,
)
from services.scoring.store import RulesStore, SubmissionIndex
from shared import audit
from shared.events import SCORED_INSTRUMENTS, Instrument, OutcomeInstrument
from shared.mongo import database, make_client
from shared.settings import AuditSettings, MongoSettings

app = typer.Typer(help="scoring service commands.", no_args_is_help=True)


def change_outcome_rules(current: TenantRules, instrument: str | None = None, reset: bool = False,
                         **changes: float | int | None) -> TenantRules:
    """The rules after an operator's change to the outcome rules of `instrument` (ORS or CORS;
    None: both); `reset` puts them back to the defaults first. `changes` name `OutcomeRules`
    settings (the rules' own fields, so no second list of them to keep in step); None leaves a
    setting as it is. Raises ValueError. Pure."""
    given = {setting: value for setting, value in changes.items() if value is not None}
    if instrument is not None and instrument not in SCORED_OUTCOME:
        raise ValueError(f"{instrument} has no outcome rules: one of {', '.join(SCORED_OUTCOME)}")
    outcome = dict(current.outcome)
    for name in [instrument] if instrument is not None else SCORED_OUTCOME:
        base = OutcomeRules() if reset else outcome.get(name, OutcomeRules())
        outcome[name] = replace(base, **given)  # type: ignore[arg-type]
    return replace(current, outcome=outcome)


def change_rules(
    current: TenantRules,
    *,
    cutoff: float | None = None,
    operator: str | None = None,
    drop: float | None = None,
    instrument: str | None = None,
    critical_drop: float | None = None,
    item_threshold: float | None = None,
    triggers: list[str] | None = None,
    session_gap: int | None = None,
    max_episode_sessions: int | None = None,
    max_client_submissions: int | None = None,
    reset: bool = False,
) -> TenantRules:
    """The rules after an operator's change; raises ValueError for an invalid one. Pure."""
    if operator is not None and operator not in OPERATORS:
        raise ValueError(f"operator must be one of {', '.join(OPERATORS)}")
    op: Operator | None = "<" if operator == "<" else "<=" if operator == "<=" else None
    if instrument is not None:
        tenant_wide = (critical_drop, item_threshold, triggers, session_gap, max_episode_sessions,
                       max_client_submissions)
        if any(x is not None for x in tenant_wide):
            raise ValueError("--critical-drop, --item-threshold, --triggers, --session-gap, --max-episode-sessions "
                             "and --max-client-submissions apply to all instruments; leave out --instrument")
        instruments = dict(current.instruments)
        if reset:
            instruments.pop(instrument, None)
        else:
            have = instruments.get(instrument, InstrumentOverride())
            instruments[instrument] = InstrumentOverride(
                cutoff=have.cutoff if cutoff is None else cutoff,
                operator=have.operator if op is None else op,
                drop=have.drop if drop is None else drop,
            )
        return replace(current, instruments=instruments)
    base = TenantRules(instruments=current.instruments) if reset else current
    return replace(
        base,
        cutoff=base.cutoff if cutoff is None else cutoff,
        operator=base.operator if op is None else op,
        drop=base.drop if drop is None else drop,
        critical_drop=base.critical_drop if critical_drop is None else critical_drop,
        item_threshold=base.item_threshold if item_threshold is None else item_threshold,
        triggers=base.triggers if triggers is None else frozenset(triggers),
        session_gap=base.session_gap if session_gap is None else session_gap,
        max_episode_sessions=base.max_episode_sessions if max_episode_sessions is None else max_episode_sessions,
        max_client_submissions=(base.max_client_submissions if max_client_submissions is None
                                else max_client_submissions),
    )


def _run_store_op(op: str, tenant: str, new: TenantRules | None = None) -> TenantRules | None:
    async def go() -> TenantRules | None:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            store = RulesStore(database(client, settings), ttl_seconds=0)
            if op == "put" and new is not None:
                await store.put(tenant, new)
                await audit.write_now(audit.audit_collection(client, settings, AuditSettings()), tenant_id=tenant,
                                      action="tenant_rules.set")
                return new
            return await store.stored(tenant)
        finally:
            await client.close()

    return asyncio.run(go())


def _echo(tenant: str, rules: TenantRules, source: str) -> None:
    typer.echo(json.dumps({"tenant": tenant, "source": source, "rules": rules.to_doc()}, indent=2))


def set_rules(
    tenant: Annotated[str, typer.Option(help="tenant id")],
    cutoff: Annotated[float | None, typer.Option(help="clinical cutoff for the total (default 36.0)")] = None,
    operator: Annotated[Operator | None, typer.Option(help="how a total is below cutoff (default '<')")] = None,
    drop: Annotated[float | None, typer.Option(help="a fall of this much from the previous session alerts "
                                                     "(default 1.0)")] = None,
    instrument: Annotated[Instrument | None, typer.Option(help="set --cutoff/--operator/--drop for this instrument "
                                                                "only (YCSRS is never scored)")] = None,
    critical_drop: Annotated[float | None, typer.Option(help="a fall of this much makes an alert critical "
                                                             "(default 3.0)")] = None,
    item_threshold: Annotated[float | None, typer.Option(help="an item under this is flagged (default 9.0)")] = None,
    triggers: Annotated[str | None, typer.Option(help="comma-separated flags that raise alerts (default "
                                                      "below_cutoff,drop_from_previous,low_not_improving)")] = None,
    session_gap: Annotated[int | None, typer.Option(help="a session number more than this above the highest of "
                                                         "its episode is refused as a typo (default 20)")] = None,
    max_episode_sessions: Annotated[int | None, typer.Option(help="a new session beyond this many in one episode "
                                                                  "is refused as series_full (default 500)")] = None,
    max_client_submissions: Annotated[int | None, typer.Option(help="a new submission once a client holds this "
                                                                    "many is refused as series_full "
                                                                    "(default 5000)")] = None,
    outcome_instrument: Annotated[OutcomeInstrument | None, typer.Option(
        help="set the outcome options below (or with --reset: put them back) for this outcome instrument only "
             "(default: ORS and CORS; YCORS is never scored)")] = None,
    adult_cutoff: Annotated[float | None, typer.Option(help="ORS clinical cutoff, adults (default 25.0)")] = None,
    adolescent_cutoff: Annotated[float | None, typer.Option(help="ORS clinical cutoff, ages 13-17 "
                                                                 "(default 28.0)")] = None,
    child_cutoff: Annotated[float | None, typer.Option(help="CORS clinical cutoff (default 32.0)")] = None,
    reliable_change: Annotated[float | None, typer.Option(help="reliable change index from intake "
                                                               "(default 5.0)")] = None,
    not_on_track_warning_session: Annotated[int | None, typer.Option(
        help="no reliable improvement at this session number or later alerts: warning (default 3)")] = None,
    not_on_track_critical_session: Annotated[int | None, typer.Option(
        help="... and from this session number on: critical (default 6)")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="back to the defaults (with --instrument: drop that "
                                                        "instrument's override; with --outcome-instrument: "
                                                        "that instrument's outcome rules)")] = False,
) -> None:
    """Set a tenant's alliance and outcome rules; only the options given change. Prints the
    resulting rules."""
    outcome_changes: dict[str, float | int | None] = dict(
        adult_cutoff=adult_cutoff, adolescent_cutoff=adolescent_cutoff, child_cutoff=child_cutoff,
        reliable_change=reliable_change, not_on_track_warning_session=not_on_track_warning_session,
        not_on_track_critical_session=not_on_track_critical_session)
    outcome_given = outcome_instrument is not None or any(v is not None for v in outcome_changes.values())
    if outcome_instrument is not None and outcome_instrument.value not in SCORED_OUTCOME:
        raise typer.BadParameter(f"{outcome_instrument.value} is stored but never scored: it has no rules",
                                 param_hint="--outcome-instrument")
    if instrument is not None and instrument not in SCORED_INSTRUMENTS:
        raise typer.BadParameter(f"{instrument.value} is stored but never scored: it has no rules",
                                 param_hint="--instrument")
    current = _run_store_op("get", tenant) or TenantRules()
    wanted = None if triggers is None else [t.strip() for t in triggers.split(",") if t.strip()]
    if wanted is not None and (unknown := set(wanted) - set(FLAG_NAMES)):
        raise typer.BadParameter(f"unknown trigger(s) {', '.join(sorted(unknown))}; choose from "
                                 f"{', '.join(FLAG_NAMES)}", param_hint="--triggers")
    try:
        new = change_rules(current, cutoff=cutoff, operator=operator, drop=drop,
                           instrument=None if instrument is None else instrument.value,
                           critical_drop=critical_drop, item_threshold=item_threshold, triggers=wanted,
                           session_gap=session_gap, max_episode_sessions=max_episode_sessions,
                           max_client_submissions=max_client_submissions,
                           reset=reset and outcome_instrument is None)
        if outcome_given:
            new = change_outcome_rules(new, None if outcome_instrument is None else outcome_instrument.value,
                                       reset, **outcome_changes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _run_store_op("put", tenant, new)
    _echo(tenant, new, "stored")


def show_rules(tenant: Annotated[str, typer.Option(help="tenant id")]) -> None:
    """Print a tenant's alliance rules (the defaults when it has set none)."""
    stored = _run_store_op("get", tenant)
    _echo(tenant, stored or TenantRules(), "stored" if stored else "defaults")


def index_submissions() -> None:
    """Register the submissions of every stored client record in the tenant-wide index of
    submission ids (docs/clinical-records.md: run once after upgrading to the scoring that keeps
    it, so that a move of a submission scored before is seen). Idempotent."""
    async def go() -> int:
        settings = MongoSettings()
        client = make_client(settings, admin=True)
        try:
            return await SubmissionIndex(database(client, settings)).register_stored(database(client, settings))
        finally:
            await client.close()

    typer.echo(json.dumps({"registered": asyncio.run(go())}))


app.command("set-rules")(set_rules)
app.command("index-submissions")(index_submissions)
app.command("show-rules")(show_rules)
