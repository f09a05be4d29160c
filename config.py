"""Settings: every option, read once from the environment and `.env`, and the API keys in them."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from limits import parse_many
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

# The one local import: the body limit follows from the field limits, which models.py owns (and
# models.py imports nothing local).
from models import largest_document_bytes

LogFormat = Literal["json", "console"]
REDIS_SCHEMES = ("redis://", "rediss://")
# The key .env.example ships with: copied as it is, it would silently be the service's key.
PLACEHOLDER_KEY = "change-me-to-a-long-random-string"


class Settings(BaseSettings):
    """Every option, read once from the environment and `.env`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    api_keys: str = Field(
        default="",
        description="Comma-separated `key`, `name:key` or `name:key:read` (read-only) entries; "
        "empty generates one per start.",
    )
    api_key_hashes: str = Field(
        default="",
        description="Comma-separated `name:sha256hex` or `name:sha256hex:read` entries, so no "
        "plaintext key is configured.",
    )
    cors_origins: str = Field(default="", description="Comma-separated origins; empty: no CORS.")
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    rate_limit: str = "600/minute"
    rate_limit_storage_uri: str = "memory://"
    keyless_rate_limit: str = Field(
        default="30/minute",
        description="Per client address, for requests without a valid key; counted in each "
        "process.",
    )
    max_content_chars: int = Field(default=100_000, ge=1)
    # After MAX_CONTENT_CHARS, which its default is derived from.
    max_body_bytes: int = Field(
        default_factory=lambda fields: largest_document_bytes(fields["max_content_chars"]),
        description="Unset: the largest valid document, every character sent at its widest "
        "(ASCII escapes); set, it may not be less.",
    )
    max_buffered_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        description="Bytes of request bodies held at once across all connections, and a quarter "
        "of it by one key (at least MAX_BODY_BYTES); over either, 503.",
    )
    max_connections: int = Field(default=1000, ge=1, description="Open connections per process.")
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: LogFormat = "json"
    slow_request_ms: float = Field(default=500.0, gt=0)
    forwarded_allow_ips: str = Field(
        default="",
        description="Proxies whose X-Forwarded-For/-Proto are trusted; unset: none, so no client "
        "(a local one included) picks the address its budget and connection share are counted by.",
    )
    root_path: str = ""
    database_url: str | None = Field(
        default=None,
        description="mongodb:// or mongodb+srv:// selects MongoDB; unset: embedded SQLite.",
    )
    mongo_timeout_ms: int = Field(
        default=5000,
        ge=100,
        description="The most one MongoDB operation may take, the driver's retries included; "
        "the server is told the same (maxTimeMS) and stops working on it after that.",
    )
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rate_limit", "keyless_rate_limit")
    @classmethod
    def _parseable(cls, value: str) -> str:
        try:
            items = parse_many(value)
        except ValueError as exc:
            raise ValueError("expected rates such as '600/minute' or '10/second;500/hour'") from exc
        if any(item.amount < 1 for item in items):
            raise ValueError("a rate of 0 lets no request through; use at least 1")
        if re.search(r"(/|\bper)\s*0+\s*[a-z]", value, re.IGNORECASE):
            # limits reads "5/0minute" as 5/minute: refuse it rather than guess.
            raise ValueError("a window must be at least one unit long")
        return value

    @field_validator("rate_limit_storage_uri")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if value == "memory://":
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"expected memory:// or a URI starting {' or '.join(REDIS_SCHEMES)}")
        try:
            parts = urllib.parse.urlsplit(value)
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ValueError("not a valid Redis URL (host, port and database)") from None
        if not parts.hostname:
            raise ValueError("a Redis URL needs a host")
        if (database := parts.path.strip("/")) and not database.isdigit():
            raise ValueError("a Redis URL's path is the database number")
        try:
            # Its options, as the client reads them; the message names no value.
            parse_url(value)  # type: ignore[no-untyped-call]  # untyped upstream
        except ValueError as exc:
            raise ValueError(f"not a valid Redis URL: {exc}") from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _well_formed(cls, value: str) -> str:
        if any(k.digest == digest_key(PLACEHOLDER_KEY) for k in parse_api_keys(value)):
            raise ValueError("still the placeholder from .env.example: set a long random key")
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _well_formed_hashes(cls, value: str) -> str:
        parse_api_key_hashes(value)
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _a_directory(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: name the directory (the current one would be used silently)")
        return value

    @field_validator("host")
    @classmethod
    def _bind_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
                raise ValueError("expected an IP address or a host name to bind to") from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        # Matched as the exact string a browser sends: one written otherwise (a path, a trailing
        # slash, capitals, a default port, a wildcard) never matched, and its preflights got 400
        # from a service that had started fine.
        for origin in filter(None, (o.strip() for o in value.split(","))):
            if origin != "*" and not _browser_origin(origin):
                raise ValueError(
                    f"{origin[:64]!r} is not an origin as a browser sends it: scheme://host[:port]"
                    ", lower case, no path, no default port, no wildcard (e.g. "
                    "https://app.example.com), or *"
                )
        return value

    @field_validator("root_path")
    @classmethod
    def _a_path_prefix(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError("expected a path prefix such as /documents (a leading /, no trailing)")
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, value: str) -> str:
        entries = [e.strip() for e in value.split(",") if e.strip()]
        for entry in entries:
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry[:64]!r} is not an IP address or network") from None
        return ",".join(entries)

    @field_validator("database_url")
    @classmethod
    def _mongodb_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("expected a mongodb:// or mongodb+srv:// URL")
        if value.startswith("mongodb://"):
            # Imported here: only a service configured for MongoDB loads pymongo.
            from pymongo import uri_parser
            from pymongo.errors import ConfigurationError

            try:
                uri_parser.parse_uri(value)
            except (ConfigurationError, ValueError, OSError) as exc:  # OSError: a TLS file
                # pymongo's messages name what is wrong, never the password.
                raise ValueError(f"not a valid MongoDB URL: {exc}") from None
        else:
            # mongodb+srv:// is resolved through DNS only when used: check its form here.
            parts = urllib.parse.urlsplit(value)
            if not parts.hostname or ":" in parts.netloc.rpartition("@")[2]:
                raise ValueError("a mongodb+srv:// URL names one host, without a port")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Checks across settings, each reported under the variable to change."""
        plain = parse_api_keys(self.api_keys)
        for variable, keys in (
            ("API_KEYS", plain),
            ("API_KEY_HASHES", plain + parse_api_key_hashes(self.api_key_hashes)),
        ):
            names = [k.name for k in keys]
            if repeated := next((n for n in names if names.count(n) > 1), None):
                raise ValueError(
                    f"{variable}: the name {repeated!r} is used twice; names are unique across "
                    "API_KEYS and API_KEY_HASHES"
                )
            digests = [k.digest for k in keys]
            if len(set(digests)) != len(digests):
                raise ValueError(f"{variable}: the same key is configured twice")
        if self.workers > 1 and not (self.api_keys or self.api_key_hashes):
            raise ValueError(
                "WORKERS: several workers need API_KEYS or API_KEY_HASHES: a key generated at "
                "start would be a different one in each worker"
            )
        shares = self.workers > 1 and self.rate_limit_storage_uri == "memory://"
        if shares and (low := [i for i in parse_many(self.rate_limit) if i.amount < self.workers]):
            # Each worker allows its share (main._key_limits): less than one would be one each.
            raise ValueError(
                f"RATE_LIMIT: {low[0]} cannot be split among {self.workers} workers counting "
                f"their own: allow at least {self.workers} a window, or share the count in Redis "
                "(RATE_LIMIT_STORAGE_URI)"
            )
        if self.max_body_bytes < (largest := largest_document_bytes(self.max_content_chars)):
            # A valid document, sent as json.dumps sends it by default, would get 413.
            raise ValueError(
                f"MAX_BODY_BYTES: must be at least {largest}, the largest valid document with "
                f"MAX_CONTENT_CHARS={self.max_content_chars} (or unset it to get exactly that)"
            )
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"MAX_BUFFERED_BODY_BYTES: must be at least MAX_BODY_BYTES ({self.max_body_bytes})"
                ", or no full-size body could ever be read"
            )
        return self


@dataclass(frozen=True)
class ApiKey:
    """A configured key: only its name is ever logged; only its digest is kept. A read-only
    key may GET and HEAD, nothing else."""

    name: str
    digest: bytes
    read_only: bool = False


ORIGIN = re.compile(
    r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)(:[1-9][0-9]*)?"
)


def _browser_origin(origin: str) -> bool:
    """Whether `origin` is written as a browser writes it (the URL standard's serialization):
    an address as it serializes one (127.0.0.1, [::1]; a host whose last label is a number is
    an IPv4 address to it), no default port."""
    if not (match := ORIGIN.fullmatch(origin)):
        return False
    host = match[2]
    try:
        port = urllib.parse.urlsplit(origin).port
        if host.startswith("["):
            canonical = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        elif re.fullmatch(r"0x[0-9a-f]*|[0-9]+", host.rpartition(".")[2]):
            canonical = str(ipaddress.IPv4Address(host))
        else:
            canonical = host
    except ValueError:  # a port past 65535, an address that is none
        return False
    return host == canonical and (match[1], port) not in (("http", 80), ("https", 443))


def digest_key(key: str | bytes) -> bytes:
    """A key's SHA-256, of its UTF-8 (what clients send) when given as text."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def _entries(spec: str) -> list[tuple[int, str, str]]:
    """(number, name, value) for each `value` or `name:value` in a comma-separated list, without
    the spaces around each part: HTTP drops those around a header's value, so a key configured
    with them had never matched."""
    entries = []
    for number, entry in enumerate(filter(None, (e.strip() for e in spec.split(","))), 1):
        name, sep, value = entry.partition(":")
        entries.append((number, name.strip(), value.strip()) if sep else (number, "", entry))
    return entries


def _scope(number: int, name: str, value: str) -> tuple[str, bool]:
    """`secret` or `secret:read` after a name; any other suffix is refused, not guessed at."""
    if not name:
        return value, False
    secret, sep, scope = value.rpartition(":")
    if not sep:
        return value, False
    secret, scope = secret.strip(), scope.strip()
    if scope != "read":
        # Not echoed: a key with a ':' in it would put part of itself in the message.
        raise ValueError(f"entry {number}: a key holds no ':', and the only scope is 'read'")
    return secret, True


def parse_api_keys(spec: str) -> list[ApiKey]:
    keys: list[ApiKey] = []
    for number, name, value in _entries(spec):
        key, read_only = _scope(number, name, value)
        if len(key) < 8:
            raise ValueError(
                f"entry {number} must be 'key', 'name:key' or 'name:key:read' with a key of "
                "8+ chars"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):  # no client could send it
            raise ValueError(f"entry {number}: a key holds no control character")
        keys.append(ApiKey(name or f"key{number}", digest_key(key), read_only))
    return keys


def parse_api_key_hashes(spec: str) -> list[ApiKey]:
    keys: list[ApiKey] = []
    for number, name, entry in _entries(spec):
        value, read_only = _scope(number, name, entry)
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError(f"entry {number} must be 'name:<64 hex chars of SHA-256(key)>'")
        keys.append(ApiKey(name or f"hash{number}", digest, read_only))
    return keys


def configured_keys(settings: Settings) -> list[ApiKey]:
    return parse_api_keys(settings.api_keys) + parse_api_key_hashes(settings.api_key_hashes)
