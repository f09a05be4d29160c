"""Pure ASGI middleware: request id, access log and metrics hook, security headers, body limits
(one request's and all requests' together) and timeout, HEAD as GET."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from typing import Any, Protocol

import anyio
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from admission import PROBES, closing_start, route_path
from logging_config import clip, request_id_var
from problems import (
    INTERNAL,
    MEDIA_TYPE,
    STOPPED,
    BodyBufferFull,
    BodyTimeout,
    BodyTooLarge,
    for_status,
)

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own X-Request-ID is logged beside ours, cut to this and with any other character
# replaced: it correlates the client's logs with ours, and can never pass for one of our ids.
CLIENT_REQUEST_ID_MAX_CHARS = 128
_UNSAFE_IN_REQUEST_ID = re.compile(r"[^A-Za-z0-9._:-]")

access_log = logging.getLogger("documents.access")
log = logging.getLogger("documents.api")


class RequestObserver(Protocol):
    """Told when a request starts and ends (the metrics use this: one middleware, not two)."""

    def request_started(self) -> None: ...

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None: ...


class RequestContextMiddleware:
    """Give each request an id of ours (a client's X-Request-ID is logged beside it, never
    taken for it: clients could otherwise make ids collide), stamp the response headers, log
    one access line, and turn an unhandled exception into a logged 500 problem (so it is
    logged once, here). An error a framework part answers itself, past the error map, in its
    own format (Starlette's static files refusing a Range, its CORS refusing a preflight)
    becomes a problem document too, its text the detail."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        slow_request_ms: float = 500.0,
        observer: RequestObserver | None = None,
    ) -> None:
        self.app = app
        self.slow_request_seconds = slow_request_ms / 1000
        self.observer = observer
        self.fixed_headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"cache-control", b"no-store"),
        ]
        # Ids are a random per-process prefix plus a counter: unique across processes and
        # restarts, without a getrandom() system call on the hot path.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._new_request_id()
        request_id_var.set(request_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        response_started = False
        held: Message | None = None  # the start of an error not yet a problem document
        text = b""  # its body: the problem's detail
        if self.observer is not None:
            self.observer.request_started()

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started, held, text
            if held is not None:
                text = (text + message.get("body", b""))[:ERROR_TEXT_MAX_BYTES]
                if not message.get("more_body", False):
                    start, held = held, None
                    problem = _as_problem(start, text.decode("utf-8", "replace"))
                    await problem(scope, receive, send_with_headers)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                if status >= 400 and _media_type(message) != PROBLEM:
                    held = message
                    return
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(self.fixed_headers)
                headers.extend(state.get("response_headers", ()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("request.unhandled_error")
            status = 500
            if not response_started:
                response = INTERNAL.response(
                    "The server failed to handle this request; quote the request id to report it.",
                    headers={"Connection": "close"},  # its body may be unread (BodyLimit)
                )
                await response(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            # What still runs when a graceful stop's time is out: uvicorn cancels it and awaits
            # none of it. It had answered a text/plain 500 and logged a traceback; not re-raised,
            # as uvicorn would log it again. A write may yet commit: the detail says so.
            status = 503
            if not response_started:
                response = STOPPED.response(
                    "The server stopped before it answered; the request may have been carried "
                    "out: check before repeating it (a POST may be repeated with its "
                    "Idempotency-Key).",
                    headers={"Connection": "close", "Retry-After": "1"},
                )
                await response(scope, receive, send_with_headers)
        finally:
            duration = time.perf_counter() - started
            route = route_template(scope)
            status = state.get("answered_status", status)  # the server's own (server.py)
            # No line for a refusal admission's tally counts, nor for a probe, failed or not
            # (whatever its method): orchestrators poll them, strangers may flood them with no
            # budget, and metrics count them all; a failing store logs itself once (Outage).
            probe = route_path(scope) in PROBES
            if state.get("log_access", True) and not probe:
                self._log_access(scope, route, state, status, duration)
            if self.observer is not None:
                self.observer.request_finished(scope["method"], route, status, duration)

    def _log_access(
        self, scope: Scope, route: str, state: dict[str, Any], status: int, duration: float
    ) -> None:
        # A client's error is the client's: INFO. WARNING is kept for what an operator should
        # look at (a slow request here; repeated refusals of one client, in admission.py).
        level = logging.ERROR if status >= 500 else logging.INFO
        client = scope.get("client")
        user_agent = next((v for k, v in scope["headers"] if k == b"user-agent"), b"")
        # Path, client (X-Forwarded-For from a trusted proxy) and User-Agent come from the
        # request: cut, so a line stays small whatever was sent.
        fields = {
            "method": scope["method"],
            "path": clip(scope["path"]),
            "route": route,
            "status_code": status,
            "duration_ms": round(duration * 1000, 2),
            "client": clip(f"{client[0]}:{client[1]}") if client else None,
            "api_key": state.get("api_key_name"),
            "user_agent": clip(user_agent.decode("latin-1")),
        }
        if client_request_id := _client_request_id(scope):
            fields["client_request_id"] = client_request_id
        if refusal := state.get("refusal"):
            fields["refusal"] = refusal
        slow = {k: fields[k] for k in ("method", "route", "duration_ms")}
        if state.get("client_disconnected"):  # set by the server (server.py)
            # The client left before its response was sent. The status stays the one the
            # service chose (a 500 whose client left is still a bug to look at), and this field
            # says it never arrived; not nginx's 499, which is no HTTP status and would hide it.
            fields["client_disconnected"] = slow["client_disconnected"] = True
        access_log.log(level, "request", extra=fields)
        if duration >= self.slow_request_seconds:
            log.warning("request.slow", extra=slow)


ERROR_TEXT_MAX_BYTES = 1024  # of a framework's own error text, kept as a problem's detail
PROBLEM = MEDIA_TYPE.encode()


def _media_type(start: Message) -> bytes:
    return next((v for k, v in start.get("headers", ()) if k == b"content-type"), b"")


def _as_problem(start: Message, text: str) -> Response:
    """An error response of a framework part as a problem document, keeping its headers (the
    Content-Range of a 416, the Vary of a CORS refusal)."""
    headers = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in start.get("headers", ())
        if k not in (b"content-type", b"content-length")
    }
    status: int = start["status"]
    detail = clip(text.strip()) or f"{for_status(status).title}."
    return for_status(status).response(detail, headers=headers)


def route_template(scope: Scope) -> str:
    """The matched route's path template; every unmatched path shares one label."""
    route = scope.get("route")
    return getattr(route, "path", None) or "<unmatched>"


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value[:CLIENT_REQUEST_ID_MAX_CHARS].decode("latin-1")
            return _UNSAFE_IN_REQUEST_ID.sub("_", text)
    return None


class HeadAsGetMiddleware:
    """HEAD is GET without the body (RFC 9110, 9.3.2), so every GET route answers it. Routes
    see GET; the server, which still sees HEAD, sends the headers only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send)
        finally:  # the route it matched, for the access line and the metrics
            if "route" in as_get:
                scope["route"] = as_get["route"]


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` before anything parses them, whether or not the client
    declared a Content-Length, and without buffering past the limit; refuse a body that takes
    longer than `timeout` seconds to arrive, so a client dripping bytes cannot hold a request
    open for ever. Bodies held at once, across all connections, stay within
    `max_buffered_bytes`, and those of one key (the name admission put in the scope; requests
    without one share a name) within a quarter of it: a request whose body would pass either gets
    503 and Retry-After instead of its body being read, so many slow uploads cannot add up to the
    process's memory, nor one key's uploads keep every other key's out."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, max_buffered_bytes: int, timeout: float
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.timeout = timeout
        # A quarter: one key's stalled uploads leave three quarters to the others, yet a key may
        # still send several full-size bodies at once. Never below one full-size body, which
        # every key must be able to send.
        self.max_buffered_per_key = max(max_buffered_bytes // 4, max_bytes)
        self.buffered = 0  # bytes held by the bodies of requests in flight
        self.buffered_by_key: dict[str | None, int] = {}  # the same, by key name; no zeros kept

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        key: str | None = scope.get("state", {}).get("api_key_name")
        received = held = 0
        deadline: float | None = None
        complete = False

        def hold(size: int) -> None:
            nonlocal held
            by_key = self.buffered_by_key.get(key, 0)
            if self.buffered + size > self.max_buffered_bytes:
                detail = "The server is receiving as many request bodies as it holds at once"
            elif by_key + size > self.max_buffered_per_key:
                detail = "This key is sending as many request bodies as one key may at once"
            else:
                self.buffered += size
                self.buffered_by_key[key] = by_key + size
                held += size
                return
            headers = {"Retry-After": "1", "Connection": "close"}
            raise BodyBufferFull(f"{detail}; retry shortly.", headers=headers)

        async def limited_receive() -> Message:
            nonlocal received, deadline, complete
            # Raised while the route reads its body, so the API's error map answers it.
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLarge(_too_large(self.max_bytes))
            if complete:  # after the body only a disconnect can come: no deadline for it
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.timeout
                hold(declared or 0)  # a declared body is held whole before its first byte
            with anyio.move_on_after(deadline - time.monotonic()):
                message = await receive()
                if message["type"] == "http.request":
                    size = len(message.get("body", b""))
                    received += size
                    if received > self.max_bytes:
                        raise BodyTooLarge(_too_large(self.max_bytes))
                    if declared is None:
                        hold(size)
                    complete = not message.get("more_body", False)
                return message
            raise BodyTimeout(
                f"The request body did not arrive within {self.timeout:g} seconds.",
                headers={"Connection": "close"},
            )

        async def closing_send(message: Message) -> None:
            # Answered before its body has all arrived, the connection ends with the response
            # (server.py reads on no body nobody will use): the response says so.
            start = message["type"] == "http.response.start"
            await send(closing_start(message) if start and not complete else message)

        with_body = declared or any(name == b"transfer-encoding" for name, _ in scope["headers"])
        try:
            await self.app(scope, limited_receive, closing_send if with_body else send)
        finally:
            # Held until the request is answered: its handler keeps the body (and what was
            # parsed from it) until then.
            if held:
                self.buffered -= held
                if left := self.buffered_by_key.pop(key) - held:
                    self.buffered_by_key[key] = left


def _too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes."


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
