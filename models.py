"""Request and response shapes of the documents API, with their field limits."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

TITLE_MAX_CHARS = 200
TAGS_MAX = 20
TAG_MAX_CHARS = 50
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX_CHARS = 64
METADATA_STRING_MAX_CHARS = 1_000
# Signed 64-bit: what JSON clients, orjson and BSON all keep exactly.
METADATA_INT_MIN = -(2**63)
METADATA_INT_MAX = 2**63 - 1


def _unicode(text: str) -> str:
    # JSON's \ud800 escape decodes to a lone surrogate: not Unicode text, so no UTF-8 file,
    # BSON string or response body can hold it. Refused here, before anything is stored.
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise ValueError(f"must be Unicode text: \\u{code:04x} is a lone surrogate") from None
    return text


def _printable(text: str) -> str:
    # Titles and tags are one-line labels: control characters (NUL, newlines, escapes) only
    # ever arrive by accident or by attack.
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise ValueError("must not contain control characters")
    return text


Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_MAX_CHARS),
    AfterValidator(_unicode),
    AfterValidator(_printable),
    Field(description="Human-readable title, 1-200 characters after trimming, one line."),
]
Tag = Annotated[
    str,
    StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=TAG_MAX_CHARS),
    AfterValidator(_unicode),
    AfterValidator(_printable),
]
MetadataKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=METADATA_KEY_MAX_CHARS),
    AfterValidator(_unicode),
]
MetadataValue = (
    Annotated[
        str, StringConstraints(max_length=METADATA_STRING_MAX_CHARS), AfterValidator(_unicode)
    ]
    | bool
    | int
    | Annotated[float, Field(allow_inf_nan=False)]
    | None
)


def _bounded_ints(metadata: dict[str, Any]) -> dict[str, Any]:
    # Checked here, not on the int branch: a failed int there would fall through to float.
    for key, value in metadata.items():
        if isinstance(value, int) and not METADATA_INT_MIN <= value <= METADATA_INT_MAX:
            raise ValueError(f"metadata[{key!r}] is outside the 64-bit integer range")
    return metadata


def _at_most(limit: int) -> BeforeValidator:
    """Refuse an over-long list or object before validating any of its items: a body of 60 000
    items must cost one error, not 60 000 of them."""

    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} items, not {len(value)}")
        return value

    return BeforeValidator(check)


def _unique(tags: list[str]) -> list[str]:
    """Drop repeats after normalisation, keeping the first occurrence's position."""
    return list(dict.fromkeys(tags))


Tags = Annotated[
    list[Tag],
    _at_most(TAGS_MAX),
    Field(
        max_length=TAGS_MAX,
        description="Up to 20 tags of 1-50 characters; stored lower-case, repeats dropped.",
    ),
    AfterValidator(_unique),
]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    _at_most(METADATA_MAX_KEYS),
    Field(
        max_length=METADATA_MAX_KEYS,
        description="Flat object of up to 50 keys; values are strings, numbers, booleans or null.",
    ),
    AfterValidator(_bounded_ints),
]
Content = Annotated[
    str,
    AfterValidator(_unicode),
    Field(
        description="The document body. Its length is bounded by the MAX_CONTENT_CHARS setting "
        "(100,000 characters unless configured otherwise)."
    ),
]


# More unknown fields than this are one error, not one each: a body of many unknown keys would
# otherwise cost building errors that are never shown.
UNKNOWN_FIELDS_REPORTED = 20


def _few_unknown_fields(model: type[BaseModel], data: Any) -> Any:
    if isinstance(data, dict) and len(data) > len(model.model_fields) + UNKNOWN_FIELDS_REPORTED:
        unknown = [k for k in data if k not in model.model_fields]
        shown = ", ".join(repr(str(k)[:64]) for k in unknown[:5])
        raise ValueError(f"{len(unknown)} unknown fields, such as {shown}")
    return data


class DocumentCreate(BaseModel):
    """What a client sends to create a document."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "title": "Quarterly report",
                    "content": "Revenue grew 12% quarter on quarter.",
                    "tags": ["finance", "q3"],
                    "metadata": {"author": "ada", "pages": 12},
                }
            ]
        },
    )

    title: Title
    content: Content
    tags: Tags = []
    metadata: Metadata = {}

    @model_validator(mode="before")
    @classmethod
    def _bounded_errors(cls, data: Any) -> Any:
        return _few_unknown_fields(cls, data)


class DocumentUpdate(BaseModel):
    """A JSON merge patch (RFC 7386): absent fields stay, `tags` is replaced whole,
    `metadata` merges key by key and a `null` value removes that key."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"title": "Quarterly report (final)", "tags": ["final"]}]},
    )

    # Optional but not nullable: in a merge patch null means "remove", and a document cannot
    # lose these two (null is refused as not a string, and the schema says so).
    title: Title = Field(default=None)  # type: ignore[assignment]  # None means absent only
    content: Content = Field(default=None)  # type: ignore[assignment]  # None means absent only
    tags: Tags | None = None
    metadata: Metadata | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded_errors(cls, data: Any) -> Any:
        return _few_unknown_fields(cls, data)


class Document(BaseModel):
    """A stored document as the API returns it."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "01JDQ7Z8X4M2N6P9R3T5V7W9YB",
                    "title": "Quarterly report",
                    "content": "Revenue grew 12% quarter on quarter.",
                    "tags": ["finance", "q3"],
                    "metadata": {"author": "ada", "pages": 12},
                    "created_at": "2026-11-27T09:30:00.000000Z",
                    "updated_at": "2026-11-27T09:30:00.000000Z",
                    "version": 1,
                }
            ]
        },
    )

    id: str = Field(description="Server-generated, URL-safe, unguessable; sorts by creation time.")
    title: str
    content: str
    tags: list[str]
    metadata: dict[str, str | bool | int | float | None]
    created_at: datetime = Field(description="ISO 8601, UTC.")
    updated_at: datetime = Field(description="ISO 8601, UTC.")
    version: int = Field(ge=1, description="Starts at 1 and grows by one on every change.")

    @cached_property
    def json_bytes(self) -> bytes:
        """The response body, serialised once per version: the embedded store hands out the
        same frozen instance on every read, so a hot document costs no encoding at all."""
        return self.__pydantic_serializer__.to_json(self)

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Document:
        copy = super().model_copy(update=update, deep=deep)
        # model_copy copies __dict__, cached body included: a changed copy must encode anew.
        copy.__dict__.pop("json_bytes", None)
        return copy


ID_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")  # Crockford base32, as ids are made


def check_stored(doc: Document) -> Document:
    """A document read back from a file or an import carries an id this service could have made
    and consistent times; the model itself checks the shape of every field. Raises ValueError.
    (Cheap on purpose: it runs for every document at every start.)"""
    if not ID_PATTERN.fullmatch(doc.id):
        raise ValueError(f"id {doc.id[:64]!r} is not a document id")
    if doc.updated_at < doc.created_at:
        raise ValueError(f"document {doc.id!r} was updated before it was created")
    return doc


class DocumentPage(BaseModel):
    """One page of a newest-first listing."""

    items: list[Document]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class ProblemFieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the bad value is, e.g. ['body', 'title'].")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem document; every error response has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:documents:problem:not-found",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "No document with id '01JDQ7Z8X4M2N6P9R3T5V7W9YB'.",
                    "request_id": "c815a78dc41cfb350000000000000007",
                }
            ]
        }
    )

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    errors: list[ProblemFieldError] | None = None
