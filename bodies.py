"""Strict JSON request bodies: the route class that takes JSON only (415 otherwise) and parses it
strictly (a duplicate key, NaN, Infinity, an overflowing number or nesting deeper than
MAX_NESTING is a malformed body, 400), large ones off the event loop."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from logging_config import clip
from problems import MalformedBody, UnsupportedMediaType


def _require_json(content_type: str) -> None:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        sent = f"not {clip(content_type, 64)}" if content_type else "this request had none"
        raise UnsupportedMediaType(f"Send JSON (Content-Type: application/json); {sent}.")


# Arrays and objects nest at most this deep (a document body needs 2). Checked here, before the
# parser: since Python 3.12 the C parser's own recursion limit is far higher, so the same body
# would otherwise be a 400 on one Python and reach validation on another.
MAX_NESTING = 32
# A JSON string, escapes included; an unterminated one runs to the end of the body. Each
# character is consumed one way only, so a body costs one pass, never backtracking.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Brackets only, objects' as arrays' (depth is what counts; a mismatch is the parser's to find).
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TOO_DEEP = b"[" * (MAX_NESTING + 1)


def _check_nesting(body: bytes) -> None:
    """Raise ValueError if arrays and objects nest deeper than MAX_NESTING. Linear: strings
    are cut out, then each pass drops the innermost pairs of what brackets remain, one level a
    pass; a body nested no deeper than the limit is empty within MAX_NESTING passes."""
    if body.count(b"[") + body.count(b"{") <= MAX_NESTING:
        return  # too few brackets to nest that deep: most bodies stop here
    brackets = _JSON_STRING.sub(b"", body).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(MAX_NESTING):
        if not brackets or _TOO_DEEP in brackets:
            break
        brackets = brackets.replace(b"[]", b"")  # one level: the result is not searched again
    if brackets:
        raise ValueError(
            f"arrays and objects nest more than {MAX_NESTING} deep (or do not balance)"
        )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Linear in the number of keys, however many a body repeats: any client may send one."""
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
        raise ValueError(f"{clip(text, 64)} does not fit a 64-bit float")
    return value


def _parse(body: bytes) -> Any:
    try:
        _check_nesting(body)
        return json.loads(
            body,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite,
        )
    except (ValueError, RecursionError) as exc:
        raise MalformedBody(f"The body is not valid JSON: {exc}.") from None


def _parse_collector_paused(body: bytes) -> Any:
    """Parsed JSON holds no reference cycles: pausing the cyclic collector keeps a large body's
    parse linear (its passes over every new container made it superlinear). The pause is the
    process's, so it holds in a thread as on the loop, and the loop's own allocations wait for
    the collector until this one parse ends."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse(body)
    finally:
        if collecting:
            gc.enable()


# Bodies up to this size are parsed on the event loop, sparing the common small body a thread
# hop: the slowest shape (arrays nested 31 deep) parses within about 3 ms at this size, no
# longer than the loop may wait for the interpreter lock while a thread parses (the switch
# interval, 5 ms); and the collector's passes cost nothing that shows at this size, so these
# parses leave it running.
INLINE_PARSE_BYTES = 32 * 1024
# Larger bodies are parsed on one thread, one at a time: threads share one interpreter lock, so
# more would parse no faster and each would take more of the loop's turns; and with one thread
# the only one pausing the collector, no two parses can race to leave it off for good. One for
# the process, as the interpreter lock and the collector are.
_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="json-parse")


class StrictJSONRequest(Request):
    """Parses bodies as strict JSON: a duplicate key, NaN, Infinity or an overflowing number is
    a malformed body (400), where `json.loads` would silently keep one value or an infinity. A
    large body is parsed in a thread, so the event loop is not held for the whole parse: the
    interpreter hands the loop its lock at the parse's Python hooks (each object, each float)
    and between the nesting check's passes. A long stretch inside the C parser (arrays of
    arrays and integers, one object's many keys) still holds the lock while it runs."""

    async def json(self) -> Any:
        if not hasattr(self, "_parsed_body"):
            body = await self.body()
            if len(body) <= INLINE_PARSE_BYTES:
                self._parsed_body = _parse(body)
            else:
                loop = asyncio.get_running_loop()
                self._parsed_body = await loop.run_in_executor(
                    _PARSER, _parse_collector_paused, body
                )
        return self._parsed_body


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
