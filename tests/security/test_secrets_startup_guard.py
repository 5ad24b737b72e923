"""Alerts refuses to start outside a local run with a missing, short or placeholder secrets key
(issue 12, item 6: the refusal was opt-in, `ALLIANCE_ALERTS_PRODUCTION`, so a deployment that set
neither stored partners' signing secrets in plain text). Dev mode is what the local run command and
the test kit set; a real keyring starts without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import MongoClient

from services.alerts.secretbox import new_key, tenant_row
from services.alerts.settings import AlertsSettings, start_refusal
from services.alerts.store import TENANTS
from tests.support.services import Namespace, running
from tools.processes import ServiceProcess
from tools.stack import free_port

NOT_DEV = {"ALLIANCE_ALERTS_DEV_MODE": "false", "ALLIANCE_ALERTS_SECRETS_KEYS": "",
           "ALLIANCE_ALERTS_SECRETS_KEYS_FILE": "", "ALLIANCE_ALERTS_PRODUCTION": "false"}


def exit_of(ns: Namespace, log_dir: Path, env: dict[str, str]) -> tuple[int, str]:
    """Start the alerts process with `env` and wait for it to exit on its own; its code and output."""
    proc = ServiceProcess("alerts", free_port(), {**ns.env(), **env}, log_dir / "alerts.log")
    proc.start()
    assert proc.proc is not None
    try:
        code = proc.proc.wait(timeout=60)
    finally:
        proc.stop()
    return code, (log_dir / "alerts.log").read_text()


def test_alerts_refuses_to_start_without_a_keyring_outside_dev_mode(namespace: Namespace, log_dir: Path) -> None:
    code, output = exit_of(namespace, log_dir, NOT_DEV)
    assert code != 0
    assert "alerts: not starting: ALLIANCE_ALERTS_SECRETS_KEYS is empty" in output


@pytest.mark.parametrize("keys", ["change-me", "k1:c2hvcnQ="], ids=["placeholder", "short"])
def test_alerts_refuses_to_start_with_a_placeholder_or_short_key(namespace: Namespace, log_dir: Path,
                                                                 keys: str) -> None:
    code, output = exit_of(namespace, log_dir, {**NOT_DEV, "ALLIANCE_ALERTS_SECRETS_KEYS": keys})
    assert code != 0
    assert "ALLIANCE_ALERTS_SECRETS_KEYS" in output


def test_alerts_starts_without_a_keyring_in_dev_mode(namespace: Namespace, log_dir: Path) -> None:
    with running(["alerts"], namespace, log_dir, {**NOT_DEV, "ALLIANCE_ALERTS_DEV_MODE": "true"}) as procs:
        assert procs["alerts"].proc is not None and procs["alerts"].proc.poll() is None


def test_alerts_starts_outside_dev_mode_with_a_real_keyring(namespace: Namespace, log_dir: Path) -> None:
    with running(["alerts"], namespace, log_dir, {**NOT_DEV, "ALLIANCE_ALERTS_SECRETS_KEYS": new_key("k1")}) as procs:
        assert procs["alerts"].proc is not None and procs["alerts"].proc.poll() is None


def test_the_guard_is_the_default_and_dev_mode_lifts_it_for_a_missing_key_only() -> None:
    assert start_refusal(AlertsSettings(dev_mode=False)) is not None
    assert start_refusal(AlertsSettings(dev_mode=True)) is None
    assert start_refusal(AlertsSettings(secrets_keys=new_key("k1"))) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ALLIANCE_ALERTS_SECRETS_KEYS"):
        AlertsSettings(dev_mode=True, secrets_keys="change-me")  # type: ignore[arg-type]


def test_dev_mode_and_production_mode_together_are_refused() -> None:
    with pytest.raises(ValueError, match="choose one"):
        AlertsSettings(dev_mode=True, production=True)



def alliance(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `alliance` command line, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[2])


def test_alliance_secrets_rotate_reseals_stored_secrets_under_the_first_key(namespace: Namespace) -> None:
    old, new = new_key("old"), new_key("new")
    sealed_old = AlertsSettings(secrets_keys=old).secret_box().seal("whsec-1", tenant_row("acme"))  # type: ignore[arg-type]
    with MongoClient(namespace.stack.mongo_url) as mongo:
        tenants = mongo[namespace.database][TENANTS]
        tenants.insert_one({"_id": "acme", "webhook_secret": sealed_old})
        # step 3 of a rotation: the new key first, the old one still in the ring
        result = alliance("secrets", "rotate", env={
            "ALLIANCE_MONGO_URL": namespace.stack.mongo_url, "ALLIANCE_MONGO_DATABASE": namespace.database,
            "ALLIANCE_ALERTS_SECRETS_KEYS": f"{new},{old}"})
        stored = tenants.find_one({"_id": "acme"})
    assert result.returncode == 0, result.stderr
    assert "resealed 1 secrets under key 'new'" in result.stdout
    assert stored is not None and stored["webhook_secret"] != sealed_old
    box = AlertsSettings(secrets_keys=new).secret_box()  # type: ignore[arg-type]
    assert box.open(stored["webhook_secret"], tenant_row("acme")) == "whsec-1"


def test_the_old_secrets_command_names_keep_working() -> None:
    for command in (["alerts", "secrets", "new-key", "--id", "k2"], ["secrets", "new-key", "--id", "k2"]):
        result = alliance(*command)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("k2:")
    for group in (["alerts", "secrets"], ["secrets"]):
        listed = alliance(*group, "--help").stdout
        assert all(name in listed for name in ("new-key", "reseal", "rotate"))
