"""Request and response shapes of the documents API, with their field limits."""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import string
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    field_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

TITLE_MAX_CHARS = 200
TAGS_MAX = 20
TAG_MAX_CHARS = 50
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX_CHARS = 64
METADATA_STRING_MAX_CHARS = 1_000
# Signed 64-bit: what JSON clients, orjson and BSON all keep exactly.
METADATA_INT_MIN = -(2**63)
METADATA_INT_MAX = 2**63 - 1
_INT64_RANGE = {"minimum": METADATA_INT_MIN, "exclusiveMaximum": 2**63}


def _unicode(text: Any) -> Any:
    # JSON's \ud800 escape decodes to a lone surrogate: not Unicode text, so no UTF-8 file,
    # BSON string or response body can hold it. Refused here, before anything is stored; before
    # a pattern too, whose engine reads no such string ("unable to parse raw data").
    if not isinstance(text, str):
        return text  # the type's own check says what it is not
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise ValueError(f"must be Unicode text: \\u{code:04x} is a lone surrogate") from None
    return text


# Titles and tags are one-line labels: no control characters (category Cc: NUL, newlines, escapes
# only ever arrive by accident or by attack) and at least one character that is not white space.
# The OpenAPI document carries this very pattern and the models check it (pydantic's Rust regex
# reads `\uXXXX`, classes and anchors as JSON Schema's ECMA 262 does), so the two cannot differ.
_CONTROL = r"\u0000-\u001f\u007f-\u009f"
_SPACE = r"\u0020\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # isspace(), less Cc
LABEL_PATTERN = f"^[{_SPACE}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"

# U+0130 (İ) is the one character whose lower case is two characters long (i and a combining
# dot): lowered as Turkish lowers it, a tag is never longer stored than sent.
_ONE_CHARACTER_LOWER = {0x130: "i"}


def normal_tag(tag: str) -> str:
    """A tag as it is stored and compared: trimmed, lower-case, no longer than it was sent, so a
    stored tag is itself a valid tag (to send back in a PATCH, or as a `tag` filter)."""
    return tag.strip().translate(_ONE_CHARACTER_LOWER).lower()


# Checked as sent, then normalised: what is stored always satisfies what the document declares.
Title = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TITLE_MAX_CHARS, pattern=LABEL_PATTERN),
    BeforeValidator(_unicode),  # last, so it runs first: before the pattern
    AfterValidator(str.strip),
    Field(
        description="Human-readable title of 1-200 characters, one line (no control "
        "characters), not only white space; stored trimmed."
    ),
]
Tag = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TAG_MAX_CHARS, pattern=LABEL_PATTERN),
    BeforeValidator(_unicode),
    AfterValidator(normal_tag),
]
MetadataKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=METADATA_KEY_MAX_CHARS),
    BeforeValidator(_unicode),
]


def _metadata_value(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One readable error for a value no type takes, instead of one per type of the union under
    pydantic's internal labels."""
    try:
        value = handler(value)
    except ValidationError as exc:
        # A string's own error (too long, a lone surrogate) is the one that applies to it.
        message = exc.errors()[0]["msg"] if isinstance(value, str) else _METADATA_VALUE_TYPES
        raise PydanticCustomError("metadata_value", message) from None
    # Exact for a float too (Python compares int and float by value); NaN and infinities fail it.
    if isinstance(value, int | float) and not METADATA_INT_MIN <= value <= METADATA_INT_MAX:
        raise PydanticCustomError("metadata_value", _METADATA_NUMBER_RANGE)
    if isinstance(value, float) and value == METADATA_INT_MIN:
        # The one float whose shortest form (-9.223372036854776e+18) is below the range: kept as
        # the integer it equals, so what is stored is written back as a valid number.
        return METADATA_INT_MIN
    return value


_METADATA_VALUE_TYPES = "must be a string, a boolean, an integer, a finite number or null"
_METADATA_NUMBER_RANGE = (
    f"a number must be within the signed 64-bit integer range, {METADATA_INT_MIN} to "
    f"{METADATA_INT_MAX}"
)
# Strict: each JSON value keeps its own type (a string of digits is no number, 1e3 no integer).
# Every number, with a fraction or an exponent or not, is within the integers' range: JSON Schema
# cannot tell 1e20 from 100000000000000000000 (one number), and every number outside the range is
# an integer (a float is from 2**52 on), which the stores could not keep exactly. Neither type
# refuses anything (_metadata_value does, after): a refused int would be taken as a float. The
# document states the range as powers of two, which a validator comparing in 64-bit floats reads
# exactly too (2**63 - 1 is 2**63 to it).
MetadataValue = Annotated[
    Annotated[
        str,
        Strict(),
        StringConstraints(max_length=METADATA_STRING_MAX_CHARS),
        BeforeValidator(_unicode),
    ]
    | StrictBool
    | Annotated[int, Strict(), WithJsonSchema({"type": "integer", **_INT64_RANGE})]
    | Annotated[float, Strict(), WithJsonSchema({"type": "number", **_INT64_RANGE})]
    | None,
    WrapValidator(_metadata_value),
]


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
        description="Up to 20 tags of 1-50 characters, one line, not only white space; stored "
        "trimmed and lower-case, repeats dropped.",
    ),
    AfterValidator(_unique),
]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    _at_most(METADATA_MAX_KEYS),
    Field(
        json_schema_extra={"maxProperties": METADATA_MAX_KEYS},
        description="Flat object of up to 50 keys; values are strings, numbers, booleans or null. "
        "A number, written with a fraction or an exponent or not, must be within the signed "
        "64-bit integer range (-2^63 to 2^63 - 1); an integer is kept exactly, any other number "
        "as the 64-bit float it reads as (1e-400 is 0).",
    ),
]
Content = Annotated[
    str,
    AfterValidator(_unicode),
    Field(
        description="The document body. Its length is bounded by the MAX_CONTENT_CHARS setting "
        "(100,000 characters unless configured otherwise)."
    ),
]


# The most bytes a character takes in a JSON string: one outside the BMP sent as ASCII escapes of
# its surrogate pair (`\ud83d\ude00`), as json.dumps sends it by default; in UTF-8 it takes 4.
_WIDEST = "\U0001f600"
JSON_CHAR_MAX_BYTES = len(json.dumps(_WIDEST)) - 2


@functools.cache
def _largest_document_without_content() -> int:
    key = [chr(0x1F600 + i) * METADATA_KEY_MAX_CHARS for i in range(METADATA_MAX_KEYS)]
    widest = {
        "title": _WIDEST * TITLE_MAX_CHARS,
        "content": "",
        "tags": [_WIDEST * TAG_MAX_CHARS] * TAGS_MAX,
        "metadata": dict.fromkeys(key, _WIDEST * METADATA_STRING_MAX_CHARS),
    }
    # Pretty-printed as widely as clients do: a line per value, indented by 8, CRLF.
    return len(json.dumps(widest, indent=8).replace("\n", "\r\n"))


def largest_document_bytes(content_chars: int) -> int:
    """The largest valid document (a create; a patch is no larger) as JSON, each field at its
    limit and each character at its widest, pretty-printed: a body limit below it would refuse a
    valid document. A number is never wider than a metadata string; only padding beyond what
    any formatter writes can pass it."""
    return _largest_document_without_content() + content_chars * JSON_CHAR_MAX_BYTES


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


# What a document's times serialise to: still a date-time to the OpenAPI document.
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


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

    @field_serializer("created_at", "updated_at", when_used="json")
    def _six_digits(self, at: datetime) -> Timestamp:
        """Always four digits of year and six fractional digits (pydantic drops them on a whole
        second; strftime drops the year's leading zeros), so that every timestamp has one length
        and the strings sort as the times do."""
        return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

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
# The highest version an imported document may carry: the largest integer every JSON client
# reads exactly, and far below the 64 bits SQLite and BSON store, which a PATCH's one more would
# have passed (its write then failed, and the writes committed with it).
VERSION_MAX = 2**53 - 1


def check_stored(doc: Document) -> Document:
    """A document read back from a file or an import carries an id this service could have made
    and consistent times; the model itself checks the shape of every field. Raises ValueError.
    (Cheap on purpose: it runs for every document at every start.)"""
    if not ID_PATTERN.fullmatch(doc.id):
        raise ValueError(f"id {doc.id[:64]!r} is not a document id")
    if doc.version > VERSION_MAX:
        raise ValueError(f"version: at most {VERSION_MAX}")
    if doc.updated_at < doc.created_at:
        raise ValueError(f"document {doc.id!r} was updated before it was created")
    for at in (doc.created_at, doc.updated_at):
        _stored_time(at)  # a ValueError outside the years 1 to 9999 in UTC
    return doc


# A time as export writes it (RFC 3339, upper-case T and Z), or with no offset, taken as UTC:
# pydantic, strict too, read "1700000000000" as a Unix time, in seconds or milliseconds by size.
_EXPORTED_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?", re.ASCII
)


def exported_time(value: Any) -> datetime:
    """An imported document's time, as export writes it; ValueError for anything else."""
    if not isinstance(value, str) or not _EXPORTED_TIME.fullmatch(value):
        raise ValueError("must be an RFC 3339 time, as export writes it: 2026-11-27T09:30:00Z")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value[:64]} is not a valid time") from None


def as_stored(doc: Document) -> Document:
    """An imported document as this service would have stored it: times in UTC whole
    milliseconds (a time without an offset taken as UTC), fields within the API's bounds and in
    its normal forms (tags trimmed, lower-case and without repeats), so that every filter and
    order sees one value, on either store, and the document can be sent back as it is. Raises
    ValueError as check_stored does."""
    # What a client sends, as the API takes it: every bound, every normal form (but the content's
    # length, which a setting bounds). ValidationError is a ValueError.
    sent = doc.model_dump(include={"title", "content", "tags", "metadata"})
    changes = DocumentCreate.model_validate(sent).model_dump()
    for name in ("created_at", "updated_at"):
        changes[name] = _stored_time(getattr(doc, name))
    return check_stored(doc.model_copy(update=changes))


_NO_OFFSET = timedelta(0)


def _stored_time(at: datetime) -> datetime:
    """`at` itself when it is already a UTC time in whole milliseconds."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    elif at.microsecond % 1000 == 0 and at.utcoffset() == _NO_OFFSET:
        return at
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{at.isoformat()} is outside the years 1 to 9999 in UTC") from None
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


# --- finding documents ------------------------------------------------------------------------

QUERY_MAX_CHARS = 200
PAGE_MAX = 100
Sort = Literal["-created_at", "created_at", "-updated_at", "updated_at"]

_WORD = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits
# The most one tokenizer step takes at once: about a millisecond even for text that decomposes
# 18-fold (U+FDFA).
WORDS_PIECE_CHARS = 1_024
# A text up to this long is tokenized where it is written (about a millisecond at worst); a
# longer one in a thread, while the event loop and the SQLite writer go on.
WORDS_INLINE_CHARS = WORDS_PIECE_CHARS
# How far back from a piece's end a character that separates words is looked for: four times
# the longest word indexed, as a word's letters may carry marks.
SEPARATOR_SEARCH_CHARS = 256
# ASCII text, most text, needs no Unicode folding: one C-level pass maps it to lower-case words
# separated by spaces.
_ASCII_WORDS = str.maketrans(
    {
        c: c.lower() if c in string.ascii_letters + string.digits else " "
        for c in map(chr, range(128))
    }
)


def words(text: str) -> list[str]:
    """The words of `text` as `q` matches them and both stores index them: runs of Unicode
    letters and digits, compared without case, accents or other marks (`Crème` is `creme`,
    mathematical bold Hello is `hello`, and a vowel sign stays inside its word)."""
    return [word for found in _words_by_piece(text) for word in found]


def _words_by_piece(text: str, folded_max: float = math.inf) -> Iterator[list[str]]:
    """The words of each piece of `text`, until the pieces folded pass `folded_max` characters
    (a word the bound cuts is left out): folding is where the cost is, and a character may fold
    into 18 (U+FDFA)."""
    if text.isascii():  # each character folds into one
        if len(text) <= folded_max:
            yield text.translate(_ASCII_WORDS).split()
        else:
            cut = int(folded_max)
            yield _words_before(text[:cut].lower(), text[cut : cut + 1])
        return
    run_cut = False  # the previous piece ended inside a run of word characters
    for number, (piece, cut) in enumerate(_pieces(text)):
        if number:
            # Let the interpreter lock go between pieces: a long text is tokenized in a thread,
            # and the event loop, waiting for the lock at each of its system calls, otherwise
            # got it back only within the switch interval.
            time.sleep(0)
        # Compatibility forms first, then case (which may need decomposing again), then no marks.
        # Marks go first (see _UNMARK): normalization sorts a run of them in time quadratic in
        # its length, and a piece of reversed marks held the lock for 2.4 ms.
        folded = _fold(piece.translate(_UNMARK))
        folded_max -= len(folded)
        within = len(folded) + int(min(folded_max, 0))
        head = folded[:within].translate(_MARKS)
        # What follows: past the bound, the text; at a cut inside a run, more of the run.
        after = folded[within:].translate(_MARKS)[:1] if folded_max < 0 else "a" * cut
        found = _words_before(head, after)
        if run_cut and found and _WORD.match(head[:1]):
            found.pop(0)  # the rest of a word cut with its piece: not a word
        yield found
        if folded_max < 0:
            return
        run_cut = cut


def _words_before(head: str, after: str) -> list[str]:
    """The words of `head`, but a last one that goes on in `after`: cut, it is not a word."""
    found = _WORD.findall(head)
    if found and _WORD.match(head[-1:]) and _WORD.match(after):
        found.pop()
    return found


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """`text` in pieces of at most WORDS_PIECE_CHARS: each step above is one C call that holds
    the interpreter lock for as long as its input, and other threads (the event loop) run
    between pieces. A piece ends where no word goes on (see _edge), so the words are those of
    the whole text. Only where the last SEPARATOR_SEARCH_CHARS characters hold no such place is
    a piece cut inside a run of word characters (True): a word longer than the index keeps,
    unless the run is mostly marks or characters that fold into several letters (½, U+FDFA)."""
    start = 0
    while len(text) - start > WORDS_PIECE_CHARS:
        end = start + WORDS_PIECE_CHARS
        search = range(end, end - SEPARATOR_SEARCH_CHARS, -1)
        cut = next((i for i in search if _edge(text[i - 1], -1) or _edge(text[i], 0)), None)
        yield text[start : cut or end], cut is None
        start = cut or end
    yield text[start:], False


@functools.lru_cache(maxsize=4096)  # a text holds few distinct characters; folding costs
def _edge(char: str, side: int) -> bool:
    """Whether `char`, folded as a text is (its marks dropped), holds no part of a word at its
    `side` (0: its first character, -1: its last), so that no word goes on across that side of
    it: a space, punctuation, most symbols, a digit between brackets (`⑴` is `(1)`), a letter
    folding into a space and a letter (U+037A: a space and an iota); not a letter or digit, a
    mark (which folds into nothing), nor a symbol folding into letters there (`™` is `tm`, `㌐`
    `キカ`)."""
    folded = _fold(char.translate(_UNMARK)).translate(_MARKS)
    return bool(folded) and not _WORD.match(folded[side])


# Every mark (Unicode category M: accents, vowel signs), for str.translate to drop. Built at
# import, from the planes that hold marks (the first two, and the 14th's variation selectors):
# a tenth of the cost of walking every code point, and never on a request.
_MARKS: dict[int, None] = dict.fromkeys(
    c
    for plane in (range(0x20000), range(0xE0000, 0xE1000))
    for c in plane
    if unicodedata.category(chr(c)).startswith("M")
)

# Every mark dropped before folding, but U+0345, which case-folds to a letter, made that letter
# (the words are the same: normalization never moves a mark past a letter). What is left to
# sort is at most a few marks of one letter's decomposition followed by U+FF9E and U+FF9F's,
# all of one class: linear, whatever the text.
_UNMARK: dict[int, str | None] = {**_MARKS, 0x345: "\u03b9"}

# What one document puts in the word index, whatever its size: its first 1 000 distinct words of
# at most 64 characters, found in its text until that passes 200 000 characters once folded
# (twice the longest content: accented letters fold into two; U+FDFA into 18). Later or longer
# words are not found by `q`; a write's tokenizing costs at most about 30 ms per text.
INDEXED_WORDS_MAX = 1_000
INDEXED_WORD_MAX_CHARS = 64
INDEXED_FOLDED_CHARS_MAX = 200_000


def document_words(title: str, content: str) -> set[str]:
    found: dict[str, None] = {}  # in the order first seen
    for piece in _words_by_piece(f"{title}\n{content}", INDEXED_FOLDED_CHARS_MAX):
        found.update(dict.fromkeys(w for w in piece if len(w) <= INDEXED_WORD_MAX_CHARS))
        if len(found) >= INDEXED_WORDS_MAX:
            break  # the rest of the text could add nothing
    return set(itertools.islice(found, INDEXED_WORDS_MAX))


# What found the words a store indexed: these rules (their version, raised with any change to
# what `words` or `document_words` find) and the Unicode of the Python running them, whose
# characters' classes and forms decide a text's words. A store indexed otherwise finds every
# document's words again (SQLiteStore._reindex).
WORDS_RULES_VERSION = 3  # 2: a piece may end after `⑴`; 3: and by the fold of each side
WORDS_RULES = f"{WORDS_RULES_VERSION} unicode {unicodedata.unidata_version}"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def millis(at: datetime) -> int:
    """Milliseconds since the epoch. Stored times are whole milliseconds, so rounding the
    float (exact to well under a millisecond until the year 9999) gives them exactly."""
    return round(at.timestamp() * 1000)


def from_millis(milliseconds: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=milliseconds)


_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,  # \d is 0-9 only
)
_FIRST = datetime.min.replace(tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)
_FOUR_YEARS = datetime(5, 1, 1) - datetime(1, 1, 1)


def _rfc3339(value: Any) -> datetime:
    """An RFC 3339 time with its offset, in UTC, rounded up to the millisecond: stored times are
    whole milliseconds, so `t >= x` and `t < x` mean the same for x and its ceiling. A leap
    second is the instant after the second before it; a time beyond what Python represents
    (9999-12-31T23:59:59.9999Z rounded up) is the last one it does, and one before it (year 0)
    is the first."""
    found = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError("must be an RFC 3339 time with an offset, e.g. 2026-11-27T09:30:00Z")
    day, minute, second, fraction, offset = found.groups()
    leap = second == "60"
    # Python's years start at 1, RFC 3339's at 0: read year 0 four years on (both leap years,
    # so the same calendar) and step back.
    back = _FOUR_YEARS if day.startswith("0000") else timedelta()
    try:
        at = datetime.fromisoformat(
            f"{day.replace('0000', '0004', back > timedelta())}T{minute}:"
            f"{'59' if leap else second}{'+00:00' if offset in 'Zz' else offset}"
        )
    except ValueError:
        raise ValueError("is not a valid time (RFC 3339, e.g. 2026-11-27T09:30:00Z)") from None
    # Whole milliseconds, plus one if any digit after them is not zero: the ceiling, exactly.
    digits = "0" if leap else fraction or "0"  # nothing is stored within a leap second
    ceiling = int(digits[:3].ljust(3, "0")) + (digits[3:].strip("0") != "") + 1000 * leap
    try:
        return (at + timedelta(milliseconds=ceiling)).astimezone(UTC) - back
    except OverflowError:
        return _FIRST if at.year <= 4 else _LAST


# RFC 3339 with an offset, e.g. `2026-11-27T09:30:00Z`; in a URL, `+` must be sent as `%2B`.
Time = Annotated[datetime, BeforeValidator(_rfc3339), Field(examples=["2026-11-27T09:30:00Z"])]


_EDGE = 2.0**63  # a metadata number lies in [-2**63, 2**63): the document says so exactly


def json_float(text: str) -> float:
    """A JSON number with a fraction or an exponent, as a body and a query read it: the float it
    reads as, but one written on either side of a bound of the metadata range reads as the float
    on that side (9223372036854775807.0 is within, though its nearest float, 2^63, is not)."""
    value = float(text)
    if value == _EDGE and Decimal(text) < _EDGE:
        return math.nextafter(_EDGE, 0)  # within: the float below the bound
    if value == -_EDGE and Decimal(text) < -_EDGE:
        return -2 * _EDGE  # beyond, and refused as such
    return value


def metadata_values(value: str) -> tuple[str | bool | int | float, ...]:
    """What `metadata.KEY=VALUE` finds: the string VALUE, and the JSON number or boolean it
    spells (`12` finds 12, 12.0 and "12"; `true` finds true and "true")."""
    if value in ("true", "false"):
        return value, value == "true"
    if _JSON_NUMBER.fullmatch(value):
        # Read as a JSON body's number is read; one outside the range no stored number equals.
        number = json_float(value) if any(c in value for c in ".eE") else int(value)
        if METADATA_INT_MIN <= number <= METADATA_INT_MAX:
            return value, number
    return (value,)


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_QUERY_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,18})")


def _query_integer(value: Any) -> Any:
    """An integer in a query string is spelled as JSON spells it: `5`, never `5.0`, `+5`, `5_0`
    or ` 5`, which int() and pydantic's lax mode would each take."""
    if isinstance(value, str):
        if not _QUERY_INTEGER.fullmatch(value):
            raise ValueError("must be an integer in decimal digits, e.g. 20")
        return int(value)
    return value


class DocumentQuery(BaseModel):
    """The query parameters of a listing; every filter must hold for a document to be listed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # No lone surrogate can reach these: admission refuses a query that is not UTF-8 first.
    q: Annotated[
        Annotated[str, StringConstraints(min_length=1, max_length=QUERY_MAX_CHARS)] | None,
        # What a word is (after Unicode folding) is not something a JSON Schema pattern can
        # say, so the length bounds `q` (at most 100 words) and any text is a valid `q`.
        Field(
            description="Full-text search, 1-200 characters. A document matches when every "
            "word of `q` (a run of letters and digits) is a whole word of its title or content, "
            "ignoring case and accents (`creme` finds `Crème`; `reven` does not find "
            "`revenue`). A `q` without any word (`!!!`) finds every document; a word longer "
            "than 64 characters finds none (see the word index's bounds).",
            examples=["quarterly revenue"],
        ),
    ] = None
    tag: Annotated[
        list[Tag],
        _at_most(TAGS_MAX),
        Field(
            max_length=TAGS_MAX,
            description="Repeatable: documents carrying every given tag (compared lower-case).",
            examples=[["finance", "q3"]],
        ),
        AfterValidator(_unique),
    ] = []
    # A key of any length, bounded only by the request head: OpenAPI cannot state a bound on
    # part of a parameter's name, and a client filtering on a key no document can hold expects
    # what a too-long `q` word gets, nothing found, not a 422 the document never announced.
    metadata: Annotated[
        dict[
            Annotated[str, StringConstraints(min_length=1)],
            Annotated[str, StringConstraints(max_length=METADATA_STRING_MAX_CHARS)],
        ],
        _at_most(METADATA_MAX_KEYS),
        Field(max_length=METADATA_MAX_KEYS),
    ] = {}
    created_after: Time | None = Field(default=None, description="Created at or after this time.")
    created_before: Time | None = Field(default=None, description="Created before this time.")
    updated_after: Time | None = Field(
        default=None, description="Last changed at or after this time."
    )
    updated_before: Time | None = Field(default=None, description="Last changed before this time.")
    sort: Sort = Field(
        default="-created_at",
        description="Order of the listing, newest first by default; ties are broken by id, "
        "so every order is total.",
        examples=["-updated_at"],
    )
    limit: Annotated[int, BeforeValidator(_query_integer)] = Field(
        default=20, ge=1, le=PAGE_MAX, description="Page size, 1-100.", examples=[50]
    )
    cursor: str = Field(
        default="",
        max_length=512,
        description="`next_cursor` of the previous page, with the same filters and sort.",
    )

    @model_validator(mode="before")
    @classmethod
    def _metadata_parameters(cls, data: Any) -> Any:
        """`metadata.KEY=VALUE` parameters become the `metadata` filter; a `metadata` parameter
        is left to be refused."""
        if not isinstance(data, dict) or "metadata" in data:
            return data
        if not any(_is_metadata_filter(k) for k in data):
            return data
        rest = {k: v for k, v in data.items() if not _is_metadata_filter(k)}
        return {**rest, "metadata": {k[9:]: v for k, v in data.items() if _is_metadata_filter(k)}}

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> DocumentQuery:
        """From a query string's (name, value) pairs: `tag` may repeat; any other parameter
        given twice becomes a list, which its field refuses."""
        values: dict[str, list[str]] = {}
        for name, value in pairs:  # appended: linear in the pairs however often a name repeats
            values.setdefault(name, []).append(value)
        return cls.model_validate(
            {name: vs if name == "tag" or len(vs) > 1 else vs[0] for name, vs in values.items()}
        )

    @property
    def sort_field(self) -> Literal["created_at", "updated_at"]:
        return "updated_at" if self.sort.endswith("updated_at") else "created_at"

    @property
    def descending(self) -> bool:
        return self.sort.startswith("-")

    def position(self, doc: Document) -> tuple[int, str]:
        """Where `doc` sits in this query's order: its sort time in milliseconds, then its id
        (what a store continues a listing from)."""
        return millis(getattr(doc, self.sort_field)), doc.id

    @cached_property
    def words(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(words(self.q))) if self.q else ()

    @cached_property
    def metadata_values(self) -> tuple[tuple[str, tuple[str | bool | int | float, ...]], ...]:
        return tuple((key, metadata_values(value)) for key, value in self.metadata.items())

    @cached_property
    def binding(self) -> bytes:
        """What a cursor is bound to: the filters and the sort, as they are compared (so
        `q=Crème` and `q=creme` are one query), not the page size."""
        return orjson.dumps(
            [
                sorted(self.words),
                sorted(self.tag),
                sorted(self.metadata.items()),
                [
                    None if at is None else at.isoformat()
                    for at in (
                        self.created_after,
                        self.created_before,
                        self.updated_after,
                        self.updated_before,
                    )
                ],
                self.sort,
            ]
        )


def _is_metadata_filter(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("metadata.")


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
