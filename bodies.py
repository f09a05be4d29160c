"""Strict JSON request bodies: the route class that takes JSON only (415 otherwise) and parses it
strictly (a duplicate key, NaN, Infinity, an overflowing number or nesting deeper than
MAX_NESTING is a malformed body, 400), and one with more values than any document holds is
refused before it is parsed. Bodies are UTF-8; a route that takes none refuses one (415), and a
route whose OpenAPI entry lists no query parameter refuses any (422)."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.to_thread
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.responses import Response

from logging_config import clip
from models import json_float
from problems import MalformedBody, UnsupportedMediaType

_OWS = " \t"  # HTTP's whitespace; str.strip() would also take U+0085 and U+00A0 off a value


def _require_json(headers: Headers, accepted: list[str]) -> None:
    """One Content-Type, of the media types the operation's OpenAPI entry lists, in UTF-8 if it
    names a charset (RFC 8259: JSON is UTF-8); and the body as it is: nothing here decodes a
    content coding or a transfer coding but chunked, so a gzip body was refused as malformed
    JSON and one merely labelled so was stored as sent (RFC 9110 8.4.1: 415). Every header line
    counts: a second one said what the first did not."""
    content_type = ", ".join(headers.getlist("content-type"))
    media, *parameters = (part.strip(_OWS).lower() for part in content_type.split(";"))
    named = [[side.strip(_OWS).strip('"') for side in p.partition("=")[::2]] for p in parameters]
    if media not in accepted or any(n.startswith("charset") and v != "utf-8" for n, v in named):
        sent = f"not {clip(content_type, 64)}" if content_type else "this request had none"
        raise UnsupportedMediaType(f"Send JSON (Content-Type: {' or '.join(accepted)}); {sent}.")
    for name, plain in (("content-encoding", "identity"), ("transfer-encoding", "chunked")):
        codings = {c.strip(_OWS).lower() for line in headers.getlist(name) for c in line.split(",")}
        if codings - {plain, ""}:  # empty list elements are allowed (RFC 9110, 5.6.1)
            raise UnsupportedMediaType(f"Send the body as it is: no {name} but {plain}.")


def _refuse_content(headers: Headers) -> None:
    """Content in a GET or DELETE has no meaning (RFC 9110 9.3.1, 9.3.5): taken and ignored, a
    precondition sent in it (`{"version": 1}`) left a delete unconditional."""
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise UnsupportedMediaType("This operation takes no request body; send none.")


def _refuse_query(request: Request) -> None:
    """As the listing refuses a parameter it does not know: a precondition misspelt into the
    query (`DELETE ...?version=3`) must not leave a write unconditional."""
    if params := request.query_params.multi_items():
        message = "Extra inputs are not permitted"
        raise RequestValidationError(
            [{"loc": ("query", k), "msg": message, "type": "extra_forbidden"} for k, _ in params]
        )


# Arrays and objects nest at most this deep (a document body needs 2). Checked here, before the
# parser: since Python 3.12 the C parser's own recursion limit is far higher, so the same body
# would otherwise be a 400 on one Python and reach validation on another.
MAX_NESTING = 32
# A document body holds a few dozen values (5 fields, 20 tags, 50 metadata entries); one with
# more strings, or more of the separators "[{,:", than this is refused before the parser sees
# it: a megabyte of tiny values held the parser, and with it every other request, for 50-170 ms.
MAX_VALUES = 512
# Brackets only, objects' as arrays' (depth is what counts; a mismatch is the parser's to find).
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TOO_DEEP = b"[" * (MAX_NESTING + 1)
_SEPARATORS = (b"[", b"{", b",", b":")


def _check_shape(body: bytes) -> None:
    """MalformedBody if the body holds more than MAX_VALUES values, ValueError if it nests
    deeper than MAX_NESTING. Linear, and C passes only: the strings are cut out, what remains
    is counted, and each pass over its brackets drops the innermost pairs, one level a pass;
    a body nested no deeper than the limit is empty within MAX_NESTING."""
    if sum(map(body.count, _SEPARATORS)) <= MAX_NESTING:
        return  # too few to nest that deep or to be too many: most bodies stop here
    # Once pairs of backslashes go, an escape is one backslash before the character it escapes:
    # with escaped quotes gone too, every quote left opens or closes a string. (UTF-8 puts
    # neither byte inside another character.) A C pass each, where a regular expression
    # stepping through a megabyte of escapes held the event loop for 80 ms.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    if unescaped.count(b'"') > 2 * MAX_VALUES:
        raise MalformedBody(
            f"The body holds more than {MAX_VALUES} strings; a document holds far fewer."
        )
    rest = b"".join(unescaped.split(b'"')[::2])  # outside the strings
    brackets = rest.translate(_BRACKETS, _NOT_BRACKETS)
    if _TOO_DEEP not in brackets and sum(map(rest.count, _SEPARATORS)) > MAX_VALUES:
        # Before the passes below, which would each walk every bracket of a large body.
        raise MalformedBody(
            f"The body holds more than {MAX_VALUES} values; a document holds far fewer."
        )
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


# Converting an integer literal costs time quadratic in its digits: 428 of 4 299 digits (CPython's
# limit) held the event loop for 100 ms. No value a document holds is an integer past 64 bits
# (19 digits), so a longer literal is read from its first digits only: as far past the range as
# the whole, and refused as such (422) by validation.
_INT_CHARS_READ = 21  # a sign and 20 digits


def _int(text: str) -> int:
    return int(text[:_INT_CHARS_READ])


def _finite(text: str) -> float:
    value = json_float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{clip(text, 64)} does not fit a 64-bit float")
    return value


# A larger body is parsed in a worker thread: at MAX_BODY_BYTES the shape check and the parse
# took about 8 ms, which every other request waited out on the event loop. The thread holds the
# interpreter lock for one C pass at a time, and hands it back within the switch interval.
PARSE_ON_LOOP_MAX_BYTES = 64 * 1024


def parse_strict(body: bytes) -> Any:
    """The body's JSON value; ValueError or RecursionError if it is no strict JSON."""
    # UTF-8 only (RFC 8259), checked first: json.loads would guess UTF-16 or 32 from the bytes,
    # in which a quote byte need not be a quote, past the shape check. A UTF-8 byte-order mark
    # is ignored, as RFC 8259 allows.
    text = body.decode("utf-8-sig")
    _check_shape(body)
    return loads_strict(text)


def loads_strict(text: str) -> Any:
    """JSON text's value, with no bound on its shape; ValueError for a duplicate key, NaN,
    Infinity or a number past a float, RecursionError past the parser's nesting."""
    return json.loads(
        text,
        object_pairs_hook=_reject_duplicates,
        parse_constant=_reject_constant,
        parse_float=_finite,
        parse_int=_int,
    )


class StrictJSONRequest(Request):
    """Parses bodies as strict JSON: a duplicate key, NaN, Infinity or an overflowing number is
    a malformed body (400), where `json.loads` would silently keep one value or an infinity."""

    async def json(self) -> Any:
        if not hasattr(self, "_parsed_body"):
            body = await self.body()
            try:
                if len(body) > PARSE_ON_LOOP_MAX_BYTES:
                    self._parsed_body = await anyio.to_thread.run_sync(parse_strict, body)
                else:
                    self._parsed_body = parse_strict(body)
            except (ValueError, RecursionError) as exc:
                raise MalformedBody(f"The body is not valid JSON: {exc}.") from None
        return self._parsed_body


class StrictJSONRoute(APIRoute):
    """Routes that take JSON bodies only, of the media types their OpenAPI entry lists (415
    otherwise), parsed by StrictJSONRequest (FastAPI's custom route hook); routes that take
    none refuse any (415); and routes that list no query parameter refuse any (422), so that a
    route added later cannot forget to."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        extra = self.openapi_extra or {}
        takes_query = bool(self.dependant.query_params) or any(
            parameter.get("in") == "query" for parameter in extra.get("parameters", [])
        )
        if not (self.methods or set()) & {"POST", "PATCH", "PUT"}:

            async def bodiless_handler(request: Request) -> Response:
                if not takes_query:
                    _refuse_query(request)
                _refuse_content(request.headers)
                return await handler(request)

            return bodiless_handler
        accepted = list(extra.get("requestBody", {}).get("content", {})) or ["application/json"]

        async def strict_handler(request: Request) -> Response:
            if not takes_query:
                _refuse_query(request)
            _require_json(request.headers, accepted)
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
