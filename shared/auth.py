"""API keys and tenants: the one module every HTTP service uses to authenticate requests.

Keys are random (256 bits) and stored only as SHA-256 hashes; a stolen database does not
reveal usable keys. A key belongs to one tenant, has one role, and may be bound to a site.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from fastapi import HTTPException, Request
from pymongo.asynchronous.database import AsyncDatabase

from shared.http import describe_failure, error_body, look_up_failed, look_up_unavailable
from shared.mongo import Document, TtlCache

log = logging.getLogger("alliance.auth")

Role = Literal["submit", "read", "admin"]
ROLES: tuple[Role, ...] = ("submit", "read", "admin")
KEYS = "api_keys"
KEY_PREFIX = "ak_"
KEY_LOOKUP_TIMEOUT_SECONDS = 3.0

# Roles a key's role also grants: an admin may read what it administers.
_GRANTS: dict[str, frozenset[str]] = {
    "submit": frozenset({"submit"}),
    "read": frozenset({"read"}),
    "admin": frozenset({"admin", "read"}),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, a role, and optionally the one site the key is bound to."""

    key_id: str
    tenant_id: str
    role: Role
    site_id: str | None = None

    def grants(self, role: Role) -> bool:
        return role in _GRANTS[self.role]

    def may_see_site(self, site_id: str) -> bool:
        return self.site_id is None or self.site_id == site_id


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def ensure_indexes(db: AsyncDatabase[Document]) -> None:
    """Indexes of the key collection."""
    await db[KEYS].create_index([("tenant_id", 1), ("role", 1)])


# Tenant ids: no ':' (nor anything else a store or a Kafka key might use as a separator), so no
# composite id built from a tenant id can be read as another tenant's (issue 12, item 7).
TENANT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def tenant_id_problem(tenant_id: str) -> str | None:
    """Why `tenant_id` cannot be a tenant id, or None if it can."""
    if not TENANT_ID_PATTERN.fullmatch(tenant_id):
        return "a tenant id is 1-64 characters of A-Za-z0-9._- (no ':')"
    return None


async def create_key(db: AsyncDatabase[Document], tenant_id: str, role: Role, site_id: str | None = None,
                     label: str = "") -> tuple[str, Principal]:
    """Create a key; the plain key is returned once and never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if problem := tenant_id_problem(tenant_id):
        raise ValueError(problem)
    key = new_key()
    key_id = hash_key(key)[:16]
    await db[KEYS].insert_one({
        "_id": hash_key(key), "key_id": key_id, "tenant_id": tenant_id, "role": role,
        "site_id": site_id, "label": label, "created_at": datetime.now(UTC), "revoked": False,
    })
    await db["tenants"].update_one({"_id": tenant_id}, {"$setOnInsert": {"created_at": datetime.now(UTC)}},
                                   upsert=True)
    return key, Principal(key_id, tenant_id, role, site_id)


async def revoke_key(db: AsyncDatabase[Document], key_id: str) -> bool:
    """Revoke a key by its public id."""
    res = await db[KEYS].update_one({"key_id": key_id, "revoked": {"$ne": True}},
                                    {"$set": {"revoked": True, "revoked_at": datetime.now(UTC)}})
    return res.modified_count == 1


@dataclass(frozen=True)
class KeyInfo:
    """What an operator may see of a key: never the key, nor its hash (the stored `_id`)."""

    key_id: str
    tenant_id: str
    role: str
    site_id: str | None
    label: str
    created_at: datetime | None
    revoked: bool
    revoked_at: datetime | None


async def list_keys(db: AsyncDatabase[Document], tenant_id: str | None = None) -> list[KeyInfo]:
    """Every key (of one tenant, if given), by tenant then age; revoked ones included."""
    query: Document = {} if tenant_id is None else {"tenant_id": tenant_id}
    # The projection keeps the hash in the store: a listing cannot leak it.
    docs = await db[KEYS].find(query, {"_id": 0}).sort([("tenant_id", 1), ("created_at", 1)]).to_list()
    return [KeyInfo(d["key_id"], d["tenant_id"], d["role"], d.get("site_id"), d.get("label") or "",
                    d.get("created_at"), bool(d.get("revoked")), d.get("revoked_at")) for d in docs]


class KeyStore:
    """Looks keys up, with a short cache so a hot API does not hit the store per request.

    A revoked key stops working within `ttl_seconds`. The cache holds only keys that exist: at most
    `max_entries`, the least recently used dropped first. Unknown keys are not cached, so a flood of
    random keys cannot push known keys out (each such miss costs a look-up, and a peer sending them
    is stopped by the failed-authentication limit, `shared.http.Guard`).
    """

    def __init__(self, db: AsyncDatabase[Document], ttl_seconds: float = 30.0, max_entries: int = 10_000) -> None:
        self._db = db
        self._cache: TtlCache[str, Principal] = TtlCache(ttl_seconds, max_entries)

    def known(self, key: str) -> bool:
        """Whether the key was valid when last looked up and is still remembered (whatever its age):
        such a key is no stranger to the failed-authentication limit, though `lookup` reads it again
        once its time to live has passed (so a revocation still takes effect)."""
        return hash_key(key) in self._cache

    def cached(self, key: str) -> Principal | None:
        """The key's principal when the cache knows it (and it has not expired), without a look-up."""
        hit = self._cache.fresh(hash_key(key))
        return None if hit is None else hit.value

    async def lookup(self, key: str) -> Principal | None:
        if (known := self.cached(key)) is not None:
            return known
        digest = hash_key(key)
        doc = await self._db[KEYS].find_one({"_id": digest})
        if doc is None or doc.get("revoked") or not hmac.compare_digest(doc["_id"], digest):
            self._cache.pop(digest)
            return None
        principal = Principal(doc["key_id"], doc["tenant_id"], doc["role"], doc.get("site_id"))
        self._cache.put(digest, principal)
        return principal

    def __len__(self) -> int:
        return len(self._cache)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, error_body([("Authorization", message)]), headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str | None:
    """The bearer token of a request, if any."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require(keys: Callable[[], KeyStore], role: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: 401 without a valid key, 403 when the key's role does not grant `role`."""

    async def dependency(request: Request) -> Principal:
        token = bearer_token(request)
        if token is None:
            raise _unauthorized("missing bearer API key")
        try:
            principal = await asyncio.wait_for(keys().lookup(token), KEY_LOOKUP_TIMEOUT_SECONDS)
        except Exception as exc:
            # The key store being away is our outage, not the caller's fault: 503, retry later. A
            # look-up failing otherwise would fail again: a 500, not a request to retry.
            if not look_up_unavailable(exc):
                raise look_up_failed(exc, "API key look-up") from exc
            log.warning("API key store unavailable: %s", describe_failure(exc))
            raise HTTPException(503, error_body([(None, "authentication store unavailable, retry later")]),
                                headers={"Retry-After": "2"}) from exc
        if principal is None:
            raise _unauthorized("unknown or revoked API key")
        if not principal.grants(role):
            raise HTTPException(403, error_body([("Authorization", f"this key's role does not allow '{role}'")]))
        return principal

    return dependency


def forbid_site(site_id: str) -> HTTPException:
    """The answer when a site-bound key names another site."""
    return HTTPException(403, error_body([("site_id", f"this key is bound to another site than '{site_id}'")]))
