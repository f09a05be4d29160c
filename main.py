"""The documents service: the app factory, the key dependency, routes, the one error map and the
command line.

`python main.py` serves it; `python main.py seed|export|import FILE` manage its data.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Ctrl-C while the modules below load (about a second) stops the start as it stops any
    # program, without a traceback of the import it cut; main() puts Python's handler back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # A reload (SIGHUP) while it starts changes nothing, as once it serves (server.py); a task
    # gets the default back in main().
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import json
import logging
import os
import secrets
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, TypeVar

import anyio
import orjson
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match, Mount, Route

import openapi
import ratelimit
from admission import AdmissionMiddleware, RefusalTally
from bodies import StrictJSONRoute, loads_strict, parse_strict
from conditional import etag, names, write_version
from config import ApiKey, Settings, configured_keys, digest_key
from cursors import decode_cursor, encode_cursor
from logging_config import clip, configure_logging
from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from metrics import SCRAPE_PATH, MeteredStore, Metrics, multiprocess_directory
from middleware import BodyLimitMiddleware, HeadAsGetMiddleware, RequestContextMiddleware
from models import (
    Document,
    DocumentCreate,
    DocumentPage,
    DocumentQuery,
    DocumentUpdate,
    as_stored,
    exported_time,
)
from problems import (
    DOCUMENT_CONFLICT,
    IDEMPOTENCY_CONFLICT,
    INTERNAL,
    LIMITER_UNAVAILABLE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    RETRY_AFTER_SECONDS,
    STORE_UNAVAILABLE,
    VALIDATION,
    HTTPProblem,
    MalformedBody,
    ProblemType,
    Unauthorized,
    for_status,
)
from ratelimit import LimiterUnavailable, open_storage
from server import SERVER_OPTIONS, serve, stop_with_supervisor
from sqlite_files import DATABASE_FILE, check_target, is_own, sync_directory
from sqlite_store import SQLiteStore
from storage import (
    PAGE_MAX_BYTES,
    DocumentInvalid,
    DocumentNotFound,
    DocumentStore,
    IdempotencyConflict,
    IdempotencyKey,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    stale,
)

VERSION = "1.0.0"
SWITCH_INTERVAL_S = 0.001  # see lifespan
log = logging.getLogger("documents.api")


# --- the key dependency -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request that has paid for itself, and what its handler works with."""

    key: ApiKey
    store: DocumentStore
    settings: Settings


async def authorize(request: Request) -> Caller:
    """The key AdmissionMiddleware accepted from the request's head and charged to its budget,
    before any body byte was read (FastAPI parses a body before it solves dependencies, too late
    to refuse a stranger cheaply), and the store the handler works with. It is each /v1 route's
    only dependency on purpose: FastAPI solves every `Depends` in a pass of its own, and a
    security class adds per-request scope bookkeeping; `openapi.py` declares the `ApiKey` scheme
    on these routes instead. A route outside what the middleware guards gets 401: a surprise
    denies."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is None:
        raise Unauthorized(Unauthorized.kind.description, headers={"WWW-Authenticate": "ApiKey"})
    state = request.app.state
    return Caller(key, state.store, state.settings)


CallerDep = Annotated[Caller, Depends(authorize)]


async def get_store(request: Request) -> DocumentStore:
    store: DocumentStore = request.app.state.store
    return store


StoreDep = Annotated[DocumentStore, Depends(get_store)]


# --- HTTP details ------------------------------------------------------------------------------


def _document_response(
    doc: Document, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    # The store hands out validated models: serialise once, skipping response_model's re-check.
    return Response(doc.json_bytes, status, headers, media_type="application/json")


def _check_content(content: str | None, settings: Settings) -> None:
    if content is not None and len(content) > settings.max_content_chars:
        # What the document states (content's maxLength): a 422, as any other field's bound.
        message = f"content should have at most {settings.max_content_chars} characters"
        raise RequestValidationError(
            [{"loc": ("body", "content"), "msg": message, "type": "string_too_long"}]
        )


async def _write_version(store: DocumentStore, doc_id: str, request: Request) -> int | None:
    # Each header's lines form one list.
    headers = request.headers
    return await write_version(
        store, doc_id, headers.getlist("if-match"), headers.getlist("if-none-match")
    )


# --- routes -----------------------------------------------------------------------------------


async def create_document(
    body: DocumentCreate,
    caller: CallerDep,
    request: Request,
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
    if len(keys := request.headers.getlist("idempotency-key")) > 1:  # which would it name?
        message = "send one Idempotency-Key"
        error = {"loc": ("header", "idempotency-key"), "msg": message, "input": keys}
        raise RequestValidationError([{**error, "type": "value_error"}])
    scope = IdempotencyKey(caller.key.name, idempotency_key) if idempotency_key else None
    doc, replayed = await caller.store.create(body, idempotency=scope)
    # The path as the client reached it: behind ROOT_PATH, Location stays under the prefix.
    location = f"{request.scope.get('root_path', '')}/v1/documents/{doc.id}"
    headers = {"Location": location, "ETag": etag(doc)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
        log.info("document.idempotent_replay", extra={"document_id": doc.id})
    else:
        log.info("document.created", extra={"document_id": doc.id})
    return _document_response(doc, 201, headers)


async def list_documents(request: Request, caller: CallerDep) -> Response:
    """Find documents: every filter given must hold. Follow `next_cursor` to walk every match
    exactly once, in order, even while others are created; a cursor is only valid with the
    filters and sort that produced it. A page holds `limit` documents unless it is the last,
    whose `next_cursor` is `null`, or the next document would take it past 1 MiB. Unknown
    parameters are refused.

    `metadata.KEY=VALUE` (repeatable over keys) keeps documents whose metadata KEY equals
    VALUE as a string, or as the JSON number or boolean VALUE spells: `metadata.pages=12`
    finds 12 and "12", `metadata.draft=true` finds true and "true"."""
    query = _document_query(request)
    secret = await caller.store.cursor_secret()
    after = decode_cursor(query.cursor, query.binding, secret) if query.cursor else None
    items, next_after = await caller.store.page(query, limit=query.limit, after=after)
    # Large documents end a page early: no response is larger than about PAGE_MAX_BYTES, so
    # none is one long encode, nor megabytes held for a client that reads slowly or not at all.
    size = 0
    for kept, doc in enumerate(items):
        size += len(doc.json_bytes)
        if size > PAGE_MAX_BYTES and kept:
            items, next_after = items[:kept], query.position(items[kept - 1])
            break
    next_cursor = encode_cursor(next_after, query.binding, secret) if next_after else None
    # A DocumentPage, joined from each document's cached body rather than re-encoded.
    body = b'{"items":[%s],"next_cursor":%s}' % (
        b",".join(doc.json_bytes for doc in items),
        orjson.dumps(next_cursor),
    )
    return Response(body, media_type="application/json")


def _document_query(request: Request) -> DocumentQuery:
    """The query string, validated by the model the OpenAPI document describes it with, and
    refused as FastAPI refuses any parameter."""
    try:
        return DocumentQuery.from_pairs(request.query_params.multi_items())
    except ValidationError as exc:
        errors = [{**error, "loc": ("query", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


async def read_document(document_id: str, request: Request, caller: CallerDep) -> Response:
    """Fetch one document. Send its ETag as `If-None-Match` to get `304` when unchanged; an
    `If-Match` that does not name the current ETag (or `*`) gets `412`."""
    headers = request.headers  # each header's lines form one list
    if_match, if_none_match = (
        ", ".join(headers.getlist("if-match")),
        ", ".join(headers.getlist("if-none-match")),
    )
    doc = await caller.store.get(document_id)
    if if_match and not names(if_match, doc.version, weak=False):
        raise stale(doc.id, doc.version)  # RFC 9110, 13.2.2: before If-None-Match
    if if_none_match and names(if_none_match, doc.version, weak=True):
        return Response(status_code=304, headers={"ETag": etag(doc)})
    return _document_response(doc, headers={"ETag": etag(doc)})


async def update_document(
    document_id: str, body: DocumentUpdate, request: Request, caller: CallerDep
) -> Response:
    """Change some fields. `tags` is replaced whole; `metadata` merges key by key and a
    `null` value removes a key. With `If-Match`, a stale ETag gets `412` and changes nothing;
    so does `If-None-Match` naming the current one (or `*`)."""
    _check_content(body.content, caller.settings)
    version = await _write_version(caller.store, document_id, request)
    doc = await caller.store.update(document_id, body, if_version=version)
    log.info("document.updated", extra={"document_id": doc.id, "version": doc.version})
    return _document_response(doc, headers={"ETag": etag(doc)})


async def delete_document(document_id: str, request: Request, caller: CallerDep) -> Response:
    """Delete for good; later reads get `404`. `If-Match` and `If-None-Match` as for PATCH."""
    version = await _write_version(caller.store, document_id, request)
    await caller.store.delete(document_id, if_version=version)
    log.info("document.deleted", extra={"document_id": document_id})
    return Response(status_code=204)


async def read_health() -> dict[str, str]:
    """Answers as long as the process serves HTTP; never touches the store."""
    return {"status": "ok"}


async def read_readiness(request: Request, store: StoreDep) -> dict[str, str | int]:
    """`200` when the store can be read and written and the rate-limit store answers right
    now, `503` otherwise."""
    state = request.app.state
    # Probes need no key and spend no budget: those that arrive while one checks share its
    # answer, so a flood of them costs the store one check at a time, not one each.
    if state.readiness is None or state.readiness.done():
        state.readiness = asyncio.ensure_future(_readiness(store, state.rate_storage))
    answer: dict[str, str | int] = await asyncio.shield(state.readiness)
    return answer


async def _readiness(store: DocumentStore, rate_storage: Storage) -> dict[str, str | int]:
    await store.check()
    await ratelimit.check(rate_storage)
    return {"status": "ready", "backend": store.backend, "documents": await store.count()}


async def read_metrics(request: Request, store: StoreDep) -> Response:
    """Request counts and latencies by route, store timings and failures, documents, the data
    directory's files and free space (embedded store), process stats."""
    metrics: Metrics = request.app.state.metrics
    count = await _count_or_none(store)
    if count is not None:
        metrics.documents.set(count)
    # Rendering stats the data directory's files: off the event loop, like any disk access.
    body = await anyio.to_thread.run_sync(metrics.render)
    return Response(body, media_type=METRICS_CONTENT_TYPE)


def _add_routes(app: FastAPI) -> None:
    """Every route, added to the app's own router: flat, API routes first. Operation ids are
    the handlers' names, which is what generated clients call them."""
    document_route = functools.partial(
        app.router.add_api_route, tags=["documents"], route_class_override=StrictJSONRoute
    )
    document_route(
        "/v1/documents",
        create_document,
        methods=["POST"],
        status_code=201,
        response_model=Document,
        summary="Create a document",
        responses=openapi.created_responses(),
    )
    document_route(
        "/v1/documents",
        list_documents,
        methods=["GET"],
        response_model=DocumentPage,
        summary="Find and list documents",
        responses=openapi.problems(400, 415, 422),
        openapi_extra={"parameters": openapi.query_parameters(DocumentQuery)},
    )
    document_route(
        "/v1/documents/{document_id}",
        read_document,
        methods=["GET"],
        response_model=Document,
        summary="Read a document",
        responses=openapi.read_responses(),
        openapi_extra=openapi.read_conditions(),
    )
    document_route(
        "/v1/documents/{document_id}",
        update_document,
        methods=["PATCH"],
        response_model=Document,
        summary="Update a document (JSON merge patch)",
        openapi_extra={**openapi.MERGE_PATCH_BODY, **openapi.write_conditions("apply")},
        responses=openapi.update_responses(),
    )
    document_route(
        "/v1/documents/{document_id}",
        delete_document,
        methods=["DELETE"],
        status_code=204,
        summary="Delete a document",
        responses={204: {"description": "Deleted."}, **openapi.problems(403, 404, 412, 415)},
        openapi_extra=openapi.write_conditions("delete"),
    )
    health_route = functools.partial(app.router.add_api_route, tags=["health"], methods=["GET"])
    health_route("/health", read_health, summary="Liveness")
    health_route(
        "/health/ready",
        read_readiness,
        summary="Readiness",
        responses=openapi.problems(503, v1=False),
    )
    health_route(
        SCRAPE_PATH,
        read_metrics,
        summary="Prometheus metrics",
        response_class=Response,
        responses=openapi.METRICS_RESPONSE,
    )
    # A request meets the routes in order, each passed costing a match: FastAPI put its docs
    # routes first, so the API's go ahead of them (a sort keeps each group's own order).
    app.router.routes.sort(key=lambda route: not getattr(route, "path", "").startswith("/v1"))


# --- the one error-to-HTTP map ----------------------------------------------------------------

# Store and rate-limit errors, by class: the first class an error is an instance of decides.
DOMAIN_PROBLEMS: dict[type[Exception], ProblemType] = {
    DocumentNotFound: NOT_FOUND,
    PreconditionFailed: PRECONDITION_FAILED,
    IdempotencyConflict: IDEMPOTENCY_CONFLICT,
    DocumentInvalid: DOCUMENT_CONFLICT,
    StoreUnavailable: STORE_UNAVAILABLE,
    LimiterUnavailable: LIMITER_UNAVAILABLE,
}


async def _http_problem(request: Request, exc: HTTPException) -> Response:
    """HTTP-layer errors: ours carry their problem type; Starlette's own 404 and 405 get one."""
    headers = dict(exc.headers or {})
    if isinstance(exc, HTTPProblem):
        return exc.kind.response(str(exc.detail), headers=headers)
    path = clip(request.url.path)
    if exc.status_code == 404:
        return NOT_FOUND.response(f"Nothing at {path}.", headers=headers)
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
        return METHOD_NOT_ALLOWED.response(
            f"{request.method} is not allowed on {path}.", headers=headers
        )
    return for_status(exc.status_code).response(str(exc.detail), headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method any route serves at this path (RFC 9110: Allow lists them all, where
    Starlette names only the first route's), HEAD wherever GET is."""
    methods: set[str] = set()
    # As the app's router met it: a mount (the docs' static files) has since grown root_path.
    top = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    scope = {**request.scope, "root_path": top}
    for route in request.app.router.routes:
        if route.matches(scope)[0] is Match.NONE:
            continue
        if isinstance(route, Route):
            methods |= route.methods or set()
        elif isinstance(route, Mount):  # the docs' static files, which serve GET
            methods.add("GET")
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


# A 422 lists at most this many errors: the response stays small whatever the body held.
MAX_REPORTED_ERRORS = 20


async def _validation_problem(request: Request, exc: RequestValidationError) -> Response:
    found = exc.errors()
    errors = [
        {
            "loc": [p if isinstance(p, int) else clip(str(p), 64) for p in e["loc"]],
            "msg": e["msg"],
            "type": e["type"],
        }
        for e in found[:MAX_REPORTED_ERRORS]
    ]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    if len(found) > MAX_REPORTED_ERRORS:
        detail += f"; and {len(found) - MAX_REPORTED_ERRORS} more"
    return VALIDATION.response(clip(detail, 1000), errors=errors)


async def _domain_problem(request: Request, exc: Exception) -> Response:
    """Store and rate-limit errors through DOMAIN_PROBLEMS; anything else there is a bug."""
    kind = next((k for cls, k in DOMAIN_PROBLEMS.items() if isinstance(exc, cls)), INTERNAL)
    headers: dict[str, str] = {}
    errors = None
    if kind.status == 503:
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    if isinstance(exc, PreconditionFailed):
        headers["ETag"] = f'"{exc.current_version}"'
    if isinstance(exc, DocumentInvalid):
        errors = [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]
    if kind is INTERNAL:
        log.error("store.error", exc_info=exc)
        return kind.response("The server failed to handle this request.")
    return kind.response(clip(str(exc)), headers=headers, errors=errors)


def _add_error_map(app: FastAPI) -> None:
    # Starlette types every handler as taking the base Exception; each gets only its own class.
    app.add_exception_handler(HTTPException, _http_problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_problem)  # type: ignore[arg-type]
    app.add_exception_handler(StoreError, _domain_problem)
    app.add_exception_handler(LimiterUnavailable, _domain_problem)


# --- app factory ------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    started = time.perf_counter()
    # A thread finding a long text's words runs C calls back to back; every other thread (the
    # event loop, the SQLite writer between its statements) waits up to this interval for the
    # interpreter lock at each hand-over, and a write makes several: 1 ms, not the default 5.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        store = MeteredStore(await open_store(settings), app.state.metrics)
    except StoreError as exc:
        log.critical("store.open_failed", extra={"error": str(exc)})
        raise
    except Exception:
        log.critical("service.start_failed", exc_info=True)
        raise
    app.state.store = store
    app.state.readiness = None  # the probe in progress (read_readiness)
    if app.state.generated_key:
        _announce_generated_key(app.state.generated_key, settings)
    log.info(
        "service.started",
        extra={
            "version": VERSION,
            "backend": store.backend,
            "data_dir": str(settings.data_dir) if store.backend == "sqlite" else None,
            "documents": await _count_or_none(store),
            "load_seconds": round(time.perf_counter() - started, 3),
            "api_keys": [k.name for k in app.state.api_keys],
        },
    )
    # What the start built (the framework, its schemas, the store) lives as long as the service:
    # frozen out of the cyclic collector's way, a full collection walks only what requests
    # made since, and no longer stalls a request for milliseconds (POST p99 in performance.md).
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        await store.close()
        app.state.refusals.close()
        app.state.metrics.close()
        log.info("service.stopped", extra={"backend": store.backend})


def _key_limits(settings: Settings) -> list[RateLimitItem]:
    """RATE_LIMIT for each key. Counted in memory, each of several workers allows its share,
    so that together they never allow more than the configured rate: a worker's counters are
    its own, and sharing them would cost every request a write that every worker waits on."""
    limits = parse_many(settings.rate_limit)
    if settings.workers == 1 or settings.rate_limit_storage_uri != "memory://":
        return limits
    return [
        type(item)(item.amount // settings.workers, item.multiples, item.namespace)
        for item in limits
    ]


async def open_store(settings: Settings, *, serving: bool = True) -> DocumentStore:
    """MongoDB when DATABASE_URL is set, else the embedded SQLite store."""
    if settings.database_url:
        # Imported here: pymongo is only loaded by a service that uses it.
        from mongo_store import MongoStore

        return await MongoStore.open(
            settings.database_url, timeout_ms=settings.mongo_timeout_ms, serving=serving
        )
    # Opened in a thread: a first start may migrate or import the previous version's file.
    # Only a service migrates: a task may run beside the previous version's service.
    open_sqlite = functools.partial(SQLiteStore.open, settings.data_dir, migrate=serving)
    if not serving:  # a task's may wait for another process's start: Ctrl-C leaves it
        return await _unheld(open_sqlite)
    return await anyio.to_thread.run_sync(open_sqlite)


async def _count_or_none(store: DocumentStore) -> int | None:
    """The count, or None when the store cannot say within a second (MongoDB down)."""
    with anyio.move_on_after(1):
        try:
            return await store.count()
        except StoreUnavailable:
            pass
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    """A fresh, independent app; state that needs I/O is built in the lifespan."""
    settings = settings if settings is not None else Settings()
    # Swagger UI and ReDoc are served from fastapi-offline's bundled files: /docs works offline.
    app = FastAPIOffline(
        title="Documents API",
        version=VERSION,
        description=openapi.DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=openapi.TAGS,
        static_url="/docs-static",
        # Observability is Prometheus and JSON logs; FastAPI's OpenTelemetry bridge would
        # otherwise look up the global OTel providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # `/v1/documents/` is a 404, not a redirect built from the client's Host header.
        redirect_slashes=False,
        # Operation ids are the handlers' names: what generated clients call the operations.
        generate_unique_id_function=lambda route: route.name,
    )
    _add_routes(app)
    app.state.settings = settings
    app.state.api_keys = configured_keys(settings)
    app.state.generated_key = None
    if not app.state.api_keys:
        # Never run open: with no configured key, make one and show it once on the console.
        app.state.generated_key = secrets.token_urlsafe(24)
        app.state.api_keys = [ApiKey("generated", digest_key(app.state.generated_key))]
    # Built here, without I/O (a Redis client connects on first use): the middleware below
    # needs them, and Starlette builds it before the lifespan runs.
    app.state.rate_storage = open_storage(settings.rate_limit_storage_uri)
    app.state.refusals = RefusalTally()
    app.state.metrics = Metrics(
        multiprocess=settings.workers > 1,
        data_dir=None if settings.database_url else settings.data_dir,
    )
    _add_error_map(app)
    app.openapi = lambda: openapi.schema(app)  # type: ignore[method-assign]
    # Added innermost first: a request meets RequestContext (ids, logs, metrics), then
    # Admission (key, budget: refusals leave the body unread; CORS, when CORS_ORIGINS is set),
    # BodyLimit, HeadAsGet.
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_buffered_bytes=settings.max_buffered_body_bytes,
        timeout=settings.body_timeout_seconds,
    )
    app.add_middleware(
        AdmissionMiddleware,
        keys=app.state.api_keys,
        key_limits=_key_limits(settings),
        key_storage=app.state.rate_storage,
        keyless_limits=parse_many(settings.keyless_rate_limit),
        metrics=app.state.metrics,
        tally=app.state.refusals,
        cors_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
    )
    app.add_middleware(
        RequestContextMiddleware,
        slow_request_ms=settings.slow_request_ms,
        observer=app.state.metrics,
    )
    return app


def _announce_generated_key(key: str, settings: Settings) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    sys.stderr.write(
        "\nNo API_KEYS set: generated a key for this run only.\n"
        f"  export KEY={key}\n"
        f'  curl -H "X-API-Key: $KEY" http://{host}:{settings.port}{settings.root_path}'
        "/v1/documents\n"
        "Set API_KEYS (e.g. in .env) to choose your own.\n\n"
    )


def serve_app() -> FastAPI:
    """uvicorn's app factory for each of several workers: settings (already checked by the
    parent) and logging as `python main.py` sets them up."""
    stop_with_supervisor()
    settings = load_settings()
    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    return create_app(settings)


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


def load_settings() -> Settings:
    """Settings, or one `configuration error` line per bad variable and exit status 2."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            if error["type"] == "default_factory_not_called":
                continue  # a default derived from a bad variable: that variable's line says it
            message = error["msg"].removeprefix("Value error, ")
            # Checks across settings name their variable in the message itself.
            where = f"{str(error['loc'][0]).upper()}: " if error["loc"] else ""
            sys.stderr.write(f"configuration error: {where}{message}\n")
        raise SystemExit(2) from None


def _error_line(message: str) -> None:
    """`error: MESSAGE` as one line: what is not printable (a line break in a file name) is
    written as Python escapes it."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    if sys.stderr is not None:  # closed (2>&-): the exit status alone says it
        with contextlib.suppress(OSError):  # a full disk, a reader gone
            sys.stderr.write(f"error: {shown}\n")


class TaskRefused(Exception):
    """A data task's input cannot be used: one line says where and why, exit status 1."""


# Samples are read whole: more than this is data, which import takes a line at a time.
SEED_MAX_BYTES = 1 << 20


async def _read_samples(path: Path, content_max: int) -> list[tuple[str, Document]]:
    """A seed file's samples, each with where it was read: read whole and checked before the
    store opens (a file that cannot be read or is refused leaves DATA_DIR as it was), as
    strictly as a body (a repeated key had kept its last value). Each is version 1 of itself
    unless it says otherwise, and taken as import takes a document (every bound, normal forms)."""
    raw = await _unheld(functools.partial(_read_head, path, SEED_MAX_BYTES + 1))
    if len(raw) > SEED_MAX_BYTES:
        raise TaskRefused(
            f"{path}: larger than {SEED_MAX_BYTES >> 20} MiB: seed takes sample documents; "
            "import takes data of any size, as JSON lines"
        )
    try:
        samples = loads_strict(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:
        raise TaskRefused(f"{path}: not JSON: {exc}") from None
    if not isinstance(samples, list) or not all(isinstance(raw, dict) for raw in samples):
        raise TaskRefused(f"{path}: expected a JSON array of documents")
    docs = []
    for number, sample in enumerate(samples, 1):
        where = f"sample {number} in {path}"
        # What a sample leaves out: a version and a change time it gives had been replaced unread.
        given = {"version": 1, "updated_at": sample["created_at"]} if "created_at" in sample else {}
        # json, not orjson: an integer past 64 bits stays one, refused as such.
        line = json.dumps(given | sample).encode()
        docs.append((where, _document_from(line, where, content_max)))
    return docs


def _document_from(line: bytes, where: str, content_max: int) -> Document:
    """Read as strictly as a request body: a repeated key or a field no document has (`tag`
    for `tags`, whose tags were left out) is refused, not settled."""
    try:
        value = parse_strict(line)
    except MalformedBody as exc:
        raise TaskRefused(f"{where}: document: {exc.detail}") from None
    except (ValueError, RecursionError) as exc:
        raise TaskRefused(f"{where}: document: Invalid JSON: {exc}") from None
    if isinstance(value, dict) and (unknown := sorted(value.keys() - Document.model_fields)):
        raise TaskRefused(f"{where}: {clip(unknown[0], 64)}: Extra inputs are not permitted")
    for name in ("created_at", "updated_at"):
        if isinstance(value, dict) and name in value:
            try:
                value[name] = exported_time(value[name])
            except ValueError as exc:
                raise TaskRefused(f"{where}: {name}: {exc}") from None
    try:
        # Strict, as no request sets id, times or version: `"version": true` is refused, not 1.
        doc = as_stored(Document.model_validate(value, strict=True))
        if len(doc.content) > content_max:
            raise ValueError(f"content: at most {content_max} characters (MAX_CONTENT_CHARS)")
        return doc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = clip(".".join(map(str, first["loc"])), 64) or "document"  # a key may be long
        raise TaskRefused(f"{where}: {field}: {first['msg']}") from None
    except ValueError as exc:
        raise TaskRefused(f"{where}: {exc}") from None


async def _run_task(settings: Settings, task: str, file: Path | None) -> None:
    database = settings.data_dir / DATABASE_FILE
    if task in ("backup", "export") and not settings.database_url and not database.exists():
        # Opening would make an empty database: a copy of it would look like a good backup.
        raise TaskRefused(f"no database at {database}: is DATA_DIR the service's?")
    if task == "import" and file is not None:
        await _import(settings, file)
        return
    samples = (
        await _read_samples(file or SAMPLES, settings.max_content_chars) if task == "seed" else []
    )
    store = await open_store(settings, serving=False)
    try:
        if task == "seed":
            # One transaction: a sample the store refuses leaves the others unwritten too; fixed
            # ids make seed idempotent.
            added = await _import_all(store, samples)
            log.info("seed.done", extra={"added": added, "documents": await store.count()})
        elif task == "export":
            if file is not None:
                check_target(file, settings.data_dir)
            if file is None and sys.stdout is None:
                raise TaskRefused("standard output is closed: give export a FILE")
            await _export(store, file)
        elif task == "backup" and file is not None:
            if not isinstance(store, SQLiteStore):
                raise TaskRefused(
                    "backup copies the embedded store; back MongoDB up with its tools"
                )
            await anyio.to_thread.run_sync(store.backup, file)
            log.info("backup.done", extra={"file": str(file)})
    finally:
        await store.close()


async def _import(settings: Settings, file: Path) -> None:
    """JSON lines, a batch (one transaction) at a time. The store opens once the first batch is
    read and checked, so that a file that cannot be read, or whose first batch is refused,
    leaves DATA_DIR as it was."""
    line_max = settings.max_body_bytes + IMPORT_LINE_EXTRA_BYTES
    chunks = _chunks(file, line_max)
    store: DocumentStore | None = None
    added = seen = batch_bytes = 0
    batch: list[tuple[str, Document]] = []  # each document with its line
    try:
        while lines := await _unheld(functools.partial(next, chunks, [])):
            for line in lines:
                seen += 1
                where = f"{file}:{seen}"
                if len(line) > line_max:
                    raise TaskRefused(
                        f"{where}: document: longer than {line_max} bytes, more than any "
                        "document takes (MAX_BODY_BYTES, and its id, times, version)"
                    )
                if not line.strip(b" \t\r\n"):  # blank in JSON's white space: none
                    continue
                batch.append((where, _document_from(line, where, settings.max_content_chars)))
                batch_bytes += len(line)
                if len(batch) == IMPORT_BATCH or batch_bytes >= IMPORT_BATCH_BYTES:
                    store = store or await open_store(settings, serving=False)
                    added += await _import_all(store, batch)
                    batch, batch_bytes = [], 0
                if seen % 10_000 == 0:  # logged: a progress line that cannot be written is lost
                    log.info("import.progress", extra={"read": seen})
        store = store or await open_store(settings, serving=False)
        added += await _import_all(store, batch)
    finally:
        if store is not None:
            await store.close()
    log.info("import.done", extra={"read": seen, "added": added})


def _chunks(file: Path, line_max: int) -> Iterator[list[bytes]]:
    """The file's lines, about a megabyte at a time (a thread hop per line would cost more than
    the import), through one opening (a pipe's writer is gone once a first opening closes).
    Opened, read and closed only as it is stepped, in the thread that steps it: closing a
    file from another thread would wait for a read left behind (Ctrl-C on a stalled pipe)."""
    with open(file, "rb") as source:
        while lines := _read_lines(source, line_max):
            yield lines


async def _export(store: DocumentStore, file: Path | None) -> None:
    fd, partial = await _unheld(functools.partial(_open_output, file))
    try:
        lines: list[bytes] = []  # bytes: UTF-8 whatever the locale
        size = 0
        async for doc in store.export_documents():
            lines.append(doc.json_bytes + b"\n")
            size += len(lines[-1])
            if size >= EXPORT_WRITE_BYTES:
                await _unheld(functools.partial(_write_all, fd, b"".join(lines)))
                lines, size = [], 0
        await _unheld(functools.partial(_write_all, fd, b"".join(lines)))
        if partial is not None and file is not None:
            await _unheld(functools.partial(os.fsync, fd))
            await _unheld(functools.partial(_put_in_place, partial, file))
    finally:
        os.close(fd)  # at once, even beside a write left behind: the write keeps the file open
        if partial is not None:
            partial.unlink(missing_ok=True)


def _put_in_place(partial: Path, file: Path) -> None:
    os.replace(partial, file)
    sync_directory(file.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    data = memoryview(data)
    while data:
        data = data[os.write(fd, data) :]


def _open_output(file: Path | None) -> tuple[int, Path | None]:
    """Export's output, and the partial file to put in place of FILE once written: a regular
    FILE is written under a hidden name beside it, so that an export cut short (Ctrl-C, a full
    disk) leaves the previous FILE, where it had left a part that read as a whole export.
    Standard output and other files (a pipe, a device) are written as they are."""
    if file is None:
        return os.dup(sys.stdout.fileno()), None  # never a store file: see _own_streams
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(file).st_mode):
            return os.open(file, os.O_WRONLY | os.O_CLOEXEC), None
    fd, partial = tempfile.mkstemp(".export-partial", f".{file.name}.", file.parent)
    return fd, Path(partial)


def _own_streams(data_dir: Path) -> list[int]:
    """Standard output and error where redirected into one of the store's files: the logs had
    been appended to the database or made a WAL that SQLite refused, and an export to standard
    output had emptied the database."""
    own = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):  # closed: nothing is written there
            if is_own(os.fstat(fd), data_dir):
                own.append(fd)
    return own


def _open_once(settings: Settings) -> bool:
    """Each of several workers would refuse a database none can open, a line each: refused once,
    here, once the port is bound. The migrations (and an upgrade's import) run here too; the
    workers then find nothing to do."""
    if settings.workers == 1 or settings.database_url:
        return True
    try:
        SQLiteStore.open(settings.data_dir).close_sync()
    except StoreError as exc:
        log.critical("store.open_failed", extra={"error": str(exc)})
        return False
    return True


def _file(name: str) -> Path:
    # A Path drops a trailing slash: `backup newdir/` wrote a file named newdir.
    if name.endswith("/"):
        raise argparse.ArgumentTypeError(f"{name} names a directory; name a file")
    return Path(name)


# Documents per call, and the most bytes of their lines: the embedded store writes them in one
# transaction, one fsync. 512 documents of 100 KB had held 280 MB at once; 2 MiB of words that
# fold to several letters each (㌀ to アパート) take about 70 MB.
IMPORT_BATCH = 512
IMPORT_BATCH_BYTES = 2 << 20
# What an import line holds beyond a request body (id, times, version), with room to spare.
IMPORT_LINE_EXTRA_BYTES = 1024


T = TypeVar("T")
# About the most bytes a write of export's takes: a thread hop per document would cost more
# than the export, and its whole output would be held.
EXPORT_WRITE_BYTES = 1 << 20


async def _unheld(call: Callable[[], T]) -> T:
    """A task's blocking call, in a daemon thread of its own that a stop leaves behind: a read of
    a pipe no one writes, a write to one no one reads, or another process's start lock, had held
    Ctrl-C, then the exit, for ever (anyio's threads are waited for, and joined at exit)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(call())
        except BaseException as exc:  # raised where it is awaited
            future.set_exception(exc)

    threading.Thread(target=run, name="task-io", daemon=True).start()
    return await asyncio.wrap_future(future)


def _read_head(path: Path, size: int) -> bytes:
    with open(path, "rb") as file:
        return file.read(size)


def _read_lines(file: IO[bytes], line_max: int) -> list[bytes]:
    """About a megabyte of lines, each cut after `line_max + 1` bytes: a line without an end
    (a pipe, a file of one huge line) is refused at that length, never read whole."""
    lines: list[bytes] = []
    size = 0
    while size < 1 << 20 and (line := file.readline(line_max + 1)):
        lines.append(line)
        size += len(line)
    return lines


async def _import_all(store: DocumentStore, lines: list[tuple[str, Document]]) -> int:
    try:
        return await store.import_documents([doc for _, doc in lines])
    except DocumentInvalid as exc:  # the store refuses one: its line and its id say which
        where = next((where for where, doc in lines if doc.id == exc.doc_id), "a document")
        raise TaskRefused(f"{where}: {exc.field}: {exc} (document {exc.doc_id})") from None


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(
        description="The documents service. Settings come from the environment and .env.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""tasks:
  serve           serve the API (the default)
  seed [FILE]     load sample documents (data/sample_documents.json); idempotent
  export [FILE]   write every document as JSON lines, oldest first (to stdout without FILE)
  import FILE     read JSON lines as export writes them; existing ids are skipped
  backup FILE     write a consistent copy of the embedded store's database (while it serves)

Every task may run while the service serves; only the service migrates a database to a newer
schema. To restore a backup: stop the service, put FILE in place of DATA_DIR/documents.db, start
it; its first start sets the replaced database's documents.db-wal and -shm aside.""",
    )
    parser.add_argument(
        "task",
        nargs="?",
        default="serve",
        choices=["serve", "seed", "export", "import", "backup"],
        help="what to do (see below)",
    )
    parser.add_argument("file", nargs="?", type=_file, help="the file the task reads or writes")
    args = parser.parse_args(argv)
    if args.task != "serve":  # a hang-up stops a task, as it stops any program
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if args.task == "import" and args.file is None:
        parser.error("import needs a FILE of JSON lines")
    if args.task == "backup" and args.file is None:
        parser.error("backup needs the FILE to write")
    settings = load_settings()
    if own := _own_streams(settings.data_dir):
        name = "standard output" if 1 in own else "standard error"
        message = f"error: {name} is one of the store's own files in {settings.data_dir}"
        for fd in {1, 2} - set(own):  # said where it harms nothing
            os.write(fd, f"{message}; redirect it elsewhere\n".encode())
        return 1
    # Data tasks keep stdout for their output (export); their logs go to stderr, and nowhere
    # when it is closed (2>&-): they had gone into the export.
    tasks_log = sys.stderr or open(os.devnull, "w")  # noqa: SIM115  # for the process's life
    configure_logging(
        settings.log_level,
        json_lines=settings.log_format == "json",
        stream=tasks_log if args.task != "serve" else sys.stdout,
    )
    try:
        if args.task != "serve":
            asyncio.run(_run_task(settings, args.task, args.file))
            return 0
    except (StoreError, TaskRefused) as exc:
        _error_line(str(exc))
        return 1
    except KeyboardInterrupt:  # the store closed as the task stopped; what it wrote stays
        _error_line("interrupted")
        return 128 + signal.SIGINT
    except OSError as exc:  # a file of the task's, or its standard output
        where, reason = exc.filename or args.file, exc.strerror or str(exc)
        _error_line(f"{where}: {reason}" if where else reason)
        return 1
    with contextlib.ExitStack() as stack:
        if settings.workers > 1:
            # Each worker writes its metrics to files here; /metrics sums them (prometheus-client's
            # multiprocess mode reads this variable when the workers import it).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(multiprocess_directory())
        return serve(
            # Several workers each build the app through the factory; one gets it directly.
            "main:serve_app" if settings.workers > 1 else create_app(settings),
            functools.partial(_open_once, settings),
            factory=settings.workers > 1,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            **SERVER_OPTIONS,
            limit_concurrency=settings.max_connections,
            # Behind a reverse proxy: trust X-Forwarded-For/-Proto from these addresses only.
            proxy_headers=bool(settings.forwarded_allow_ips),
            forwarded_allow_ips=settings.forwarded_allow_ips,
            root_path=settings.root_path,
            timeout_graceful_shutdown=8,
        )


if __name__ == "__main__":
    sys.exit(main())
