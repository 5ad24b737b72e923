"""Encryption at rest of the webhook signing secrets, with the standard library only.

The secrets must be stored in a form we can read back (we sign with them), so hashing is not an
option. The construction is a textbook encrypt-then-MAC scheme built from HMAC-SHA256 alone:
two sub-keys are derived from the master key; the keystream is HMAC(enc_key, nonce || counter)
(a PRF in counter mode, random 128-bit nonce per message) and the tag is
HMAC(mac_key, version || nonce || ciphertext), checked in constant time before decrypting.
It would be replaced by `cryptography`'s AES-GCM if that package were a dependency.

Without a configured key (local runs) values are stored as `plain:<secret>`; once a key is
configured, new values are sealed and old plain ones still open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

_VERSION = b"sb1"
_NONCE = 16
_TAG = 32


def _master(key: str) -> bytes:
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raw = b""
    # A base64 key of >= 32 bytes is used as is; anything else is treated as a passphrase.
    return raw if len(raw) >= 32 else hashlib.sha256(key.encode()).digest()


class SecretBox:
    """Seals and opens short secrets with one master key (or none: plain storage)."""

    def __init__(self, key: str = "") -> None:
        self._enabled = bool(key)
        master = _master(key) if key else b""
        self._enc = hmac.new(master, b"alliance-secretbox-enc", hashlib.sha256).digest()
        self._mac = hmac.new(master, b"alliance-secretbox-mac", hashlib.sha256).digest()

    @property
    def encrypting(self) -> bool:
        return self._enabled

    def _stream(self, nonce: bytes, n: int) -> bytes:
        out = bytearray()
        counter = 0
        while len(out) < n:
            out += hmac.new(self._enc, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
            counter += 1
        return bytes(out[:n])

    def seal(self, plain: str) -> str:
        """The stored form of `plain`."""
        if not self._enabled:
            return "plain:" + plain
        data = plain.encode()
        nonce = secrets.token_bytes(_NONCE)
        ct = bytes(a ^ b for a, b in zip(data, self._stream(nonce, len(data)), strict=True))
        tag = hmac.new(self._mac, _VERSION + nonce + ct, hashlib.sha256).digest()
        return "sb1:" + base64.b64encode(nonce + ct + tag).decode()

    def open(self, sealed: str) -> str:
        """The secret inside `sealed`; ValueError if it was tampered with or the key is wrong/missing."""
        if sealed.startswith("plain:"):
            return sealed[len("plain:"):]
        if not sealed.startswith("sb1:"):
            raise ValueError("unknown sealed-secret format")
        if not self._enabled:
            raise ValueError("this secret is encrypted and no ALLIANCE_ALERTS_SECRETS_KEY is configured")
        blob = base64.b64decode(sealed[4:])
        if len(blob) < _NONCE + _TAG:
            raise ValueError("sealed secret too short")
        nonce, ct, tag = blob[:_NONCE], blob[_NONCE:-_TAG], blob[-_TAG:]
        expected = hmac.new(self._mac, _VERSION + nonce + ct, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise ValueError("sealed secret does not verify (wrong key or tampered)")
        return bytes(a ^ b for a, b in zip(ct, self._stream(nonce, len(ct)), strict=True)).decode()
