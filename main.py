"""The documents service: settings, app factory, dependencies, routes and the one error map.

`python main.py` serves it; `python main.py seed|export|import FILE` manage its data.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import orjson
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from limits import parse_many
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match, Route

import ratelimit
from config import ApiKey, Settings, configured_keys, digest_key
from logging_config import clip, configure_logging
from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from metrics import MeteredStore, Metrics
from middleware import (
    BodyLimitMiddleware,
    HeadAsGetMiddleware,
    RequestContextMiddleware,
    problem_response,
)
from models import (
    Document,
    DocumentCreate,
    DocumentPage,
    DocumentUpdate,
    Problem,
)
from ratelimit import LimiterUnavailable, open_storage, spend
from server import MAX_HEAD_BYTES, MAX_HEADERS, SERVER_OPTIONS
from storage import (
    DocumentInvalid,
    DocumentNotFound,
    DocumentStore,
    IdempotencyConflict,
    IdempotencyKey,
    MongoStore,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    TinyDBStore,
    new_document,
)

VERSION = "1.0.0"
log = logging.getLogger("documents.api")


class AuthFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


class Forbidden(Exception):
    """A read-only key asked to write."""


class InvalidCursor(Exception):
    pass


class UnsupportedMediaType(Exception):
    pass


API_KEY_HEADER = "X-API-Key"
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request that has paid for itself, and what its handler works with."""

    key: ApiKey
    store: DocumentStore
    settings: Settings


class ApiKeyAuth:
    """Check the X-API-Key, spend one unit of its rate budget, and hand the handler its store.
    Memory-only, so it runs on the event loop. It is each /v1 route's only dependency on purpose:
    FastAPI solves every Depends in a pass of its own, which a profile of GET put at about 12 us
    each. It is a plain callable rather than an `APIKeyHeader` subclass because FastAPI does
    per-request scope bookkeeping for security classes (4% of a GET); `_openapi` declares the
    `ApiKey` scheme on every operation that depends on it instead."""

    async def __call__(self, request: Request) -> Caller:
        state = request.app.state
        key = _authenticate(state.api_keys, request.headers.get(API_KEY_HEADER))
        request.state.api_key_name = key.name
        await _spend_budget(request, key)
        if key.read_only and request.method not in READ_METHODS:
            raise Forbidden
        return Caller(key, state.store, state.settings)


authorize = ApiKeyAuth()
API_KEY_SCHEME = {
    "type": "apiKey",
    "in": "header",
    "name": API_KEY_HEADER,
    "description": "An API key from `API_KEYS`.",
}
CallerDep = Annotated[Caller, Depends(authorize)]


def _authenticate(keys: list[ApiKey], presented: str | None) -> ApiKey:
    """Every configured key is compared, in constant time, whether or not one matched."""
    if not presented:
        raise AuthFailed("missing")
    digest = digest_key(presented)
    match: ApiKey | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            match = key
    if match is None:
        raise AuthFailed("invalid")
    return match


async def _spend_budget(request: Request, key: ApiKey) -> None:
    """One budget per API key (not per client address) in every configured window, shared
    through RATE_LIMIT_STORAGE_URI. The headers describe the window closest to refusing."""
    state = request.app.state
    budgets = await spend(state.rate_storage, state.rate_limits, key.name)
    refused = [b for b in budgets if not b.allowed]
    shown = max(refused, key=lambda b: b.reset_at) if refused else min(budgets)
    request.state.response_headers = [
        (b"x-ratelimit-limit", str(shown.limit).encode()),
        (b"x-ratelimit-remaining", str(shown.remaining).encode()),
        (b"x-ratelimit-reset", str(int(shown.reset_at)).encode()),
    ]
    if refused:
        raise RateLimited(max(1, int(shown.reset_at - time.time()) + 1))


async def get_store(request: Request) -> DocumentStore:
    store: DocumentStore = request.app.state.store
    return store


def _require_json(content_type: str) -> None:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise UnsupportedMediaType(content_type or "none")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Linear in the number of keys: this runs before authentication, on any body."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {clip(key, 64)!r}")
            seen.add(key)
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} does not fit a 64-bit float")
    return value


class StrictJSONRequest(Request):
    """Parses bodies as strict JSON: a duplicate key, NaN, Infinity or an overflowing number is
    a malformed body (400), where `json.loads` would silently keep one value or an infinity."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(
                    body,
                    object_pairs_hook=_reject_duplicates,
                    parse_constant=_reject_constant,
                    parse_float=_finite,
                )
            except ValueError as exc:
                if isinstance(exc, json.JSONDecodeError):
                    raise
                raise json.JSONDecodeError(str(exc), body.decode(errors="replace"), 0) from exc
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes that take JSON bodies only (415 otherwise), parsed by StrictJSONRequest
    (FastAPI's custom route hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not (self.methods or set()) & {"POST", "PATCH", "PUT"}:
            return handler

        async def strict_handler(request: Request) -> Response:
            _require_json(request.headers.get("content-type", ""))
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


StoreDep = Annotated[DocumentStore, Depends(get_store)]

# --- HTTP details: ETags and cursors ---------------------------------------------------------


def etag(doc: Document) -> str:
    return f'"{doc.version}"'


def _etag_versions(header: str, *, weak: bool) -> list[int | Literal["*"]]:
    """Versions named by an ETag list. If-None-Match compares weakly (W/"3" names version 3);
    If-Match compares strongly, so a weak tag there names nothing (RFC 9110, 13.1)."""
    versions: list[int | Literal["*"]] = []
    for raw in header.split(","):
        tag = raw.strip()
        if tag.startswith("W/"):
            if not weak:
                continue
            tag = tag[2:]
        if tag == "*":
            versions.append("*")
        elif len(tag) >= 2 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
            versions.append(int(tag[1:-1]))
    return versions


def _if_match_version(header: str | None) -> int | None:
    """The version an If-Match demands: None for no header or `*`, -1 (never matches) for
    tags this service never issued."""
    if header is None:
        return None
    versions = _etag_versions(header, weak=False)
    if "*" in versions:
        return None
    numbers = [v for v in versions if isinstance(v, int)]
    return numbers[0] if len(numbers) == 1 else -1


def encode_cursor(after: str, tag: str | None, key: ApiKey) -> str:
    payload = base64.urlsafe_b64encode(orjson.dumps([after, tag])).rstrip(b"=")
    # Signed with the caller's key digest: a cursor is useless to another key, and tamper-evident.
    signature = hmac.new(key.digest, payload, hashlib.sha256).digest()[:16]
    return (payload + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


def decode_cursor(cursor: str, tag: str | None, key: ApiKey) -> str:
    try:
        payload, _, signature = cursor.encode("ascii").partition(b".")
        expected = hmac.new(key.digest, payload, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(base64.urlsafe_b64decode(signature + b"=="), expected):
            raise InvalidCursor("signature does not match")
        after, cursor_tag = orjson.loads(base64.urlsafe_b64decode(payload + b"=="))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise InvalidCursor("does not decode") from exc
    if not isinstance(after, str) or cursor_tag != tag:
        raise InvalidCursor("belongs to another listing")
    return after


def _json(doc: Document, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # The store hands out validated models: serialise once, skipping response_model's re-check.
    return Response(doc.json_bytes, status, headers, media_type="application/json")


def _check_content(content: str | None, settings: Settings) -> None:
    if content is not None and len(content) > settings.max_content_chars:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "content"),
                    "msg": f"String should have at most {settings.max_content_chars} characters",
                    "type": "string_too_long",
                }
            ]
        )


# --- routes ---------------------------------------------------------------------------------


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Malformed request (bad JSON, invalid cursor).",
        401: "Missing or invalid X-API-Key.",
        403: "The key is read-only (`name:key:read`) and this operation writes.",
        404: "No such document.",
        409: "Idempotency-Key reused with a different body.",
        412: "If-Match does not match the current ETag.",
        413: "Request body over MAX_BODY_BYTES.",
        415: "Body is not JSON.",
        422: "A field failed validation; `errors` names each one.",
        429: "Rate limit exceeded; see Retry-After.",
        431: f"Request head over {MAX_HEAD_BYTES // 1024} KiB or {MAX_HEADERS} headers "
        "(refused by the server).",
        503: "The store is unavailable.",
    }
    return {
        s: {
            "model": Problem,
            "description": described[s],
            "content": {
                "application/problem+json": {
                    "example": {
                        "type": "urn:documents:problem:...",
                        "title": _title(s),
                        "status": s,
                        "detail": described[s],
                        "request_id": "4f9c2b7e0a1d4c3b",
                    }
                }
            },
        }
        for s in statuses
    }


_ETAG_HEADER = {
    "ETag": {
        "description": 'Current version, e.g. `"3"`, for If-Match / If-None-Match.',
        "schema": {"type": "string"},
    }
}


def build_router() -> APIRouter:
    router = APIRouter(
        prefix="/v1",
        route_class=StrictJSONRoute,
        tags=["documents"],
        responses=_problems(401, 422, 429, 431, 503),
    )

    @router.post(
        "/documents",
        status_code=201,
        response_model=Document,
        summary="Create a document",
        responses={
            201: {
                "description": "Created (or replayed, with `Idempotent-Replayed: true`).",
                "headers": {
                    **_ETAG_HEADER,
                    "Location": {
                        "description": "URL of the new document.",
                        "schema": {"type": "string"},
                    },
                },
            },
            **_problems(400, 403, 409, 413, 415, 422),
        },
    )
    async def create_document(
        body: DocumentCreate,
        caller: CallerDep,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=255,
                pattern=r"^[\x21-\x7e]+$",
                description="Retry-safe creation: the same key and body within 24 h return "
                "the original document; a different body gets 409.",
            ),
        ] = None,
    ) -> Response:
        """Store a new document. The response carries its `Location` and `ETag`."""
        _check_content(body.content, caller.settings)
        scope = IdempotencyKey(caller.key.name, idempotency_key) if idempotency_key else None
        doc, replayed = await caller.store.create(body, idempotency=scope)
        headers = {"Location": f"/v1/documents/{doc.id}", "ETag": etag(doc)}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
            log.info("document.idempotent_replay", extra={"document_id": doc.id})
        else:
            log.info("document.created", extra={"document_id": doc.id})
        return _json(doc, 201, headers)

    @router.get(
        "/documents",
        response_model=DocumentPage,
        summary="List documents, newest first",
        responses=_problems(400, 422),
    )
    async def list_documents(
        caller: CallerDep,
        limit: Annotated[int, Query(ge=1, le=100, description="Page size, 1-100.")] = 20,
        # Plain `str` defaulting to "" rather than `str | None`: FastAPI re-inspects an Optional
        # annotation on every request. (`tag` keeps None: "" would break its minLength.)
        cursor: Annotated[
            str, Query(max_length=512, description="`next_cursor` of the previous page.")
        ] = "",
        tag: Annotated[
            str | None, Query(min_length=1, max_length=50, description="Only this tag.")
        ] = None,
    ) -> Response:
        """Walk every document exactly once by following `next_cursor`, even while others are
        created. Cursors are opaque and only valid for the key and `tag` that produced them."""
        tag = tag.strip().lower() if tag is not None else None
        after = decode_cursor(cursor, tag, caller.key) if cursor else None
        items, next_after = await caller.store.page(limit=limit, after=after, tag=tag)
        next_cursor = encode_cursor(next_after, tag, caller.key) if next_after else None
        # A DocumentPage, joined from each document's cached body rather than re-encoded.
        body = b'{"items":[%s],"next_cursor":%s}' % (
            b",".join(doc.json_bytes for doc in items),
            orjson.dumps(next_cursor),
        )
        return Response(body, media_type="application/json")

    @router.get(
        "/documents/{document_id}",
        response_model=Document,
        summary="Read a document",
        responses={
            200: {"description": "The document.", "headers": _ETAG_HEADER},
            304: {"description": "Not modified: `If-None-Match` names the current ETag."},
            **_problems(404),
        },
    )
    async def read_document(
        document_id: str,
        caller: CallerDep,
        # `str = ""`, not `str | None`: as an Optional, this one header cost 7% of a GET more.
        if_none_match: Annotated[str, Header()] = "",
    ) -> Response:
        """Fetch one document. Send its ETag as `If-None-Match` to get `304` when unchanged."""
        doc = await caller.store.get(document_id)
        if if_none_match:
            versions = _etag_versions(if_none_match, weak=True)
            if "*" in versions or doc.version in versions:
                return Response(status_code=304, headers={"ETag": etag(doc)})
        return _json(doc, headers={"ETag": etag(doc)})

    @router.patch(
        "/documents/{document_id}",
        response_model=Document,
        summary="Update a document (JSON merge patch)",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/merge-patch+json": {
                        "schema": {"$ref": "#/components/schemas/DocumentUpdate"}
                    }
                }
            }
        },
        responses={
            200: {"headers": _ETAG_HEADER},
            **_problems(400, 403, 404, 412, 413, 415, 422),
        },
    )
    async def update_document(
        document_id: str,
        body: DocumentUpdate,
        caller: CallerDep,
        if_match: Annotated[
            str | None,
            Header(description="Only apply if the document still has this ETag."),
        ] = None,
    ) -> Response:
        """Change some fields. `tags` is replaced whole; `metadata` merges key by key and a
        `null` value removes a key. With `If-Match`, a stale ETag gets `412` and changes nothing."""
        _check_content(body.content, caller.settings)
        doc = await caller.store.update(document_id, body, if_version=_if_match_version(if_match))
        log.info("document.updated", extra={"document_id": doc.id, "version": doc.version})
        return _json(doc, headers={"ETag": etag(doc)})

    @router.delete(
        "/documents/{document_id}",
        status_code=204,
        summary="Delete a document",
        responses={204: {"description": "Deleted."}, **_problems(403, 404, 412)},
    )
    async def delete_document(
        document_id: str,
        caller: CallerDep,
        if_match: Annotated[
            str | None,
            Header(description="Only delete if the document still has this ETag."),
        ] = None,
    ) -> Response:
        """Delete for good; later reads get `404`."""
        await caller.store.delete(document_id, if_version=_if_match_version(if_match))
        log.info("document.deleted", extra={"document_id": document_id})
        return Response(status_code=204)

    return router


def build_health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health", summary="Liveness")
    async def read_health() -> dict[str, str]:
        """Answers as long as the process serves HTTP; never touches the store."""
        return {"status": "ok"}

    @router.get("/health/ready", summary="Readiness", responses=_problems(503))
    async def read_readiness(request: Request, store: StoreDep) -> dict[str, str | int]:
        """`200` when the store can be read and written and the rate-limit store answers right
        now, `503` otherwise."""
        await store.check()
        await ratelimit.check(request.app.state.rate_storage)
        return {
            "status": "ready",
            "backend": store.backend,
            "documents": await store.count(),
        }

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def read_metrics(request: Request, store: StoreDep) -> Response:
        """Request counts and latencies by route, store timings, documents, process stats."""
        metrics: Metrics = request.app.state.metrics
        count = await _count_or_none(store)
        if count is not None:
            metrics.documents.set(count)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router


# --- the one error-to-HTTP map ---------------------------------------------------------------

_STATUS_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_SLUGS = {
    404: "not-found",
    405: "method-not-allowed",
    408: "body-timeout",
    413: "body-too-large",
}


def _title(status: int) -> str:
    return _STATUS_TITLES.get(status, "Error")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail if exc.status_code in (408, 413) else None
    if exc.status_code == 404:
        detail = f"Nothing at {clip(request.url.path)}."
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {clip(request.url.path)}."
        headers["Allow"] = ", ".join(_allowed_methods(request))
    slug = _SLUGS.get(exc.status_code, "http-error")
    return problem_response(
        exc.status_code,
        _title(exc.status_code),
        detail or str(exc.detail),
        slug=slug,
        headers=headers,
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method any route serves at this path (RFC 9110: Allow lists them all, where
    Starlette names only the first route's), HEAD wherever GET is."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return problem_response(
            400,
            "Bad Request",
            "The body is not valid JSON.",
            slug="malformed-json",
            errors=errors,
        )
    return problem_response(
        422,
        _title(422),
        "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)[:1000],
        slug="validation-error",
        errors=errors,
    )


async def _domain_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, AuthFailed):
        request.app.state.metrics.auth_failures.inc()
        client = request.client.host if request.client else None
        log.warning("auth.failed", extra={"reason": exc.reason, "client": client})
        detail = "Send a valid key in the X-API-Key header."
        return problem_response(
            401,
            _title(401),
            detail,
            slug="unauthorized",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    if isinstance(exc, Forbidden):
        log.warning("auth.forbidden", extra={"api_key": request.state.api_key_name})
        detail = f"This key may only read ({', '.join(sorted(READ_METHODS))})."
        return problem_response(403, _title(403), detail, slug="forbidden")
    if isinstance(exc, RateLimited):
        request.app.state.metrics.rate_limited.inc()
        log.warning(
            "rate_limit.rejected",
            extra={"api_key": request.state.api_key_name, "retry_after": exc.retry_after},
        )
        return problem_response(
            429,
            _title(429),
            f"Rate limit of {request.app.state.settings.rate_limit} for this key reached.",
            slug="rate-limited",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, InvalidCursor):
        return problem_response(400, _title(400), f"Invalid cursor: {exc}.", slug="invalid-cursor")
    if isinstance(exc, UnsupportedMediaType):
        detail = f"Send JSON (Content-Type: application/json), not {exc}."
        return problem_response(415, _title(415), detail, slug="unsupported-media-type")
    if isinstance(exc, DocumentNotFound):
        detail = f"No document with id {clip(exc.doc_id, 64)!r}."
        return problem_response(404, _title(404), detail, slug="not-found")
    if isinstance(exc, PreconditionFailed):
        log.info("document.precondition_failed", extra={"document_id": exc.doc_id})
        return problem_response(
            412,
            _title(412),
            "If-Match does not match the document's current ETag; fetch it again.",
            slug="precondition-failed",
            headers={"ETag": f'"{exc.current_version}"'},
        )
    if isinstance(exc, IdempotencyConflict):
        return problem_response(409, _title(409), str(exc), slug="idempotency-conflict")
    if isinstance(exc, DocumentInvalid):
        errors = [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]
        return problem_response(422, _title(422), str(exc), slug="validation-error", errors=errors)
    if isinstance(exc, LimiterUnavailable):
        log.error("rate_limit.unavailable", extra={"error": str(exc.__cause__ or exc)})
        return problem_response(
            503,
            _title(503),
            "The rate-limit store is unavailable; try again shortly.",
            slug="rate-limit-store-unavailable",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, StoreUnavailable):
        log.error("store.unavailable", exc_info=exc)
        return problem_response(
            503,
            _title(503),
            "The document store is unavailable; try again shortly.",
            slug="store-unavailable",
            headers={"Retry-After": "5"},
        )
    log.error("store.error", exc_info=exc)
    return problem_response(
        500,
        _title(500),
        "The server failed to handle this request.",
        slug="internal-error",
    )


def _add_error_map(app: FastAPI) -> None:
    # Starlette types every handler as taking the base Exception; each gets only its own class.
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    for exc_class in (
        AuthFailed,
        Forbidden,
        RateLimited,
        InvalidCursor,
        UnsupportedMediaType,
        StoreError,
        LimiterUnavailable,
    ):
        app.add_exception_handler(exc_class, _domain_error)


# --- app factory ------------------------------------------------------------------------------

DESCRIPTION = """\
Create, read, list, update and delete JSON documents over a durable store.

**Quick start:** `make run`, then send the printed key as `X-API-Key`
(use **Authorize** above), e.g. `POST /v1/documents` with `{"title": "Hello", "content": "..."}`.

Every error is an RFC 9457 `application/problem+json` document carrying the `request_id`
that is also in the `X-Request-ID` response header.
"""


TAGS = [
    {"name": "documents", "description": "Create, read, list, update and delete documents."},
    {"name": "health", "description": "Liveness, readiness and metrics; no key needed."},
]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    started = time.perf_counter()
    try:
        store = MeteredStore(await open_store(settings), app.state.metrics)
    except StoreError as exc:
        log.critical("store.open_failed", extra={"error": str(exc)})
        raise
    except Exception:
        log.critical("service.start_failed", exc_info=True)
        raise
    app.state.store = store
    app.state.rate_storage = open_storage(settings.rate_limit_storage_uri)
    if app.state.generated_key:
        sys.stderr.write(
            "\nNo API_KEYS set: generated a key for this run only.\n"
            f"  export KEY={app.state.generated_key}\n"
            '  curl -H "X-API-Key: $KEY" http://HOST:PORT/v1/documents\n'
            "Set API_KEYS (e.g. in .env) to choose your own.\n\n"
        )
    log.info(
        "service.started",
        extra={
            "version": VERSION,
            "backend": store.backend,
            "data_dir": str(settings.data_dir) if store.backend == "tinydb" else None,
            "documents": await _count_or_none(store),
            "load_seconds": round(time.perf_counter() - started, 3),
            "api_keys": [k.name for k in app.state.api_keys],
        },
    )
    try:
        yield
    finally:
        await store.close()
        app.state.metrics.close()
        log.info("service.stopped", extra={"backend": store.backend})


async def open_store(settings: Settings) -> DocumentStore:
    """MongoDB when DATABASE_URL is set, else the embedded TinyDB store."""
    if settings.database_url:
        return await MongoStore.open(settings.database_url, timeout_ms=settings.mongo_timeout_ms)
    return TinyDBStore.open(settings.data_dir)


async def _count_or_none(store: DocumentStore) -> int | None:
    try:
        return await store.count()
    except StoreUnavailable:
        return None  # MongoDB down at startup: serve 503s and recover when it returns


CORS_REQUEST_HEADERS = [
    "X-API-Key",
    "Content-Type",
    "If-Match",
    "If-None-Match",
    "Idempotency-Key",
    "X-Request-ID",
]
CORS_RESPONSE_HEADERS = [
    "ETag",
    "Location",
    "Retry-After",
    "X-Request-ID",
    "Idempotent-Replayed",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A fresh, independent app; state that needs I/O is built in the lifespan."""
    settings = settings if settings is not None else Settings()
    # Swagger UI and ReDoc are served from fastapi-offline's bundled files: /docs works offline.
    app = FastAPIOffline(
        title="Documents API",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=TAGS,
        static_url="/docs-static",
        # Observability is Prometheus and JSON logs; FastAPI's OpenTelemetry bridge would
        # otherwise look up the global OTel providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # `/v1/documents/` is a 404, not a redirect built from the client's Host header.
        redirect_slashes=False,
        # The routers' routes, flat and API first. include_router() would keep each router as
        # a nested branch that FastAPI re-checks for changes on every request: 16% of a GET.
        routes=[*build_router().routes, *build_health_router().routes],
    )
    app.state.settings = settings
    app.state.api_keys = configured_keys(settings)
    app.state.generated_key = None
    if not app.state.api_keys:
        # Never run open: with no configured key, make one and show it once on the console.
        app.state.generated_key = secrets.token_urlsafe(24)
        app.state.api_keys = [ApiKey("generated", digest_key(app.state.generated_key))]
    app.state.rate_limits = parse_many(settings.rate_limit)
    # Memory only, so built here: the middleware below needs it before the lifespan runs.
    app.state.metrics = Metrics(multiprocess=settings.workers > 1)
    _add_error_map(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Added innermost first: a request meets RequestContext (ids, logs, metrics), then CORS
    # (only when CORS_ORIGINS is set), then BodyLimit, then HeadAsGet.
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout=settings.body_timeout_seconds,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_RESPONSE_HEADERS,
        )
    app.add_middleware(
        RequestContextMiddleware,
        slow_request_ms=settings.slow_request_ms,
        observer=app.state.metrics,
    )
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus what it cannot infer: the `ApiKey` scheme on each operation that
    depends on `authorize`, problem responses as `application/problem+json` only, and
    `X-Request-ID` on every response."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        schema.setdefault("components", {})["securitySchemes"] = {"ApiKey": API_KEY_SCHEME}
        for route in app.routes:
            if isinstance(route, APIRoute) and any(
                dependency.call is authorize for dependency in route.dependant.dependencies
            ):
                for method in route.methods or ():
                    schema["paths"][route.path_format][method.lower()]["security"] = [
                        {"ApiKey": []}
                    ]
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                if "application/problem+json" in content:
                    typed = content.pop("application/json", {})
                    content["application/problem+json"].update(typed)
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = {
                    "description": "Echo of a valid incoming X-Request-ID, else a new id.",
                    "schema": {"type": "string"},
                }
                if status in ("429", "503"):
                    headers["Retry-After"] = {
                        "description": "Seconds to wait before retrying.",
                        "schema": {"type": "integer"},
                    }
        app.openapi_schema = schema
    return app.openapi_schema


def __getattr__(name: str) -> FastAPI:
    # `uvicorn main:app` (and each of several workers) builds the app on first access, not at
    # import, with logging set up as `python main.py` does.
    if name == "app":
        settings = Settings()
        configure_logging(settings.log_level, settings.log_format)
        return create_app(settings)
    raise AttributeError(name)


# --- command line ----------------------------------------------------------------------------

# In the repository the samples sit in data/; the image keeps them out of the data volume.
SAMPLES = next(
    (
        p
        for p in (Path(__file__).parent / d / "sample_documents.json" for d in ("data", "samples"))
        if p.exists()
    ),
    Path(__file__).parent / "data" / "sample_documents.json",
)


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
            sys.stderr.write(f"configuration error: {variable}: {error['msg']}\n")
        raise SystemExit(2) from None


async def _seed(store: DocumentStore, path: Path) -> int:
    """Sample documents go through the API's own validation; fixed ids make it idempotent."""
    added = 0
    for number, raw in enumerate(orjson.loads(await anyio.Path(path).read_bytes()), 1):
        fields = {k: v for k, v in raw.items() if k not in ("id", "created_at")}
        try:
            created_at = datetime.fromisoformat(raw["created_at"])
            doc = new_document(DocumentCreate.model_validate(fields), raw["id"], created_at)
        except (ValidationError, KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"sample {number} in {path} is not valid: {exc}") from None
        added += await store.import_document(doc)
    return added


def _document_from(line: bytes, number: int) -> Document:
    try:
        return Document.model_validate_json(line)
    except ValidationError as exc:
        raise SystemExit(f"line {number} is not a valid document: {exc}") from None


async def _run_task(settings: Settings, task: str, file: Path | None) -> None:
    store = await open_store(settings)
    try:
        if task == "seed":
            added = await _seed(store, file or SAMPLES)
            log.info("seed.done", extra={"added": added, "documents": await store.count()})
        elif task == "export":
            async for doc in store.export_documents():
                sys.stdout.write(doc.model_dump_json() + "\n")
        elif task == "import" and file is not None:
            added = seen = 0
            async with await anyio.open_file(file, "rb") as fh:
                async for line in fh:
                    added += await store.import_document(_document_from(line, seen + 1))
                    seen += 1
                    if seen % 10_000 == 0:
                        sys.stderr.write(f"imported {seen} lines\n")
            log.info("import.done", extra={"read": seen, "added": added})
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The documents service.")
    parser.add_argument(
        "task",
        nargs="?",
        default="serve",
        choices=["serve", "seed", "export", "import"],
    )
    parser.add_argument("file", nargs="?", type=Path, help="seed or import: a file to read")
    args = parser.parse_args(argv)
    if args.task == "import" and args.file is None:
        parser.error("import needs a FILE of JSON lines")
    settings = _load_settings()
    # Data tasks keep stdout for their output (export); their logs go to stderr.
    configure_logging(
        settings.log_level,
        settings.log_format,
        stream=sys.stderr if args.task != "serve" else sys.stdout,
    )
    try:
        if args.task != "serve":
            asyncio.run(_run_task(settings, args.task, args.file))
            return 0
    except StoreError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if settings.workers > 1:
        # Each worker writes its metrics to files here; /metrics sums them (prometheus-client's
        # multiprocess mode reads this variable when the workers import it).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="documents-metrics-")
    uvicorn.run(
        # Several workers each import the app by name; one worker gets the instance directly.
        "main:app" if settings.workers > 1 else create_app(settings),
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        **SERVER_OPTIONS,
        # Behind a reverse proxy: trust X-Forwarded-For/-Proto from these addresses only.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        root_path=settings.root_path,
        timeout_graceful_shutdown=8,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
