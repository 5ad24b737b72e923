"""Encryption at rest of webhook signing secrets: AES-GCM under a keyring, bound to the row."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import pytest

from services.alerts.secretbox import (
    KeyringError,
    SecretBox,
    new_key,
    open_legacy,
    parse_keyring,
    subscription_row,
    tenant_row,
)

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
