"""Webhook signing secrets at rest (issue 12, finding 6: a passphrase became one unsalted SHA-256
for a hand-written HMAC keystream, the k8s placeholder `change-me` was accepted, compose stored
secrets in plain text, rows could be swapped, no rotation).

AES-GCM (`cryptography`) under a keyring of base64 32-byte keys with ids
(`ALLIANCE_ALERTS_SECRETS_KEYS`), the row's identity (tenant, subscription) as associated data;
placeholders, passphrases and short keys refused; rotation by putting a new key first and
`alliance alerts secrets reseal`. That alerts refuses to start without a usable key outside a local
run: test_secrets_startup_guard.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from pymongo import AsyncMongoClient
from typer.testing import CliRunner

from services.alerts import cli
from services.alerts.app import AlertsConfig, create_app
from services.alerts.secretbox import (
    KeyringError,
    SecretBox,
    new_key,
    open_legacy,
    parse_keyring,
    subscription_row,
    tenant_row,
)
from services.alerts.senders import SigningSecrets
from services.alerts.settings import AlertsSettings, SmtpSettings
from shared.mongo import Document
from tests.support.apps import new_key as new_api_key
from tests.support.apps import serving
from tests.support.services import Namespace

K1, K2 = new_key("k1"), new_key("k2")
ROW = subscription_row("acme", "sub-1")


def box(setting: str) -> SecretBox:
    return SecretBox.from_setting(setting)


def test_aes_gcm_round_trip_hides_the_secret_and_names_the_sealing_key() -> None:
    b = box(K1)
    sealed = b.seal("whsec_abc", ROW)
    assert sealed.startswith("v2:k1:") and "whsec_abc" not in sealed
    assert b.open(sealed, ROW) == "whsec_abc"
    assert b.seal("whsec_abc", ROW) != sealed  # fresh nonce


def test_a_value_moved_to_another_row_does_not_open() -> None:
    b = box(K1)
    sealed = b.seal("whsec_abc", subscription_row("acme", "sub-1"))
    for other in (subscription_row("acme", "sub-2"), subscription_row("globex", "sub-1"), tenant_row("acme")):
        with pytest.raises(ValueError, match="another row"):
            b.open(sealed, other)
    # The row is encoded unambiguously: no split of the same characters names the same row.
    with pytest.raises(ValueError):
        b.open(b.seal("s", subscription_row("t", "x:c1")), subscription_row("t:x", "c1"))


def test_a_tampered_value_does_not_open() -> None:
    b = box(K1)
    sealed = b.seal("whsec_abc", ROW)
    raw = bytearray(base64.b64decode(sealed.split(":", 2)[2]))
    raw[15] ^= 1
    with pytest.raises(ValueError, match="does not verify"):
        b.open("v2:k1:" + base64.b64encode(bytes(raw)).decode(), ROW)


def test_rotation_the_first_key_seals_and_every_key_opens() -> None:
    old = box(K1).seal("whsec_abc", ROW)
    rotated = box(f"{K2},{K1}")
    assert rotated.open(old, ROW) == "whsec_abc"
    assert rotated.seal("whsec_abc", ROW).startswith("v2:k2:")
    assert rotated.current(old) is False and rotated.current(rotated.seal("x", ROW)) is True
    with pytest.raises(ValueError, match="'k1', which is not in ALLIANCE_ALERTS_SECRETS_KEYS"):
        box(K2).open(old, ROW)


@pytest.mark.parametrize("setting", ["change-me", "k1:change-me", "k1", ":abc", "k1:" + "A" * 43 + "=",
                                     f"{K1},{K1}"])
def test_placeholders_passphrases_and_duplicates_are_refused(setting: str) -> None:
    with pytest.raises(KeyringError, match="ALLIANCE_ALERTS_SECRETS_KEYS"):
        parse_keyring(setting)


def test_a_generated_key_is_32_random_bytes_and_accepted() -> None:
    [(key_id, key)] = parse_keyring(new_key("2026-11"))
    assert key_id == "2026-11" and len(key) == 32


def test_without_a_keyring_values_are_plain_and_open_once_a_keyring_is_set() -> None:
    sealed = SecretBox().seal("whsec_abc", ROW)
    assert sealed == "plain:whsec_abc"
    assert box(K1).open(sealed, ROW) == "whsec_abc"


def test_values_of_the_retired_box_are_refused_on_read_naming_the_migration() -> None:
    legacy = _legacy_seal("whsec_abc", "change-me")
    with pytest.raises(ValueError, match="alliance alerts secrets reseal --legacy-key"):
        box(K1).open(legacy, ROW)
    assert open_legacy(legacy, "change-me") == "whsec_abc"
    with pytest.raises(ValueError, match="wrong --legacy-key"):
        open_legacy(legacy, "another")


def _legacy_seal(plain: str, key: str) -> str:
    """What the retired `sb1` box stored (passphrase -> SHA-256, HMAC keystream, HMAC tag)."""
    master = hashlib.sha256(key.encode()).digest()
    enc = hmac.new(master, b"alliance-secretbox-enc", hashlib.sha256).digest()
    mac = hmac.new(master, b"alliance-secretbox-mac", hashlib.sha256).digest()
    nonce, data = secrets.token_bytes(16), plain.encode()
    stream = hmac.new(enc, nonce + (0).to_bytes(8, "big"), hashlib.sha256).digest()
    ct = bytes(a ^ b for a, b in zip(data, stream, strict=False))
    tag = hmac.new(mac, b"sb1" + nonce + ct, hashlib.sha256).digest()
    return "sb1:" + base64.b64encode(nonce + ct + tag).decode()


# ---- the keyring setting -------------------------------------------------------------------------

GOOD_KEYRING = "k1:" + base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize("placeholder", ["change-me", "k1:change-me", "k1:" + base64.b64encode(b"short").decode(),
                                         "k1:" + base64.b64encode(bytes(32)).decode()])
def test_a_placeholder_short_or_non_random_key_is_refused_naming_the_setting(placeholder: str) -> None:
    with pytest.raises(ValidationError, match="ALLIANCE_ALERTS_SECRETS_KEYS"):
        AlertsSettings(secrets_keys=placeholder)


def test_production_mode_refuses_to_start_without_a_keyring() -> None:
    with pytest.raises(ValidationError, match="ALLIANCE_ALERTS_SECRETS_KEYS is empty"):
        AlertsSettings(production=True)
    assert AlertsSettings(production=True, secrets_keys=GOOD_KEYRING).secret_box().encrypting


def test_outside_production_no_keyring_means_plain_storage() -> None:
    assert AlertsSettings().secret_box().encrypting is False


def test_the_retired_single_key_setting_is_refused_with_the_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLIANCE_ALERTS_SECRETS_KEY", "change-me")
    with pytest.raises(ValidationError, match=r"ALLIANCE_ALERTS_SECRETS_KEY is no longer read.*reseal"):
        AlertsSettings()


def test_the_keyring_can_come_from_a_file_that_the_cli_writes_once(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    assert CliRunner().invoke(cli.app, ["secrets", "new-key", "--id", "c1", "--file", str(path)]).exit_code == 0
    first = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert CliRunner().invoke(cli.app, ["secrets", "new-key", "--id", "c2", "--file", str(path)]).exit_code == 0
    assert path.read_text() == first  # an existing keyring is never replaced
    box = AlertsSettings(production=True, secrets_keys_file=str(path)).secret_box()
    assert box.sealing_key_id == "c1"
    with pytest.raises(ValidationError, match="SECRETS_KEYS_FILE"):
        AlertsSettings(secrets_keys_file=str(tmp_path / "missing"))


def test_the_cli_prints_a_usable_new_key() -> None:
    result = CliRunner().invoke(cli.app, ["secrets", "new-key", "--id", "2026-11"])
    assert result.exit_code == 0 and SecretBox.from_setting(result.output.strip()).sealing_key_id == "2026-11"


# ---- through the alerts API and the real store -----------------------------------------------------

@dataclass
class Alerts:
    app: FastAPI
    http: httpx.AsyncClient
    db: Any
    ns: Namespace


@dataclass
class Tenant:
    id: str
    admin: dict[str, str]
    secret: str


@pytest.fixture(scope="module")
async def alerts(namespace_m: Namespace) -> AsyncIterator[Alerts]:
    """One alerts instance sealing with K1 that also opens K2 (step 1 of a rotation)."""
    settings = AlertsSettings(allow_private_targets=True, secrets_keys=f"{K1},{K2}")
    app = create_app(AlertsConfig(kafka=namespace_m.kafka(), mongo=namespace_m.mongo(), smtp=SmtpSettings(host=""),
                                  alerts=settings))
    mongo: AsyncMongoClient[Document] = AsyncMongoClient(namespace_m.stack.mongo_url, tz_aware=True)
    try:
        async with serving(app) as http:
            yield Alerts(app, http, mongo[namespace_m.database], namespace_m)
    finally:
        await mongo.close()


async def new_tenant(alerts: Alerts, name: str) -> Tenant:
    """A tenant whose clinician-webhook signing secret was set through the API."""
    tenant = f"{name}-{uuid.uuid4().hex[:8]}"
    admin = {"Authorization": f"Bearer {await new_api_key(alerts.ns, 'admin', tenant)}"}
    r = await alerts.http.post("/v1/webhook-secret", headers=admin)
    assert r.status_code == 201, r.text
    return Tenant(tenant, admin, r.json()["secret"])


def signing_secrets(alerts: Alerts, keyring: str = f"{K1},{K2}") -> SigningSecrets:
    """What the delivery worker signs with, reading the real store (no cache)."""
    return SigningSecrets(alerts.app.state.alerts.store, SecretBox.from_setting(keyring), 0)


async def test_a_stored_secret_is_sealed_with_aes_gcm_under_the_first_key_and_opens_for_its_row(
        alerts: Alerts) -> None:
    a = await new_tenant(alerts, "sealed")
    stored = (await alerts.db["alert_tenants"].find_one({"_id": a.id}))["webhook_secret"]
    assert stored.startswith("v2:k1:") and a.secret not in stored
    assert await signing_secrets(alerts).for_delivery({"tenant_id": a.id}) == [a.secret]


async def test_a_sealed_secret_copied_onto_another_tenants_row_does_not_open(alerts: Alerts) -> None:
    a, b = await new_tenant(alerts, "swap-a"), await new_tenant(alerts, "swap-b")
    tenants = alerts.db["alert_tenants"]
    a_sealed = (await tenants.find_one({"_id": a.id}))["webhook_secret"]
    b_sealed = (await tenants.find_one({"_id": b.id}))["webhook_secret"]
    await tenants.update_one({"_id": a.id}, {"$set": {"webhook_secret": b_sealed}})
    try:
        with pytest.raises(ValueError, match="another row"):
            await signing_secrets(alerts).for_delivery({"tenant_id": a.id})
    finally:  # the module's store is shared: a rotation test reseals every row
        await tenants.update_one({"_id": a.id}, {"$set": {"webhook_secret": a_sealed}})


async def test_rotation_reseal_puts_every_secret_under_the_new_first_key(
        alerts: Alerts, monkeypatch: pytest.MonkeyPatch) -> None:
    t = await new_tenant(alerts, "rotate")
    r = await alerts.http.post("/v1/subscriptions", json={"url": "http://127.0.0.1:9/p", "events": ["srs.scored.v1"]},
                               headers=t.admin)
    assert r.status_code == 201, r.text
    sub = r.json()
    monkeypatch.setenv("ALLIANCE_MONGO_URL", alerts.ns.stack.mongo_url)
    monkeypatch.setenv("ALLIANCE_MONGO_DATABASE", alerts.ns.database)
    monkeypatch.setenv("ALLIANCE_ALERTS_SECRETS_KEYS", f"{K2},{K1}")
    result = await asyncio.to_thread(CliRunner().invoke, cli.app, ["secrets", "reseal"])
    assert result.exit_code == 0 and "under key 'k2'" in result.output, result.output

    stored = await alerts.db["subscriptions"].find_one({"_id": sub["id"]})
    assert stored["secret"].startswith("v2:k2:")
    assert (await alerts.db["alert_tenants"].find_one({"_id": t.id}))["webhook_secret"].startswith("v2:k2:")
    only_new = signing_secrets(alerts, K2)
    assert await only_new.for_delivery({"tenant_id": t.id}) == [t.secret]
    assert await only_new.for_delivery({"tenant_id": t.id, "subscription_id": sub["id"]}) == [sub["secret"]]
