"""Admission: who a request is, and whether it may go on, decided from its head before any byte of
its body is read. FastAPI reads and parses a body before it solves a route's dependencies, so the
key dependency alone would decide only after the body had cost its parse; this pure ASGI
middleware decides first, and the dependency (`main.authorize`) hands the handler what it found.

Every request but the probes (`/health`, `/health/ready`; `/metrics` is no probe) spends one unit
of a budget: its key's (`RATE_LIMIT`, shared through `RATE_LIMIT_STORAGE_URI`) when it carries a
valid `X-API-Key`, else its client address's (`KEYLESS_RATE_LIMIT`, counted in this process: a
flood from strangers costs no Redis round trip, and a Redis outage does not turn their 401s into
503s). A keyed request whose store reads took longer than READ_UNIT_S spends more once answered,
one unit per READ_UNIT_S started: a listing whose filters match sparsely walks every match of
the first, so its cost follows the data, not the request (finding a written document's words
counts too). So that a burst cannot run far ahead of its charges, a key has at most
IN_FLIGHT_PER_KEY requests in progress in a process, and its store work that takes more than a
moment runs one piece at a time, each after the charges of those before (ratelimit.StoreWork, its
lane). Over the budget or the bound: 429. Under /v1, no valid key: 401; a read-only key's
write: 403. A path or query that is not percent-encoded UTF-8, or a path with an encoded slash:
400, on every route but the probes (decoded, each byte not UTF-8 would become U+FFFD: `tag=%FF`
found that character, and a `q` of such bytes was dropped unsaid; `/v1%2Fdocuments` was routed
as `/v1/documents`, past a proxy's rule on the path it saw). Each refusal is answered from here
with the body unread, and a connection whose body is left unread is closed (`server.py`).

A refusal writes its access line like any request; once a budget is spent within a window, its
further refusals write none, and one `rate_limit.refused` line at the window's end counts them.
A flood's log volume so follows the number of its clients, not of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from limits import RateLimitItem
from limits.aio.storage import Storage
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import ApiKey, digest_key
from metrics import SCRAPE_PATH, Metrics
from problems import (
    LIMITER_UNAVAILABLE,
    RETRY_AFTER_SECONDS,
    Forbidden,
    MalformedTarget,
    RateLimited,
    Unauthorized,
)
from ratelimit import Budget, LimiterUnavailable, LocalStorage, StoreWork, spend
from server import client_of

log = logging.getLogger("documents.admission")

# Orchestrators poll these without a key; a refused liveness probe would get the service
# restarted, so they spend no budget (each is cheap, whatever the data). Not /metrics: a render
# costs far more, so a stranger pays for it from a keyless budget (its address's for scrapes),
# which a scraper's one request every few seconds stays well within.
PROBES = frozenset({"/health", "/health/ready"})
READ_METHODS = frozenset({"GET", "HEAD"})
# Methods that change nothing (RFC 9110, 9.2.1): a read-only key sending OPTIONS or TRACE gets
# what any key gets (405 and the methods allowed), not a 403 saying it may not write.
SAFE_METHODS = READ_METHODS | {"OPTIONS", "TRACE"}
# A unit of store read time. A get or a page of 50 reads in about 1 ms: ten times that keeps them
# at one unit on a slower or busy machine (the time is measured around the await, so it includes
# waiting for a thread), while a read a hundred times costlier spends a hundred units.
READ_UNIT_S = 0.010
# Requests of one key in progress at once, in each process. Read time is charged once a request
# has been answered, so a key could otherwise start hundreds of costly listings at the start of
# a window before the first of them paid; 32 keeps one process's share of a burst to what 32
# answers cost, and is as many as a client with a connection pool of 32 ever has in progress.
IN_FLIGHT_PER_KEY = 32
API_KEY_HEADER = b"x-api-key"
ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)
BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
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


@dataclass(slots=True)
class _Window:
    """A spent budget's refusals within its current window."""

    refused: int
    level: int
    fields: dict[str, Any]  # what the summary line says of the budget
    timer: asyncio.TimerHandle


class RefusalTally:
    """Refusals of spent budgets, counted instead of logged: the first of a window writes its
    access line, the rest are summed into one line when the window ends."""

    def __init__(self) -> None:
        self._open: dict[str, _Window] = {}

    def count(self, budget: str, until: float, level: int, fields: dict[str, Any]) -> bool:
        """Count one refusal; True for the window's first, the one whose line is written."""
        if (window := self._open.get(budget)) is not None:
            window.refused += 1
            return False
        # A fresh context: the summary belongs to no single request, so it carries no request id.
        timer = asyncio.get_running_loop().call_later(
            max(0.0, until - time.time()),
            self._summarise,
            budget,
            context=contextvars.Context(),
        )
        self._open[budget] = _Window(1, level, fields, timer)
        return True

    def _summarise(self, budget: str) -> None:
        window = self._open.pop(budget)
        log.log(
            window.level, "rate_limit.refused", extra={**window.fields, "refused": window.refused}
        )

    def close(self) -> None:
        """Write every open window's line now: at shutdown no timer fires any more."""
        for budget, window in list(self._open.items()):
            window.timer.cancel()
            self._summarise(budget)


class AdmissionMiddleware:
    """Authenticate, spend the budget and refuse (401, 403, 429) from the head alone."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: list[ApiKey],
        key_limits: list[RateLimitItem],
        key_storage: Storage,
        keyless_limits: list[RateLimitItem],
        metrics: Metrics,
        tally: RefusalTally,
        cors_origins: list[str],
        protected: str = "/v1",
    ) -> None:
        self.app = app
        self.keys = keys
        self.key_limits = key_limits
        self.key_storage = key_storage
        self.keyless_limits = keyless_limits
        self.keyless_storage = LocalStorage()
        self.in_flight: Counter[str] = Counter()
        self.lanes: dict[str, asyncio.Lock] = {}  # per key: its long store work, one at a time
        self.metrics = metrics
        self.tally = tally
        self.protected = protected
        self.cors = (
            CORSMiddleware(
                self._admit,
                allow_origins=cors_origins,
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=CORS_RESPONSE_HEADERS,
            )
            if cors_origins
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif route_path(scope) in PROBES and b"%" not in (scope.get("raw_path") or b""):
            # Spelt as sent: /health%2Fready is no probe, and is refused as a malformed path.
            await self.app(scope, receive, _closing_send(send))
        elif self.cors is None:
            await self._admit(scope, receive, send)
        elif scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            # A preflight carries no key by design: it spends its address's keyless budget like
            # any request without one, then CORS answers it.
            await self._admit(scope, receive, send, preflight=True)
        else:
            await self.cors(scope, receive, send)  # around _admit: refusals carry CORS headers

    async def _admit(
        self, scope: Scope, receive: Receive, send: Send, *, preflight: bool = False
    ) -> None:
        path = route_path(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        protected = path == self.protected or path.startswith(self.protected + "/")
        key, presented = self._authenticate(scope["headers"])
        client = client_address(scope)
        try:
            if key is not None:
                state["api_key"] = key
                state["api_key_name"] = key.name
                budgets = await spend(self.key_storage, self.key_limits, key.name)
            else:
                # A scrape spends a budget of its own: a keyless flood from the scraper's address
                # (or from behind the same proxy) had taken Prometheus' target down with it.
                owner = f"{client} {SCRAPE_PATH}" if path == SCRAPE_PATH else client
                budgets = await spend(self.keyless_storage, self.keyless_limits, owner)
        except LimiterUnavailable as exc:
            response = LIMITER_UNAVAILABLE.response(
                str(exc), headers=_closing({"Retry-After": RETRY_AFTER_SECONDS})
            )
            await response(scope, receive, send)
            return
        refused = [b for b in budgets if not b.allowed]
        shown = max(refused, key=lambda b: b.reset_at) if refused else min(budgets)
        state["response_headers"] = _rate_limit_headers(shown)
        if refused:
            await self._refuse_over_budget(scope, receive, send, key or client, shown)
        elif reason := _malformed(scope):  # once its budget is spent: a flood logs no line each
            detail = f"The path or query is malformed: {reason}."
            response = MalformedTarget.kind.response(detail, headers=_closing({}))
            await response(scope, receive, send)
        elif preflight and self.cors is not None:
            await self.cors(scope, receive, send)
        elif key is None and protected:
            self.metrics.auth_failures.inc()
            state["refusal"] = "key-invalid" if presented else "key-missing"
            response = Unauthorized.kind.response(
                Unauthorized.kind.description,
                headers=_closing({"WWW-Authenticate": "ApiKey"}),
            )
            await response(scope, receive, send)
        elif key is not None and key.read_only and protected and _writes(scope):
            state["refusal"] = "key-read-only"
            detail = f"This key may only read ({', '.join(sorted(READ_METHODS))})."
            await Forbidden.kind.response(detail, headers=_closing({}))(scope, receive, send)
        elif key is None:
            await self.app(scope, receive, send)
        elif self.in_flight[key.name] >= IN_FLIGHT_PER_KEY:
            self.metrics.rate_limited.inc()
            state["refusal"] = "key-busy"
            detail = f"This key has {IN_FLIGHT_PER_KEY} requests in progress; retry once one ends."
            headers = _closing({"Retry-After": "1"})
            await RateLimited.kind.response(detail, headers=headers)(scope, receive, send)
        else:
            self.in_flight[key.name] += 1
            if (lane := self.lanes.get(key.name)) is None:
                lane = self.lanes[key.name] = asyncio.Lock()
            work = StoreWork.start(lane, functools.partial(self._refuse_if_spent, key))

            async def send_charged(message: Message) -> None:
                if message["type"] == "http.response.start":
                    await self._settle(key, work)
                await send(message)

            try:
                await self.app(scope, receive, send_charged)
            finally:
                if not work.ended:  # no answer was started
                    await self._settle(key, work)
                self.in_flight[key.name] -= 1

    async def _settle(self, key: ApiKey, work: StoreWork) -> None:
        """Charge the request's store work, then free the key's lane: as its answer starts (its
        store work is done by then; a slow client taking the answer holds neither), or as the
        request ends without one."""
        try:
            if work.seconds > READ_UNIT_S:
                await self._charge(key, work.seconds)
        finally:
            work.end()

    async def _refuse_if_spent(self, key: ApiKey) -> None:
        """Raise 429 if the charges of the key's work before have spent its budget (spending
        nothing: the head paid). A rate-limit store that fails lets the work go, as a failed
        charge lets its answer stand."""
        with contextlib.suppress(LimiterUnavailable):
            budgets = await spend(self.key_storage, self.key_limits, key.name, 0)
            if spent := [b for b in budgets if not b.allowed]:
                shown = max(spent, key=lambda b: b.reset_at)
                retry_after = str(max(1, int(shown.reset_at - time.time()) + 1))
                detail = f"The rate limit of {shown.limit} for this key is reached."
                self.metrics.rate_limited.inc()
                raise RateLimited(detail, headers=_closing({"Retry-After": retry_after}))

    async def _charge(self, key: ApiKey, seconds: float) -> None:
        """The units beyond the one spent from the head. The answer is sent: a rate-limit store
        failing now is logged (by `spend`), and the next request meets it."""
        with contextlib.suppress(LimiterUnavailable):
            units = math.ceil(seconds / READ_UNIT_S) - 1
            await spend(self.key_storage, self.key_limits, key.name, units)

    def _authenticate(self, headers: list[tuple[bytes, bytes]]) -> tuple[ApiKey | None, bool]:
        """The key and whether one was presented. Every configured key is compared, in constant
        time, whether or not one matched."""
        presented = [v for k, v in headers if k == API_KEY_HEADER]
        # Two keys in one request match neither: a proxy in front may have read the other.
        # The bytes sent: a key of any characters matches as its UTF-8, which clients send.
        digest = digest_key(presented[0]) if len(presented) == 1 else b""
        match: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                match = key
        return match, bool(presented)

    async def _refuse_over_budget(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        spender: ApiKey | str,
        budget: Budget,
    ) -> None:
        """429. Only the window's first refusal of this budget writes its access line. Without
        a valid key it counts as an auth failure: one address's 401s are bounded by its budget,
        so a guesser's refusals are mostly these, and RATE_LIMIT is not what to raise."""
        state: dict[str, Any] = scope["state"]
        state["refusal"] = "rate-limited"
        if isinstance(spender, ApiKey):
            self.metrics.rate_limited.inc()
            who, level, fields = f"key:{spender.name}", logging.INFO, {"api_key": spender.name}
            detail = f"The rate limit of {budget.limit} for this key is reached."
        else:
            self.metrics.auth_failures.inc()
            # Repeated requests without a valid key from one client: worth an operator's look.
            who, level, fields = f"client:{spender}", logging.WARNING, {"client": spender}
            detail = f"The rate limit of {budget.limit} without a valid key is reached."
        if not self.tally.count(who, budget.reset_at, level, fields):
            state["log_access"] = False
        retry_after = max(1, int(budget.reset_at - time.time()) + 1)
        headers = _closing({"Retry-After": str(retry_after)})
        await RateLimited.kind.response(detail, headers=headers)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


def client_address(scope: Scope) -> str:
    """Who a keyless budget belongs to: the client's address (X-Forwarded-For's, when the peer
    is in FORWARDED_ALLOW_IPS: uvicorn's proxy headers set `client` before the app runs)."""
    client = scope.get("client")
    return client_of(client[0] if client else "")


def route_path(scope: Scope) -> str:
    """The path below ROOT_PATH, which uvicorn puts in front of the path the client sent."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _writes(scope: Scope) -> bool:
    return scope["method"] not in SAFE_METHODS


def _malformed(scope: Scope) -> str:
    """Why the raw path or query is not percent-encoded UTF-8 (a lone surrogate's bytes
    included), or the path holds an encoded slash; "" if neither."""
    path = scope.get("raw_path") or b""
    if b"%" in path and ENCODED_SLASH.search(path):
        return "a slash percent-encoded in the path (%2F)"
    for raw in (path, scope["query_string"]):
        if b"%" in raw and BAD_ESCAPE.search(raw):
            return "a % not followed by two hexadecimal digits"
        if b"%" in raw or not raw.isascii():
            try:
                unquote_to_bytes(raw).decode()
            except UnicodeDecodeError as exc:
                return f"not UTF-8 once percent-decoded ({exc.reason})"
    return ""


def _closing(headers: dict[str, str]) -> dict[str, str]:
    """A refusal ends its connection: a body stays unread, and a refused client holds no
    connection open to go on being refused."""
    return {**headers, "Connection": "close"}


def _closing_send(send: Send) -> Send:
    """`send`, ending the connection with the response. A probe spends no budget, so no 429
    would ever end a connection that polls one: without a key it could hold one of the
    MAX_CONNECTIONS for good. Orchestrators open a connection per probe anyway."""

    async def closing(message: Message) -> None:
        await send(closing_start(message) if message["type"] == "http.response.start" else message)

    return closing


def closing_start(message: Message) -> Message:
    """A response's start that says `Connection: close`, once."""
    headers = message.get("headers", [])
    if any(name.lower() == b"connection" for name, _ in headers):
        return message
    return {**message, "headers": [*headers, (b"connection", b"close")]}


def _rate_limit_headers(budget: Budget) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit", str(budget.limit).encode()),
        (b"x-ratelimit-remaining", str(budget.remaining).encode()),
        (b"x-ratelimit-reset", str(int(budget.reset_at)).encode()),
    ]
