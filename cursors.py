"""Cursors: opaque, tamper-evident (HMAC-SHA256) and bound to the listing that made them."""

from __future__ import annotations

import base64
import hashlib
import hmac

import orjson

from config import ApiKey
from problems import InvalidCursor


def cursor_secret(keys: list[ApiKey]) -> bytes:
    """Signs cursors: the same for every key and every worker of one configuration."""
    return hashlib.sha256(b"cursor\0" + b"".join(sorted(k.digest for k in keys))).digest()


def encode_cursor(after: str, tag: str | None, secret: bytes) -> str:
    payload = base64.urlsafe_b64encode(orjson.dumps([after, tag])).rstrip(b"=")
    signature = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    return (payload + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


def decode_cursor(cursor: str, tag: str | None, secret: bytes) -> str:
    try:
        payload, _, signature = cursor.encode("ascii").partition(b".")
        expected = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(base64.urlsafe_b64decode(signature + b"=="), expected):
            raise InvalidCursor("Invalid cursor: signature does not match.")
        after, cursor_tag = orjson.loads(base64.urlsafe_b64decode(payload + b"=="))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise InvalidCursor("Invalid cursor: does not decode.") from exc
    if not isinstance(after, str) or cursor_tag != tag:
        raise InvalidCursor("Invalid cursor: belongs to another listing.")
    return after
