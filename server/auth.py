"""Who is calling, and what they may do.

Four kinds of key: the admin key (`--admin-key`: adapter management, and everything else),
the metrics key (`--metrics-key`: /metrics only, for Prometheus and the endpoint picker),
one shared key (`--api-key`, as vLLM's: every model), and tenant keys (`--tenant-keys FILE`:
a tenant sees and calls only the adapters its patterns allow, plus the base model). With no
shared or tenant key configured, inference is open, as in vLLM. Keys are compared in constant time.

The tenant file is JSON:

    {"tenants": {"acme": {"keys": ["sk-acme-1"], "adapters": ["acme/*"],
                          "requests_per_minute": 600, "tokens_per_minute": 200000}}}
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import APIError


@dataclass(frozen=True)
class Principal:
    name: str  # "admin", "shared", "anonymous" or the tenant's name
    is_admin: bool = False
    tenant: str | None = None
    patterns: tuple[str, ...] | None = None  # None: every adapter

    def may_use(self, adapter: str) -> bool:
        return self.patterns is None or any(fnmatch.fnmatchcase(adapter, p) for p in self.patterns)


class TokenBucket:
    """`rate` per minute, bursting up to one minute's worth."""

    def __init__(self, per_minute: float):
        self.capacity = per_minute
        self.level = per_minute
        self.rate = per_minute / 60.0
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Take `amount` if the bucket has it; else return the seconds to wait (0 = taken)."""
        with self.lock:
            self._refill()
            if self.level >= min(amount, self.capacity):
                self.level -= amount
                return 0.0
            return (min(amount, self.capacity) - self.level) / self.rate


@dataclass
class Tenant:
    name: str
    patterns: tuple[str, ...]
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None


def _digest(key: str) -> bytes:
    # Keys are looked up by hash and then compared in constant time, so neither a dict
    # lookup nor a string comparison leaks how much of a key was right.
    return hashlib.sha256(key.encode()).digest()


@dataclass
class Keyring:
    admin_key: str | None = None
    api_key: str | None = None
    metrics_key: str | None = None
    tenants: dict[bytes, Tenant] = field(default_factory=dict)  # sha256(key) -> tenant
    by_name: dict[str, Tenant] = field(default_factory=dict)

    @classmethod
    def load(cls, admin_key: str | None, api_key: str | None,
             tenant_file: str | None, metrics_key: str | None = None) -> Keyring:
        ring = cls(admin_key=admin_key, api_key=api_key, metrics_key=metrics_key)
        if tenant_file:
            try:
                spec = json.loads(Path(tenant_file).read_text())["tenants"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--tenant-keys {tenant_file}: {e}") from None
            for name, t in spec.items():
                tenant = Tenant(name, tuple(t.get("adapters", [])),
                                TokenBucket(t["requests_per_minute"])
                                if t.get("requests_per_minute") else None,
                                TokenBucket(t["tokens_per_minute"])
                                if t.get("tokens_per_minute") else None)
                ring.by_name[name] = tenant
                for key in t.get("keys", []):
                    if not isinstance(key, str) or len(key) < 8:
                        raise ValueError(f"--tenant-keys: tenant {name!r} has a key shorter "
                                         "than 8 characters")
                    ring.tenants[_digest(key)] = tenant
        return ring

    @property
    def inference_open(self) -> bool:
        """No --api-key and no tenants: inference is open (the admin key guards only the
        admin API)."""
        return not (self.api_key or self.tenants)

    def identify(self, authorization: str | None) -> Principal | None:
        """The caller behind an Authorization header; None if absent or unknown."""
        key = bearer_key(authorization)
        if key is None:
            return None
        if self.admin_key and hmac.compare_digest(key.encode(), self.admin_key.encode()):
            return Principal("admin", is_admin=True)
        if self.api_key and hmac.compare_digest(key.encode(), self.api_key.encode()):
            return Principal("shared")
        tenant = self.tenants.get(_digest(key))
        if tenant is not None:
            return Principal(tenant.name, tenant=tenant.name, patterns=tenant.patterns)
        return None


def bearer_key(authorization: str | None) -> str | None:
    """The key of `Bearer <key>`; the scheme is case-insensitive (RFC 9110 11.1)."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


OPEN_PATHS = ("/health", "/ping", "/version", "/openapi.json")
METRICS_PATH = "/metrics"
ADMIN_PREFIXES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                  "/v1/merge", "/v1/unmerge")


def route_class(path: str) -> str:
    if path in OPEN_PATHS:
        return "open"
    if path == METRICS_PATH:
        return "metrics"
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES):
        return "admin"
    return "inference"


def authorize(ring: Keyring, path: str, authorization: str | None) -> Principal:
    """The principal for a request, or an APIError (401, 403, 404)."""
    kind = route_class(path)
    if kind == "open":
        return Principal("anonymous")
    if kind == "metrics":
        return _metrics_principal(ring, authorization)
    principal = ring.identify(authorization)
    if kind == "admin":
        if not ring.admin_key:
            raise APIError(404, "the admin API is off: start the server with --admin-key")
        if principal is None:
            raise APIError(401, "invalid or missing admin key", None, "invalid_api_key")
        if not principal.is_admin:
            raise APIError(403, "this key may not manage adapters", None, "forbidden")
        return principal
    if principal is None:
        if ring.inference_open:
            return Principal("anonymous")
        raise APIError(401, "invalid or missing API key", None, "invalid_api_key")
    return principal


def _metrics_principal(ring: Keyring, authorization: str | None) -> Principal:
    """/metrics: with --metrics-key, only that key (or the admin key) reads it, in full.
    Without one it is open, as in vLLM; but where tenants are promised that other tenants'
    adapters look like names that do not exist, an anonymous reader gets the view without
    adapter or tenant names (`Principal.patterns` empty)."""
    key = bearer_key(authorization)
    principal = ring.identify(authorization)
    if ring.metrics_key and key is not None and hmac.compare_digest(
            key.encode(), ring.metrics_key.encode()):
        return Principal("metrics")
    if principal is not None and principal.is_admin:
        return principal
    if ring.metrics_key:
        raise APIError(401, "invalid or missing metrics key (--metrics-key)", None,
                       "invalid_api_key")
    return Principal("anonymous", patterns=() if ring.tenants else None)


def check_rate(ring: Keyring, principal: Principal, tokens: int) -> None:
    """429 with Retry-After when the tenant is over its request or token rate."""
    tenant = ring.by_name.get(principal.tenant or "")
    if tenant is None:
        return
    for bucket, amount, what in ((tenant.requests, 1, "requests"),
                                 (tenant.tokens, tokens, "tokens")):
        if bucket is None:
            continue
        wait = bucket.take(amount)
        if wait > 0:
            raise APIError(429, f"tenant {tenant.name!r} is over its {what} per minute",
                           None, "rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, round(wait + 0.5)))})
