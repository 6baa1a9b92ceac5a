"""API keys with scopes, per-key rate limits, and the rule that an open server stays on loopback.

Keys are configured as entries `KEY_ID:SCOPES:SECRET` (SCOPES joined by '+'; SECRET is the key
itself or `sha256:<hex>` of it), separated by commas or newlines, in MEMOIR_API_KEYS or in the
file MEMOIR_API_KEYS_FILE. Only SHA-256 digests are kept in memory, and a presented key is
compared with every stored digest in constant time.

Scopes: `generate` (/generate, /v1), `edit` (submit, read and cancel edits), `admin` (retract
applied edits, read the memory state; implies the other two).
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import hmac
import ipaddress
import math
import os
import tempfile
from pathlib import Path
import secrets
import threading
import time

SCOPES = ("generate", "edit", "admin")


class KeyConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    scopes: frozenset[str]
    digest: bytes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_keys(text: str) -> list[ApiKey]:
    keys: list[ApiKey] = []
    for raw in text.replace("\n", ",").split(","):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise KeyConfigError(f"API key entry {entry.split(':')[0]!r} is not KEY_ID:SCOPES:SECRET")
        key_id, scopes_text, secret = parts
        scopes = frozenset(s.strip() for s in scopes_text.split("+") if s.strip())
        unknown = scopes - set(SCOPES)
        if unknown or not scopes:
            raise KeyConfigError(f"API key {key_id!r}: unknown scopes {sorted(unknown)}; use {'+'.join(SCOPES)}")
        if secret.startswith("sha256:"):
            try:
                value = bytes.fromhex(secret[len("sha256:") :])
            except ValueError:
                raise KeyConfigError(f"API key {key_id!r}: sha256 digest is not hex") from None
            if len(value) != 32:
                raise KeyConfigError(f"API key {key_id!r}: sha256 digest must have 64 hex digits")
        else:
            value = digest(secret)
        if any(k.key_id == key_id for k in keys):
            raise KeyConfigError(f"API key id {key_id!r} is configured twice")
        keys.append(ApiKey(key_id, scopes, value))
    return keys


def new_key() -> str:
    return "mk-" + secrets.token_urlsafe(32)


def config_line(key_id: str, scopes: list[str], key: str) -> str:
    return f"{key_id}:{'+'.join(scopes)}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


class KeyStore:
    def __init__(self, keys: list[ApiKey]):
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        wanted = digest(presented)
        found = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_keys(settings, create_bootstrap: bool = True) -> tuple[KeyStore, str]:
    """The configured keys; may create a bootstrap admin key. Returns (store, note for the log).

    create_bootstrap=False only checks that the settings can run (nothing is written).
    """
    text = settings.api_keys or ""
    if settings.api_keys_file:
        text += "\n" + Path(settings.api_keys_file).read_text()
    keys = parse_keys(text)
    if keys:
        return KeyStore(keys), f"{len(keys)} API key(s) configured"
    if is_loopback(settings.host):
        return KeyStore([]), (
            "no API keys configured: listening on loopback only, and every local client may generate, edit "
            "and retract"
        )
    if settings.allow_unauthenticated:
        return KeyStore([]), f"no API keys configured and MEMOIR_ALLOW_UNAUTHENTICATED is set: {settings.host} is open"
    if settings.bootstrap_key_file:
        path = Path(settings.bootstrap_key_file)
        if not create_bootstrap:
            return KeyStore([]), f"an admin key will be kept in {path}"
        created = not path.exists() and _create_key_file(path)
        key = path.read_text().strip()
        return KeyStore([ApiKey("bootstrap-admin", frozenset({"admin"}), digest(key))]), (
            f"no API keys configured: {'created' if created else 'using'} the admin key in {path} (scope: admin)"
        )
    raise KeyConfigError(
        f"refusing to listen on {settings.host} without API keys: set MEMOIR_API_KEYS or MEMOIR_API_KEYS_FILE "
        "(make one with `python -m app.keys`), set MEMOIR_BOOTSTRAP_KEY_FILE to have an admin key created, "
        "or set MEMOIR_ALLOW_UNAUTHENTICATED=true to run open"
    )


def _create_key_file(path: Path) -> bool:
    """Write a new key to `path` unless it exists; False when another process (a replica on the
    same volume) wrote it first. The file appears whole (a hard link of a written file) or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(new_key() + "\n")
        os.chmod(staging, 0o600)
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(staging)


class RateLimiter:
    """Token bucket per principal: `per_minute` sustained, bursts up to `burst`."""

    def __init__(self, per_minute: int, burst: int):
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, principal: str) -> float:
        """0 if the request may go; otherwise seconds until it may."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(principal, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[principal] = (tokens - 1.0, now)
                return 0.0
            self._buckets[principal] = (tokens, now)
            return (1.0 - tokens) / self.rate


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
