"""RFC 9457 problem documents: the one shape every error takes, the HTTP-layer errors, and the
response they become.

Each kind of problem is a `ProblemType` (status, slug, what the API documents say of it). HTTP-layer
errors are `HTTPProblem`s: Starlette `HTTPException`s, which FastAPI re-raises untouched even
while it reads a body, so a middleware or the JSON parser can raise one and the error map answers
it. Every body is built through the `Problem` model, so the schema and the body cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.exceptions import HTTPException
from starlette.responses import Response

from logging_config import request_id_var
from models import Problem
from server import MAX_HEAD_BYTES, MAX_HEADERS

MEDIA_TYPE = "application/problem+json"
# What a 503 asks the client to wait before trying again.
RETRY_AFTER_SECONDS = "5"

# Fixed here rather than taken from http.HTTPStatus, whose phrases differ between Pythons.
TITLES = {
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
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class ProblemType:
    status: int
    slug: str
    description: str  # what the OpenAPI document says of this problem

    @property
    def title(self) -> str:
        return TITLES.get(self.status, "Error")

    def response(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> Response:
        """This problem as a response; the request id comes from the current context."""
        body = Problem.model_validate(
            {
                "type": f"urn:documents:problem:{self.slug}",
                "title": self.title,
                "status": self.status,
                "detail": detail,
                "request_id": request_id_var.get() or "",
                "errors": errors,
            }
        )
        return Response(
            body.model_dump_json(exclude_none=True), self.status, headers, media_type=MEDIA_TYPE
        )


class HTTPProblem(HTTPException):
    """An HTTP-layer error: its class names the problem, the instance says what happened."""

    kind: ClassVar[ProblemType]

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(self.kind.status, detail, headers)


class MalformedBody(HTTPProblem):
    kind = ProblemType(400, "malformed-json", "Malformed JSON body.")


class MalformedTarget(HTTPProblem):
    kind = ProblemType(
        400, "malformed-target", "A path or query that is not percent-encoded UTF-8 text."
    )


class InvalidCursor(HTTPProblem):
    kind = ProblemType(400, "invalid-cursor", "A cursor that does not verify.")


class Unauthorized(HTTPProblem):
    kind = ProblemType(401, "unauthorized", "Send a valid key in the X-API-Key header.")


class Forbidden(HTTPProblem):
    kind = ProblemType(
        403, "forbidden", "The key is read-only (`name:key:read`) and this operation writes."
    )


class BodyTimeout(HTTPProblem):
    kind = ProblemType(408, "body-timeout", "The body did not arrive within BODY_TIMEOUT_SECONDS.")


class BodyTooLarge(HTTPProblem):
    kind = ProblemType(413, "body-too-large", "Request body over MAX_BODY_BYTES.")


class BodyBufferFull(HTTPProblem):
    kind = ProblemType(
        503,
        "body-buffer-full",
        "Request bodies being received already fill MAX_BUFFERED_BODY_BYTES, or the key's "
        "quarter of it; see Retry-After.",
    )


class UnsupportedMediaType(HTTPProblem):
    kind = ProblemType(415, "unsupported-media-type", "Body is not JSON.")


class RateLimited(HTTPProblem):
    kind = ProblemType(429, "rate-limited", "Rate limit exceeded; see Retry-After.")


# What Starlette itself raises (no route, wrong method), store and rate-limit errors (main maps
# their classes), the server's own refusal, and what nothing else names.
NOT_FOUND = ProblemType(404, "not-found", "No such document (or route).")
METHOD_NOT_ALLOWED = ProblemType(405, "method-not-allowed", "Method not allowed on this path.")
IDEMPOTENCY_CONFLICT = ProblemType(
    409, "idempotency-conflict", "Idempotency-Key reused with a different body."
)
# A valid request that what is stored cannot take (a PATCH taking metadata past 50 keys): a
# conflict with the resource's current state (RFC 9110; schemathesis expects 409 of it too), so
# that 422 keeps meaning what the OpenAPI document itself refuses.
DOCUMENT_CONFLICT = ProblemType(
    409,
    "document-conflict",
    "The request is valid but conflicts with what is stored (a PATCH taking metadata past 50 "
    "keys).",
)
PRECONDITION_FAILED = ProblemType(
    412, "precondition-failed", "If-Match or If-None-Match does not hold for the current ETag."
)
VALIDATION = ProblemType(422, "validation-error", "A field failed validation; `errors` names each.")
HEAD_TOO_LARGE = ProblemType(
    431,
    "request-header-fields-too-large",
    f"Request head over {MAX_HEAD_BYTES // 1024} KiB or {MAX_HEADERS} headers (refused by the "
    "server before the API sees it).",
)
STORE_UNAVAILABLE = ProblemType(503, "store-unavailable", "The store cannot serve right now.")
LIMITER_UNAVAILABLE = ProblemType(
    503, "rate-limit-store-unavailable", "The rate-limit store cannot answer right now."
)
STOPPED = ProblemType(
    503, "stopped", "The service stopped before it answered; the request may have been carried out."
)


def for_status(status: int) -> ProblemType:
    """A problem type for an HTTP error nothing here names (Starlette's own, say)."""
    return ProblemType(status, "http-error", TITLES.get(status, "Error"))


INTERNAL = ProblemType(500, "internal-error", "A bug; the detail says nothing of internals.")

# Every problem the API can answer with, for the OpenAPI descriptions: each HTTP-layer error,
# then the rest. main's DOMAIN_PROBLEMS may only map to these (a test holds it to that).
ALL: tuple[ProblemType, ...] = (
    *(cls.kind for cls in HTTPProblem.__subclasses__()),
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    IDEMPOTENCY_CONFLICT,
    DOCUMENT_CONFLICT,
    PRECONDITION_FAILED,
    VALIDATION,
    HEAD_TOO_LARGE,
    STORE_UNAVAILABLE,
    LIMITER_UNAVAILABLE,
    STOPPED,
    INTERNAL,
)
