"""Cursors: opaque, tamper-evident (HMAC-SHA256) and bound to the query that made them. The
secret is the store's (DocumentStore.cursor_secret): made once with the data and known to no
client, so no client can mint a cursor, one from another data set does not verify, and
rotating API keys leaves open cursors valid."""

from __future__ import annotations

import base64
import hashlib
import hmac

import orjson

from models import ID_PATTERN
from problems import InvalidCursor
from storage import Key

# The times a cursor may hold: those of year 1 to 9999, as a stored document's are.
EARLIEST_MILLIS = -62_135_596_800_000
LATEST_MILLIS = 253_402_300_799_999


def _query_digest(binding: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(binding).digest()[:12]).decode()


def encode_cursor(after: Key, binding: bytes, secret: bytes) -> str:
    """`after` is where the next page starts (its sort time and id); `binding` is the query's
    filters and sort, so a cursor cannot be replayed against another query."""
    at, doc_id = after
    position = [_query_digest(binding), at, doc_id]
    payload = base64.urlsafe_b64encode(orjson.dumps(position)).rstrip(b"=")
    return (payload + b"." + _signature(payload, secret)).decode()


def _signature(payload: bytes, secret: bytes) -> bytes:
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).rstrip(b"=")


def decode_cursor(cursor: str, binding: bytes, secret: bytes) -> Key:
    try:
        payload, _, signature = cursor.encode("ascii").partition(b".")
        # Compared as the exact text issued: base64 decoding would skip stray characters.
        if not hmac.compare_digest(signature, _signature(payload, secret)):
            raise InvalidCursor("Invalid cursor: signature does not match.")
        digest, at, doc_id = orjson.loads(base64.urlsafe_b64decode(payload + b"=="))
    except (ValueError, TypeError, UnicodeError, OverflowError) as exc:
        raise InvalidCursor("Invalid cursor: does not decode.") from exc
    if digest != _query_digest(binding):
        raise InvalidCursor(
            "Invalid cursor: it belongs to another query; send the same filters and sort."
        )
    # Signed by us, but checked all the same: a value out of range must never reach a store.
    if not (
        isinstance(at, int)
        and EARLIEST_MILLIS <= at <= LATEST_MILLIS
        and isinstance(doc_id, str)
        and ID_PATTERN.fullmatch(doc_id)
    ):
        raise InvalidCursor("Invalid cursor: it holds no position a listing can have.")
    return at, doc_id
