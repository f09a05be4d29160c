"""The `DocumentStore` contract, the logic both stores share, and the domain errors.

Nothing here knows about HTTP or about either engine: `sqlite_store` (embedded) and `mongo_store`
(scale-out) implement the contract.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio.to_thread
import orjson

from logging_config import clip
from models import (
    METADATA_MAX_KEYS,
    VERSION_MAX,
    WORDS_INLINE_CHARS,
    Document,
    DocumentCreate,
    DocumentQuery,
    DocumentUpdate,
)
from ratelimit import StoreWork

log = logging.getLogger("documents.store")
T = TypeVar("T")

IDEMPOTENCY_TTL = timedelta(hours=24)
PAGE_MAX_BYTES = 1024 * 1024  # the documents of one page, as sent
Key = tuple[int, str]  # a time in milliseconds since the epoch, then the id: every order is total

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """Millisecond precision: what every backend can store (BSON dates are milliseconds)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# --- errors -----------------------------------------------------------------------------------


class StoreError(Exception):
    """Base of every error a store raises; the API maps each subclass to one status."""


class DocumentNotFound(StoreError):
    def __init__(self, doc_id: str) -> None:
        super().__init__(f"No document with id {doc_id[:64]!r}.")
        self.doc_id = doc_id


class PreconditionFailed(StoreError):
    def __init__(self, doc_id: str, current_version: int) -> None:
        super().__init__(
            f"If-Match or If-None-Match does not hold for document {doc_id!r}, now at version "
            f"{current_version}; fetch it again."
        )
        self.doc_id = doc_id
        self.current_version = current_version


def stale(doc_id: str, current_version: int) -> PreconditionFailed:
    """The error for a failed If-Match or If-None-Match, logged where it is raised."""
    log.info("document.precondition_failed", extra={"document_id": doc_id})
    return PreconditionFailed(doc_id, current_version)


class IdempotencyConflict(StoreError):
    def __init__(self, key: str, reason: str = "with a different body") -> None:
        super().__init__(f"This Idempotency-Key was already used {reason}.")
        self.key = key


class DocumentInvalid(StoreError):
    """A change that is valid on its own but not against the stored document."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.doc_id = ""  # which of several documents, where a call takes several


class StoreUnavailable(StoreError):
    """The store cannot serve right now (disk failure, database unreachable)."""


class ReadStopped(StoreUnavailable):
    """An operation ran into its time limit while the database worked on it: what it cost is
    the caller's, and a read's is charged to its key as an answered read's time is."""


class StoreAuthenticationFailed(StoreUnavailable):
    """The database refused the configured credentials."""


class StoreCorrupt(StoreError):
    """A data file this version cannot use: damaged, another application's, a newer version's."""

    def __init__(self, path: Path, reason: str) -> None:
        # The reason may quote the file (a table's name, a key): a line's worth of it, not all.
        super().__init__(f"data file {path} refused ({clip(reason)}); it was left untouched")
        self.path = path


async def find_words(find: Callable[..., T], chars: int, *args: Any) -> T:
    """`find(*args)`: a document's words for the index, from `chars` characters of text. Short
    text (about a millisecond at worst) where asked; longer in a thread, once the key's lane
    lets it, for on the event loop or in the SQLite writer it would hold back everyone else.
    Either way its CPU time is the request's store work, which its key pays for."""
    if chars <= WORDS_INLINE_CHARS:
        words, cpu = on_cpu(find, *args)
    else:
        await StoreWork.before_long_work()
        words, cpu = await anyio.to_thread.run_sync(on_cpu, find, *args)
    StoreWork.add(cpu)
    return words


def on_cpu(work: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`work(*args)` and the CPU seconds this thread spent on it: what a key is charged, not
    the time it waited for the processor or the interpreter lock, which other keys' work (their
    words found in a thread) may hold."""
    started = time.thread_time()
    return work(*args), time.thread_time() - started


# --- contract ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdempotencyKey:
    """An `Idempotency-Key` header value, scoped to the API key that sent it."""

    scope: str
    key: str


class DocumentStore(Protocol):
    """What the API needs from a backend. Methods are async; each store decides what to offload.
    Every method may raise StoreUnavailable (the disk or the database cannot serve right now:
    nothing was changed, retrying later is safe); the others each method names."""

    backend: str

    async def create(
        self, data: DocumentCreate, *, idempotency: IdempotencyKey | None = None
    ) -> tuple[Document, bool]:
        """Return the new document once durable, or the original one and True for a replayed
        key. Raises IdempotencyConflict (the key was used with another body, or for a document
        since deleted)."""
        ...

    async def get(self, doc_id: str) -> Document:
        """The durable document. Raises DocumentNotFound."""
        ...

    async def page(
        self, query: DocumentQuery, *, limit: int, after: Key | None = None
    ) -> tuple[list[Document], Key | None]:
        """Up to `limit` documents matching `query`, in its order, strictly after the position
        `after` (the sort time in milliseconds and the id); the second item is the next
        `after`, None on the last page. A page holds `limit` documents unless it is the last,
        or the next document would take it past about PAGE_MAX_BYTES (a store may stop there,
        so that a listing of large documents reads no more than its page can send)."""
        ...

    async def update(
        self, doc_id: str, patch: DocumentUpdate, *, if_version: int | None = None
    ) -> Document:
        """Merge `patch` (only at `if_version`, if given). Raises DocumentNotFound,
        PreconditionFailed, DocumentInvalid (the merge would break a limit)."""
        ...

    async def delete(self, doc_id: str, *, if_version: int | None = None) -> None:
        """Raises DocumentNotFound, PreconditionFailed."""
        ...

    async def import_documents(self, docs: Sequence[Document]) -> int:
        """Insert each of `docs` as it is (id and timestamps kept) unless its id exists; how many
        were inserted. Raises DocumentInvalid, naming the document, for one it cannot take."""
        ...

    def export_documents(self) -> AsyncIterator[Document]:
        """Every document, oldest first."""
        ...

    async def count(self) -> int: ...

    async def cursor_secret(self) -> bytes:
        """32 random bytes that sign cursors, made once (atomically) with the data and the same
        for every process that shares it."""
        ...

    async def check(self) -> None:
        """Raise StoreUnavailable unless the store can be read and written right now."""
        ...

    async def close(self) -> None: ...


# --- shared document logic --------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FROM_CROCKFORD = str.maketrans(_CROCKFORD, "0123456789abcdefghijklmnopqrstuv")  # to int(_, 32)


class IdGenerator:
    """48 bits of milliseconds then 80 random bits, in Crockford base32 (26 URL-safe chars).

    Ids sort by creation time, which is what newest-first pages rely on; within one millisecond
    a later id is the previous one (or `after`, another process's) plus a random step, so order
    holds and ids stay unguessable.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self, now: datetime, after: str | None = None) -> str:
        millisecond = int(now.timestamp() * 1000)
        value = (millisecond << 80) | secrets.randbits(80)
        theirs = int(after.translate(_FROM_CROCKFORD), 32) if after else 0
        with self._lock:
            # Only an id of this very millisecond: an imported one may hold any bits at all.
            last = max(self._last, theirs if theirs >> 80 == millisecond else 0)
            if value <= last:
                value = last + 1 + secrets.randbits(40)
            self._last = value
        return "".join(_CROCKFORD[value >> shift & 31] for shift in range(125, -1, -5))


def new_document(data: DocumentCreate, doc_id: str, now: datetime) -> Document:
    """Version 1 of a document, created and updated `now`."""
    return Document(id=doc_id, **data.model_dump(), created_at=now, updated_at=now, version=1)


def fingerprint(data: DocumentCreate) -> str:
    """Same validated body, same fingerprint, whatever the whitespace or key order sent (the
    metadata's too: a JSON object is unordered)."""
    ordered = data.model_copy(update={"metadata": dict(sorted(data.metadata.items()))})
    return hashlib.sha256(ordered.model_dump_json().encode()).hexdigest()


def apply_patch(doc: Document, patch: DocumentUpdate, now: datetime) -> Document:
    """RFC 7386 merge of `patch` into `doc`; returns `doc` itself when nothing changes."""
    fields = patch.model_fields_set
    changes: dict[str, Any] = {name: getattr(patch, name) for name in fields & {"title", "content"}}
    if "tags" in fields:
        changes["tags"] = patch.tags or []
    if "metadata" in fields:
        merged = dict(doc.metadata) if patch.metadata is not None else {}
        for key, value in (patch.metadata or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        if len(merged) > METADATA_MAX_KEYS:
            raise DocumentInvalid(
                "metadata",
                f"metadata would have {len(merged)} keys; at most {METADATA_MAX_KEYS}",
            )
        changes["metadata"] = merged
    # Compared as JSON: 1 == True == 1.0 in Python, but a patch from 1 to true changes the document.
    changes = {k: v for k, v in changes.items() if orjson.dumps(v) != orjson.dumps(getattr(doc, k))}
    if not changes:
        return doc
    if doc.version == VERSION_MAX:  # an import's: one more, export wrote what import refuses
        raise DocumentInvalid("version", f"at its most ({VERSION_MAX}): it cannot change again")
    # Never before its creation, which an import may date in the future: `import` refuses a
    # document updated before it was created, and so refused what `export` wrote of it.
    updated = max(now, doc.created_at)
    return doc.model_copy(update={**changes, "updated_at": updated, "version": doc.version + 1})
