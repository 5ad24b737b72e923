"""Alerts refuses to start outside a local run with a missing, short or placeholder secrets key
(issue 12, item 6: the refusal was opt-in, `ALLIANCE_ALERTS_PRODUCTION`, so a deployment that set
neither stored partners' signing secrets in plain text). Dev mode is what the local run command and
the test kit set; a real keyring starts without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.alerts.secretbox import new_key
from services.alerts.settings import AlertsSettings, start_refusal
from services.processes import ServiceProcess
from shared.stack import free_port
from tests.support.services import Namespace, running

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
