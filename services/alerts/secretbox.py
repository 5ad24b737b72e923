"""Encryption at rest of the webhook signing secrets: AES-256-GCM from `cryptography`, a keyring.

The secrets must be stored in a form we can read back (we sign with them), so hashing is not an
option. Each value is sealed with AES-GCM (random 96-bit nonce) under the *first* key of the
keyring `ALLIANCE_ALERTS_SECRETS_KEYS` (`id:base64key,id:base64key,...`, each key exactly 32
random bytes); every key of the ring opens. That is rotation without downtime: add the new key
second (every replica can open with it), move it first (new values are sealed with it), run
`alliance alerts secrets reseal`, then drop the old key.

The row a value belongs to (tenant + subscription id, or tenant for the clinician-webhook
secret) is the associated data, so a sealed value copied or swapped into another row does not
open: a database writer cannot make tenant A's deliveries sign with tenant B's secret.

Stored forms:
- `v2:<key id>:<base64(nonce || ciphertext+tag)>`: sealed by this box.
- `plain:<secret>`: written when no keyring is configured (local runs, tests; production mode
  refuses to start without one). Still opened after a keyring is set, and re-sealed by `reseal`.
- `sb1:...`: sealed by the previous hand-written HMAC box. Refused on read with a message
  naming the migration (`alliance alerts secrets reseal --legacy-key OLD`), which is the only
  place the old construction survives (`open_legacy`), so the old key is needed once, not kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEYS_SETTING = "ALLIANCE_ALERTS_SECRETS_KEYS"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_NONCE = 12
# A value that passes the length check but is obviously not random (all zeros, "aaaa...",
# a repeated word) is as good as no key.
_MIN_DISTINCT_BYTES = 12

Row = tuple[str, ...]


def subscription_row(tenant_id: str, subscription_id: str) -> Row:
    """The identity a partner subscription's secret is bound to."""
    return ("subscription", tenant_id, subscription_id)


def tenant_row(tenant_id: str) -> Row:
    """The identity a tenant's clinician-webhook secrets (current and previous) are bound to."""
    return ("tenant-webhook", tenant_id)


class KeyringError(ValueError):
    """The keyring setting is malformed, too weak or a placeholder; the message names the setting."""


def new_key(key_id: str) -> str:
    """A fresh keyring entry `id:base64key` (32 random bytes)."""
    if not _KEY_ID.fullmatch(key_id):
        raise KeyringError("a key id is 1-32 of [A-Za-z0-9_-]")
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


def parse_keyring(text: str) -> list[tuple[str, bytes]]:
    """`id:base64key,...` as (id, 32-byte key) pairs, first = sealing key; [] for an empty setting.

    Anything that is not exactly that (a passphrase, `change-me`, a short or low-entropy key, a
    duplicate id) is refused rather than stretched into a key, because a guessable key protects
    nothing and a silently "working" weak setting is how placeholders reach production.
    """
    ring: list[tuple[str, bytes]] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key_id, sep, b64 = entry.partition(":")
        if not sep or not _KEY_ID.fullmatch(key_id):
            raise KeyringError(f"{KEYS_SETTING}: each entry is `id:base64key` with an id of 1-32 of "
                               f"[A-Za-z0-9_-] (generate one with `alliance alerts secrets new-key`)")
        try:
            raw = base64.b64decode(b64.strip(), altchars=b"-_" if ("-" in b64 or "_" in b64) else None,
                                   validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32 or len(set(raw)) < _MIN_DISTINCT_BYTES:
            raise KeyringError(f"{KEYS_SETTING}: key {key_id!r} is not the base64 of 32 random bytes "
                               f"(placeholders and passphrases are refused; `alliance alerts secrets new-key`)")
        if any(key_id == k for k, _ in ring):
            raise KeyringError(f"{KEYS_SETTING}: key id {key_id!r} appears twice")
        ring.append((key_id, raw))
    return ring


def _aad(row: Row) -> bytes:
    # JSON array: no separator inside an id can make two different rows encode the same bytes.
    return json.dumps(["alliance-secret-v2", *row]).encode()


class SecretBox:
    """Seals and opens short secrets bound to their row, under a keyring (or none: plain storage)."""

    def __init__(self, keyring: list[tuple[str, bytes]] | None = None) -> None:
        self._ring = list(keyring or [])
        self._aeads = {key_id: AESGCM(key) for key_id, key in self._ring}

    @classmethod
    def from_setting(cls, text: str) -> SecretBox:
        return cls(parse_keyring(text))

    @property
    def encrypting(self) -> bool:
        return bool(self._ring)

    @property
    def sealing_key_id(self) -> str | None:
        return self._ring[0][0] if self._ring else None

    def seal(self, plain: str, row: Row) -> str:
        """The stored form of `plain` in `row`."""
        if not self._ring:
            return "plain:" + plain
        key_id = self._ring[0][0]
        nonce = secrets.token_bytes(_NONCE)
        ct = self._aeads[key_id].encrypt(nonce, plain.encode(), _aad(row))
        return f"v2:{key_id}:{base64.b64encode(nonce + ct).decode()}"

    def open(self, sealed: str, row: Row) -> str:
        """The secret inside `sealed`; ValueError if it was tampered with, belongs to another row,
        or its key is not in the ring."""
        if sealed.startswith("plain:"):
            return sealed[len("plain:"):]
        if sealed.startswith("sb1:"):
            raise ValueError("this secret was sealed by the pre-AES-GCM secret box (sb1); migrate it with "
                             "`alliance alerts secrets reseal --legacy-key <old ALLIANCE_ALERTS_SECRETS_KEY>`")
        version, _, rest = sealed.partition(":")
        key_id, _, b64 = rest.partition(":")
        if version != "v2" or not b64:
            raise ValueError("unknown sealed-secret format")
        aead = self._aeads.get(key_id)
        if aead is None:
            raise ValueError(f"this secret is sealed with key {key_id!r}, which is not in {KEYS_SETTING}")
        try:
            blob = base64.b64decode(b64, validate=True)
            return aead.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(row)).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise ValueError("sealed secret does not verify (tampered, or sealed for another row)") from None

    def current(self, sealed: str) -> bool:
        """Whether `sealed` is already sealed under the sealing key (nothing for `reseal` to do)."""
        return self.encrypting and sealed.startswith(f"v2:{self.sealing_key_id}:")


def open_legacy(sealed: str, key: str) -> str:
    """Open a value of the retired `sb1` box (HMAC-SHA256 keystream + HMAC tag) with its old key
    setting; only `alliance alerts secrets reseal --legacy-key` calls this, to migrate."""
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raw = b""
    master = raw if len(raw) >= 32 else hashlib.sha256(key.encode()).digest()
    enc = hmac.new(master, b"alliance-secretbox-enc", hashlib.sha256).digest()
    mac = hmac.new(master, b"alliance-secretbox-mac", hashlib.sha256).digest()
    blob = base64.b64decode(sealed.removeprefix("sb1:"))
    if len(blob) < 16 + 32:
        raise ValueError("sealed secret too short")
    nonce, ct, tag = blob[:16], blob[16:-32], blob[-32:]
    if not hmac.compare_digest(tag, hmac.new(mac, b"sb1" + nonce + ct, hashlib.sha256).digest()):
        raise ValueError("legacy sealed secret does not verify (wrong --legacy-key?)")
    stream = bytearray()
    counter = 0
    while len(stream) < len(ct):
        stream += hmac.new(enc, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    return bytes(a ^ b for a, b in zip(ct, stream, strict=False)).decode()
