"""The OpenAPI document: what FastAPI infers, plus what it cannot (problem responses described once
per status from the problem types, the `ApiKey` scheme, `X-Request-ID` and `Retry-After`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from models import Problem
from problems import ALL, TITLES

DESCRIPTION = """\
Create, read, list, update and delete JSON documents over a durable store.

**Quick start:** `make run`, then send the printed key as `X-API-Key`
(in Swagger UI at `/docs`, use **Authorize**), e.g. `POST /v1/documents` with
`{"title": "Hello", "content": "..."}`.

Every error is an RFC 9457 `application/problem+json` document carrying the `request_id`
that is also in the `X-Request-ID` response header.

Every string is Unicode text: one holding a lone surrogate (a `\\ud800` escape with no pair,
which no UTF-8 text can hold) is refused with 422, wherever it appears.
"""

TAGS = [
    {"name": "documents", "description": "Create, read, list, update and delete documents."},
    {"name": "health", "description": "Liveness, readiness and metrics; no key needed."},
]

API_KEY_SCHEME = {
    "type": "apiKey",
    "in": "header",
    "name": "X-API-Key",
    "description": "An API key from `API_KEYS` (`name:key:read` keys may only read).",
}

# Each status described once, from every problem type that answers with it.
DESCRIPTIONS = {
    status: " ".join(k.description for k in ALL if k.status == status)
    for status in sorted({k.status for k in ALL})
}
# Every /v1 operation may answer these.
V1_STATUSES = (401, 429, 431, 500, 503)


def problems(*statuses: int, v1: bool = True) -> dict[int | str, dict[str, Any]]:
    """Problem responses for these statuses (and, on /v1, the ones every operation has)."""
    return {
        status: {
            "model": Problem,
            "description": DESCRIPTIONS[status],
            "content": {
                "application/problem+json": {
                    "example": {
                        "type": "urn:documents:problem:...",
                        "title": TITLES[status],
                        "status": status,
                        "detail": DESCRIPTIONS[status],
                        "request_id": "c815a78dc41cfb350000000000000007",
                    }
                }
            },
        }
        for status in sorted({*statuses, *(V1_STATUSES if v1 else ())})
    }


ETAG_HEADER = {
    "ETag": {
        "description": 'Current version, e.g. `"3"`, for If-Match / If-None-Match.',
        "schema": {"type": "string"},
    }
}
RATE_LIMIT_HEADERS = {
    f"X-RateLimit-{name}": {"description": text, "schema": {"type": "integer"}}
    for name, text in (
        ("Limit", "Requests allowed in the window closest to refusing."),
        ("Remaining", "Requests left in that window."),
        ("Reset", "When that window ends, in seconds since the epoch."),
    )
}


def created_responses() -> dict[int | str, dict[str, Any]]:
    return {
        201: {
            "description": "Created (or replayed, with `Idempotent-Replayed: true`).",
            "headers": {
                **ETAG_HEADER,
                "Location": {
                    "description": "Path of the new document (under ROOT_PATH, if set).",
                    "schema": {"type": "string"},
                },
            },
        },
        **problems(400, 403, 408, 409, 413, 415, 422),
    }


def read_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "The document.", "headers": ETAG_HEADER},
        304: {
            "description": "Not modified: `If-None-Match` names the current ETag.",
            "headers": ETAG_HEADER,
        },
        **problems(404, 412, 415),
    }


def update_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"headers": ETAG_HEADER}, **problems(400, 403, 404, 408, 409, 412, 413, 415, 422)}


def header(title: str, description: str | None = None) -> dict[str, Any]:
    """A header the handler reads from the request rather than declares as a parameter: FastAPI
    validates each declared parameter on every request (a GET is the hot path), and a header
    sent on several lines is read whole, as one list."""
    schema = {"type": "string", "title": title}
    parameter = {"name": title.lower(), "in": "header", "required": False, "schema": schema}
    return {**parameter, **({"description": description} if description else {})}


def read_conditions() -> dict[str, Any]:
    """A read's conditional headers (RFC 9110, 13.1): 304 for If-None-Match, 412 for If-Match."""
    return {
        "parameters": [
            header("If-None-Match"),
            header("If-Match", "Only if the document still has this ETag."),
        ]
    }


def write_conditions(action: str) -> dict[str, Any]:
    """A write's conditional headers (RFC 9110, 13.1): a 412 when either does not hold."""
    return {
        "parameters": [
            header("If-Match", f"Only {action} if the document still has this ETag."),
            header(
                "If-None-Match",
                f"Only {action} if the document has none of these ETags (`*`: never).",
            ),
        ]
    }


# The route takes exactly these (bodies.StrictJSONRoute reads them from here).
MERGE_PATCH_BODY = {
    "requestBody": {
        "content": {
            media: {"schema": {"$ref": "#/components/schemas/DocumentUpdate"}}
            for media in ("application/merge-patch+json", "application/json")
        }
    }
}
# A scrape without a key spends the address's keyless budget: 429 past it.
METRICS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
    **problems(429, v1=False),
}


# The model holds `metadata.KEY=VALUE` parameters as one `metadata` object; OpenAPI has no name
# patterns, so the spec describes the family by its pattern.
METADATA_FILTER: dict[str, Any] = {
    "name": "metadata.{key}",
    "in": "query",
    "required": False,
    "description": "Repeatable over keys, e.g. `metadata.pages=12`: documents whose metadata "
    "`{key}` equals the value as a string, or as the JSON number or boolean it spells (`12` "
    'finds 12 and "12", `true` finds true and "true"). A `{key}` longer than a stored key can '
    "be (64 characters) finds none. At most 50 keys.",
    "schema": {"type": "string", "maxLength": 1000},
    "examples": {
        "number": {"summary": "metadata.pages=12", "value": "12"},
        "string": {"summary": "metadata.author=ada", "value": "ada"},
    },
}


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The model's fields as query parameters. The handler validates the query string with the
    model itself, which costs less than FastAPI's parsing of each parameter."""
    parameters = []
    for name, field in model.model_json_schema()["properties"].items():
        if name == "metadata":
            parameters.append(METADATA_FILTER)
            continue
        field.pop("title", None)
        if "anyOf" in field:
            # Optional in the model is absent from the URL: a query string has no null.
            (kept,) = [branch for branch in field.pop("anyOf") if branch != {"type": "null"}]
            field = {**kept, **field}
        description = field.pop("description")
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": description,
                "schema": field,
            }
        )
    return parameters


def schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus: the `ApiKey` scheme on every /v1 operation, problem responses as
    `application/problem+json` only, `X-Request-ID` on every response, `Retry-After` on 429 and
    503, the rate-limit headers on every /v1 response, and content's configured length."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    document.setdefault("components", {})["securitySchemes"] = {"ApiKey": API_KEY_SCHEME}
    for name in ("DocumentCreate", "DocumentUpdate"):
        content = document["components"]["schemas"][name]["properties"]["content"]
        content["maxLength"] = app.state.settings.max_content_chars
    _exact_bounds(document)
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                operation["security"] = [{"ApiKey": []}]
            for parameter in operation.get("parameters", []):
                # `cursor` and `If-None-Match` default to "" in code, which means absent: a
                # generated client must not send that default.
                if parameter["schema"].get("default") == "":
                    del parameter["schema"]["default"]
            for status, response in operation["responses"].items():
                _shape(response, status, v1=path.startswith("/v1/"))
    app.openapi_schema = document
    return document


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _exact_bounds(node: Any) -> None:
    """FastAPI's OpenAPI model holds numeric bounds as floats: written as integers again, ±2**63
    stay exact, and a validator compares an integer with them exactly."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                _exact_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _exact_bounds(item)


def _shape(response: dict[str, Any], status: str, *, v1: bool) -> None:
    content = response.get("content", {})
    if "application/problem+json" in content:
        typed = content.pop("application/json", {})
        content["application/problem+json"].update(typed)
    headers = response.setdefault("headers", {})
    headers["X-Request-ID"] = {
        "description": "The server's id for this request (a client's own X-Request-ID is "
        "logged beside it, not used): quote it to report a problem.",
        "schema": {"type": "string"},
    }
    if v1 and status not in ("401", "431"):
        headers.update(RATE_LIMIT_HEADERS)
    if status in ("429", "503"):
        headers["Retry-After"] = {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer"},
        }
