"""Document stores: the `DocumentStore` contract, the embedded TinyDB store and domain errors.

Nothing here knows about HTTP. The TinyDB store keeps every document in memory (the file is parsed
once, at open) and makes each write durable before it returns:

* `documents.json` is a TinyDB database (``TinyDB(path)`` opens it). It is rewritten only whole and
  atomically: temp file, fsync, ``os.replace``, fsync of the directory.
* `documents.journal` receives every change as one checksummed line, appended and fdatasync'ed
  before the write is acknowledged. Concurrent writers share one fdatasync (group commit).
  When the journal outgrows the database file it is folded into it (compaction), and it is folded
  at open (if it holds anything) and at close, so after a clean shutdown the TinyDB file alone
  holds everything.
* `documents.lock` carries an exclusive ``flock``: one process owns a data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import logging
import os
import secrets
import stat
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread
import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from tinydb.storages import Storage

from index import DocumentIndex, Key
from models import (
    METADATA_MAX_KEYS,
    Document,
    DocumentCreate,
    DocumentQuery,
    DocumentUpdate,
    check_stored,
    document_words,
)

log = logging.getLogger("documents.store")

IDEMPOTENCY_TTL = timedelta(hours=24)
DATA_FILE = "documents.json"
JOURNAL_FILE = "documents.journal"
LOCK_FILE = "documents.lock"
CURSOR_KEY_FILE = "cursor.key"
# Fold the journal into the database once it is larger than the database itself (and at least
# this big): compaction then costs O(1) amortised per write, whatever the number of documents.
COMPACT_MIN_BYTES = 4 * 1024 * 1024

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
            f"If-Match does not match document {doc_id!r}, now at version {current_version}; "
            "fetch it again."
        )
        self.doc_id = doc_id
        self.current_version = current_version


def stale(doc_id: str, current_version: int) -> PreconditionFailed:
    """The error for a stale If-Match, logged where it is raised."""
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


class StoreUnavailable(StoreError):
    """The store cannot serve right now (disk failure, database unreachable)."""


class StoreAuthenticationFailed(StoreUnavailable):
    """The database refused the configured credentials."""


class StoreCorrupt(StoreError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"data file {path} is corrupt ({reason}); it was left untouched")
        self.path = path


class StoreLocked(StoreError):
    def __init__(self, data_dir: Path, lock_path: Path) -> None:
        super().__init__(
            f"data directory {data_dir} is in use by another process "
            f"(lock file {lock_path} is held); one process owns a data directory"
        )
        self.lock_path = lock_path


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
        `after`, None on the last page. A page may hold fewer than `limit` (even none) while
        more follow: only a None `after` ends a walk."""
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

    async def import_document(self, doc: Document) -> bool:
        """Insert `doc` as it is (id and timestamps kept) unless its id exists; True if inserted."""
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


class IdGenerator:
    """48 bits of milliseconds then 80 random bits, in Crockford base32 (26 URL-safe chars).

    Ids sort by creation time, which is what newest-first pages rely on; within one millisecond
    a later id is the previous one plus a random step, so order holds and ids stay unguessable.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self, now: datetime) -> str:
        value = (int(now.timestamp() * 1000) << 80) | secrets.randbits(80)
        with self._lock:
            if value <= self._last:
                value = self._last + 1 + secrets.randbits(40)
            self._last = value
        chars = []
        for _ in range(26):
            chars.append(_CROCKFORD[value & 31])
            value >>= 5
        return "".join(reversed(chars))


def new_document(data: DocumentCreate, doc_id: str, now: datetime) -> Document:
    """Version 1 of a document, created and updated `now`."""
    return Document(id=doc_id, **data.model_dump(), created_at=now, updated_at=now, version=1)


def fingerprint(data: DocumentCreate) -> str:
    """Same validated body, same fingerprint, whatever the whitespace or key order sent."""
    return hashlib.sha256(data.model_dump_json().encode()).hexdigest()


def apply_patch(doc: Document, patch: DocumentUpdate, now: datetime) -> Document:
    """RFC 7386 merge of `patch` into `doc`; returns `doc` itself when nothing changes."""
    changes: dict[str, Any] = {}
    fields = patch.model_fields_set
    if "title" in fields and patch.title != doc.title:
        changes["title"] = patch.title
    if "content" in fields and patch.content != doc.content:
        changes["content"] = patch.content
    if "tags" in fields and (patch.tags or []) != doc.tags:
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
        if merged != doc.metadata:
            changes["metadata"] = merged
    if not changes:
        return doc
    return doc.model_copy(update={**changes, "updated_at": now, "version": doc.version + 1})


# --- TinyDB store -----------------------------------------------------------------------------


class IdempotencyRecord(BaseModel):
    scope: str
    key: str
    fingerprint: str
    document_id: str
    created_at: datetime


class _JournalEntry(BaseModel):
    table: str
    id: str
    value: dict[str, Any] | None


_SNAPSHOT = TypeAdapter(dict[str, dict[str, Any]])
_DOCUMENTS = "documents"
_IDEMPOTENCY = "idempotency"
# Neither blocks on a FIFO nor follows a link: the store reads and writes only regular files.
_NO_SURPRISES = os.O_NOFOLLOW | os.O_NONBLOCK


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a nearly full disk): carry on until all is written
    or the kernel reports why not."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _require_regular(path: Path) -> None:
    """A path the store owns is a regular file or absent: anything else (a directory, a FIFO
    that would hang a read, a link, even a dangling one) is damage to report, never to replace."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise StoreCorrupt(path, f"{kind}; the store only uses regular files it wrote")


def _objects_opened(raw: bytes) -> int:
    """How many `"key":{` (or `"key": {`) the text holds outside strings, where a quote is
    always escaped."""
    return sum(
        raw.count(b'"' + sep + b"{") - raw.count(b'\\"' + sep + b"{") for sep in (b":", b": ")
    )


def _objects_parsed(tables: dict[str, dict[str, Any]]) -> int:
    """The same count in what was parsed: every table, every record, every record's object
    member (a document's metadata): the only objects this store writes."""
    opened = 0
    for records in tables.values():
        opened += 1 + len(records)
        for record in records.values():
            if isinstance(record, dict):
                opened += sum(isinstance(value, dict) for value in record.values())
    return opened


def _read_regular(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | _NO_SURPRISES)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreCorrupt(path, "not a regular file")
        return fh.read()


class DurableJSONStorage(Storage):
    """A TinyDB storage that parses with orjson and replaces the file atomically and durably.

    Unlike TinyDB's `JSONStorage` it never truncates the live file in place, so a crash at any
    instant leaves either the old or the new database, never a torn one.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.size = 0  # bytes of the database as last read or written

    def read(self) -> dict[str, dict[str, Any]] | None:
        raw = _read_regular(self.path)
        if raw is None:
            return None
        self.size = len(raw)
        # We only ever write complete databases, so an empty file is damage, not "no data".
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise StoreCorrupt(self.path, f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise StoreCorrupt(self.path, "not a TinyDB database (expected an object of tables)")
        # orjson keeps the last of two equal keys, which would silently drop a record: an
        # object in the text that did not make it into what was parsed is such a key.
        if _objects_opened(raw) > _objects_parsed(data):
            raise StoreCorrupt(self.path, "a key appears twice in one object")
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        # Encode first: data that cannot be encoded leaves no file behind.
        encoded = _SNAPSHOT.dump_json(data)
        # A leftover temp file is an unfinished earlier write: the live file never depended on it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_SURPRISES, 0o600)
        try:
            # Write the whole database beside the live one, make it durable, then swap it in.
            try:
                _write_all(fd, encoded)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp_path, self.path)
            self.size = len(encoded)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)
            raise
        # fsync the directory too: the rename is durable only once the dirent is.
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        """Nothing stays open between calls."""


def _journal_line(entry: _JournalEntry) -> bytes:
    body = entry.model_dump_json().encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _read_journal(path: Path) -> tuple[list[_JournalEntry], int]:
    """Complete, checksummed entries and the length they span. A torn last line (a crash
    mid-append, never acknowledged) is left out; anything else that does not check out is
    corruption."""
    raw = _read_regular(path) or b""
    lines = raw.split(b"\n")
    entries = []
    # Everything after the last newline was being appended when the process died.
    for number, line in enumerate(lines[:-1], start=1):
        crc, _, body = line.partition(b" ")
        try:
            valid = int(crc, 16) == zlib.crc32(body)
        except ValueError:
            valid = False
        if not valid:
            raise StoreCorrupt(path, f"line {number} fails its checksum")
        try:
            entries.append(_JournalEntry.model_validate_json(body))
        except ValidationError as exc:
            raise StoreCorrupt(path, f"line {number} is not a journal entry") from exc
    return entries, len(raw) - len(lines[-1])


@dataclass(slots=True)
class _Ticket:
    """One write's claim on durability; `lost` once a failed flush has dropped it."""

    seq: int
    lost: bool = False


@dataclass(slots=True)
class _Change:
    """One queued journal line and the memory change it makes once it is durable."""

    line: bytes
    table: str
    key: Any
    value: Any
    words: set[str] | None = None  # a document's, worked out before it is queued
    ticket: _Ticket | None = None


def _doc_change(doc_id: str, doc: Document | None) -> _Change:
    if doc is None:
        line = _journal_line(_JournalEntry(table=_DOCUMENTS, id=doc_id, value=None))
        return _Change(line, _DOCUMENTS, doc_id, None)
    entry = _JournalEntry(table=_DOCUMENTS, id=doc_id, value=doc.model_dump(mode="json"))
    words = document_words(doc.title, doc.content)
    return _Change(_journal_line(entry), _DOCUMENTS, doc_id, doc, words)


def _key_change(record: IdempotencyRecord) -> _Change:
    entry = _JournalEntry(
        table=_IDEMPOTENCY, id=f"{record.scope}:{record.key}", value=record.model_dump(mode="json")
    )
    return _Change(_journal_line(entry), _IDEMPOTENCY, (record.scope, record.key), record)


class TinyDBStore:
    """The embedded store: all documents in memory, every write journalled and fsync'ed.

    TinyDB provides the file format (`TinyDB(path)` opens `documents.json`) and the `Storage`
    contract `DurableJSONStorage` fulfils; the store adds the journal, group commit, memory
    indexes, the directory lock and recovery from failed writes.
    """

    backend = "tinydb"

    def __init__(
        self, data_dir: Path, *, clock: Clock = utc_now, compact_min_bytes: int = COMPACT_MIN_BYTES
    ) -> None:
        """Use `TinyDBStore.open`, which also loads the data."""
        self.data_dir = data_dir
        self._clock = clock
        self._new_id = IdGenerator()
        self._compact_min_bytes = compact_min_bytes
        self._index = DocumentIndex()  # durable documents only
        self._idempotency: dict[tuple[str, str], IdempotencyRecord] = {}
        # Changes queued but not yet durable, newest per key: what writers build on. Readers
        # never see them, so nothing is served that a restart would not load.
        self._queued: dict[tuple[str, Any], _Change] = {}
        # _lock guards the memory state and the pending changes; it is only ever held for
        # memory work, so the event loop takes it directly. _flush_lock serialises file writes
        # (in worker threads, outside _lock); _flush_turn lets one waiting writer start them.
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flush_turn = anyio.Lock()
        self._pending: list[_Change] = []
        self._staged_seq = 0
        self._durable_seq = 0
        self._journal_bytes = 0  # the journal file's length: everything in it is durable
        self._compact_at = compact_min_bytes  # journal bytes that trigger the next fold
        self._failed: BaseException | None = None
        self._closed = False
        self._lock_fd = -1
        self._journal_fd = -1
        self._storage = DurableJSONStorage(str(data_dir / DATA_FILE))
        self._cursor_secret: bytes | None = None

    @property
    def data_path(self) -> Path:
        return self.data_dir / DATA_FILE

    @property
    def journal_path(self) -> Path:
        return self.data_dir / JOURNAL_FILE

    @classmethod
    def open(
        cls, data_dir: Path, *, clock: Clock = utc_now, compact_min_bytes: int = COMPACT_MIN_BYTES
    ) -> TinyDBStore:
        """Lock the directory, load the database, replay the journal and fold it in."""
        store = cls(data_dir, clock=clock, compact_min_bytes=compact_min_bytes)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            owned = (LOCK_FILE, DATA_FILE, JOURNAL_FILE, store._storage.tmp_path.name)
            for name in owned:
                _require_regular(data_dir / name)
            store._take_lock()
            # Loading makes millions of objects that live as long as the store: the cyclic
            # collector would walk them again and again while they are made, then at every
            # full collection after. Paused, then frozen out of its sight (they form no cycles).
            gc.disable()
            try:
                journal_length = store._load()
            finally:
                gc.freeze()
                gc.enable()
            store._journal_fd = os.open(
                store.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NO_SURPRISES, 0o600
            )
            # Cut a torn last line now: appended after, it would read as damage at the next open.
            os.ftruncate(store._journal_fd, journal_length)
            store._journal_bytes = journal_length
            # As after any fold: the next once the journal outgrows the database file.
            store._compact_at = max(compact_min_bytes, store._storage.size)
            if journal_length:
                store._compact()
        except BaseException as exc:
            store._release()
            if isinstance(exc, OSError):
                raise StoreUnavailable(f"cannot use data directory {data_dir}: {exc}") from exc
            raise
        return store

    def _take_lock(self) -> None:
        lock_path = self.data_dir / LOCK_FILE
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NO_SURPRISES, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StoreLocked(self.data_dir, lock_path) from exc

    def _load(self) -> int:
        """Fill memory from the database and the journal; returns the journal's valid length."""
        tables = self._storage.read() or {}
        unknown = set(tables) - {_DOCUMENTS, _IDEMPOTENCY}
        if unknown:
            raise StoreCorrupt(self.data_path, f"unknown tables {sorted(unknown)[:5]}")
        now = self._clock()
        try:
            docs: dict[str, Document] = {}
            for raw in tables.get(_DOCUMENTS, {}).values():
                doc = check_stored(Document.model_validate(raw))
                if docs.setdefault(doc.id, doc) is not doc:
                    raise StoreCorrupt(self.data_path, f"two records have the id {doc.id!r}")
            self._index.extend(docs.values())
            for raw in tables.get(_IDEMPOTENCY, {}).values():
                self._remember(IdempotencyRecord.model_validate(raw), now)
        except ValueError as exc:  # pydantic's ValidationError included
            raise StoreCorrupt(self.data_path, f"a record does not validate: {exc}") from exc
        entries, length = _read_journal(self.journal_path)
        try:
            for number, entry in enumerate(entries, 1):
                self._replay(entry, now, number)
        except ValueError as exc:  # pydantic's ValidationError included
            raise StoreCorrupt(self.journal_path, f"an entry does not validate: {exc}") from exc
        return length

    def _replay(self, entry: _JournalEntry, now: datetime, number: int) -> None:
        """Apply one journal entry, which must be exactly what this store writes."""
        if entry.table == _DOCUMENTS:
            value = None
            if entry.value is not None:
                value = check_stored(Document.model_validate(entry.value))
                if value.id != entry.id:
                    raise ValueError(
                        f"line {number} files document {value.id!r} under {entry.id!r}"
                    )
            self._set(_DOCUMENTS, entry.id, value)
        elif entry.table == _IDEMPOTENCY and entry.value is not None:
            record = IdempotencyRecord.model_validate(entry.value)
            if entry.id != f"{record.scope}:{record.key}":
                raise ValueError(f"line {number} files a key under {entry.id[:64]!r}")
            self._remember(record, now)
        else:
            raise ValueError(f"line {number} belongs to no table this store writes")

    def _remember(self, record: IdempotencyRecord, now: datetime) -> None:
        if now - record.created_at < IDEMPOTENCY_TTL:
            self._idempotency[record.scope, record.key] = record

    # memory; callers hold _lock (or own the store exclusively, at open)

    def _set(self, table: str, key: Any, value: Any, words: set[str] | None = None) -> None:
        """Put a durable `value` in memory (None removes it)."""
        if table == _IDEMPOTENCY:
            self._idempotency[key] = value
        elif value is None:
            self._index.remove(key)
        else:
            self._index.put(value, words)

    def _latest(self, table: str, key: Any) -> Any:
        """What a writer builds on: the newest queued change to `key`, else memory."""
        queued = self._queued.get((table, key))
        if queued is not None:
            return queued.value
        if table == _DOCUMENTS:
            return self._index.get(key)
        return self._idempotency.get(key)

    def _queued_ticket(self, doc_id: str) -> _Ticket | None:
        queued = self._queued.get((_DOCUMENTS, doc_id))
        return None if queued is None else queued.ticket

    def _usable(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if self._failed is not None:
            raise StoreUnavailable("the data directory failed a write; restart after fixing it")

    def _stage(self, *changes: _Change) -> _Ticket:
        """Queue changes for the next flush; writers see them at once, readers once durable.
        Every line is encoded before this is called, so a change that cannot be written is
        never queued."""
        self._staged_seq += 1
        ticket = _Ticket(self._staged_seq)
        for change in changes:
            change.ticket = ticket
            self._queued[change.table, change.key] = change
        self._pending.extend(changes)
        return ticket

    # durability

    async def _durable(self, ticket: _Ticket | None) -> None:
        """Return once the change is on disk. The first writer in flushes everything queued so
        far, in a worker thread, while the others wait their turn and usually find their change
        already written: N concurrent writes cost one fdatasync and one thread hop, not N."""
        if ticket is None:
            return
        async with self._flush_turn:
            if self._durable_seq < ticket.seq and not ticket.lost:
                await anyio.to_thread.run_sync(self._flush)
        if ticket.lost:
            raise StoreUnavailable("the change could not be written; nothing was stored")

    def _flush(self) -> None:
        """Write and fdatasync every queued journal line; compact when the journal has grown."""
        with self._flush_lock:
            self._usable()
            self._write_pending()
            if self._journal_bytes > self._compact_at:
                self._compact()

    def _write_pending(self) -> None:
        """Append the queued lines, fdatasync them, then apply them to memory; on failure drop
        them (see _roll_back)."""
        with self._lock:
            batch, self._pending = self._pending, []
            upto = self._staged_seq
        if batch:
            data = b"".join(change.line for change in batch)
            try:
                _write_all(self._journal_fd, data)
                os.fdatasync(self._journal_fd)
            except OSError as exc:
                self._roll_back(batch, exc)
            self._journal_bytes += len(data)
            with self._lock:
                for change in batch:
                    self._set(change.table, change.key, change.value, change.words)
                    if self._queued.get((change.table, change.key)) is change:
                        del self._queued[change.table, change.key]
        self._durable_seq = upto

    def _roll_back(self, batch: list[_Change], exc: OSError) -> None:
        """A write failed (full disk, I/O error, read-only remount): cut the journal back to
        its durable length and drop every queued change (later ones may build on the failed
        ones); their writers hear of it. Readers never saw them, and the store writes again
        once the disk does. If even the cut fails, the disk cannot be trusted: refuse
        everything until a restart."""
        log.error("store.write_failed", extra={"data_dir": str(self.data_dir), "error": str(exc)})
        try:
            os.ftruncate(self._journal_fd, self._journal_bytes)
            os.fsync(self._journal_fd)
        except OSError:
            self._failed = exc
        with self._lock:
            for change in batch + self._pending:
                if change.ticket is not None:
                    change.ticket.lost = True
            self._pending = []
            self._queued.clear()
        raise StoreUnavailable(f"cannot write to the data directory: {exc.strerror}") from exc

    def _compact(self) -> None:
        """Write the durable state as the new TinyDB file, then empty the journal. Best effort:
        on any failure the journal still holds everything and compaction is tried again later.
        Caller holds _flush_lock (or owns the store exclusively). The snapshot is taken with
        nothing queued, so it is exactly the durable state: a crash between the swap and the
        truncation replays entries the snapshot already ends with, which changes nothing."""
        started = time.perf_counter()
        try:
            snapshot = self._drained_snapshot()
            if snapshot is None:
                return  # writers keep the queue busy: the next flush tries again
            docs, live = snapshot
            self._storage.write(
                {_DOCUMENTS: docs, _IDEMPOTENCY: {str(n): r for n, r in enumerate(live, 1)}}
            )
            os.ftruncate(self._journal_fd, 0)
            self._journal_bytes = 0
            os.fsync(self._journal_fd)
            self._compact_at = max(self._compact_min_bytes, self._storage.size)
        except StoreUnavailable:
            return  # a queued write failed and was rolled back; its writer hears of it
        except Exception as exc:
            # Try again only once the journal has grown as much again, not on every write.
            self._compact_at = self._journal_bytes + max(self._compact_min_bytes, self._compact_at)
            log.error("store.compaction_failed", exc_info=exc)
            return
        log.info(
            "store.compacted",
            extra={
                "documents": len(docs),
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    def _drained_snapshot(
        self,
    ) -> tuple[dict[str, Document], list[IdempotencyRecord]] | None:
        """Memory with nothing queued (written first), which is the durable state; None if
        writers keep refilling the queue."""
        for _ in range(3):
            self._write_pending()
            with self._lock:
                if self._pending:
                    continue
                now = self._clock()
                live = [
                    r for r in self._idempotency.values() if now - r.created_at < IDEMPOTENCY_TTL
                ]
                self._idempotency = {(r.scope, r.key): r for r in live}
                ordered = self._index.oldest_first()
                return {str(n): doc for n, doc in enumerate(ordered, 1)}, live
        return None

    # the contract

    # Each write is validated and encoded first, then queued on the event loop (memory work
    # only), then waits until its line is durable; only then does memory, and so every reader,
    # see it, and the caller hear of success.

    async def create(
        self, data: DocumentCreate, *, idempotency: IdempotencyKey | None = None
    ) -> tuple[Document, bool]:
        doc, replayed, ticket = self._create(data, idempotency)
        await self._durable(ticket)
        return doc, replayed

    def _create(
        self, data: DocumentCreate, idempotency: IdempotencyKey | None
    ) -> tuple[Document, bool, _Ticket | None]:
        body_print = fingerprint(data) if idempotency is not None else ""
        with self._lock:
            self._usable()
            now = self._clock()
            original = self._replay_of(idempotency, body_print, now)
            if original is not None:
                # The original may still be waiting for its flush: wait for it as well.
                return original, True, self._queued_ticket(original.id)
            doc = new_document(data, self._new_id(now), now)
            changes = [_doc_change(doc.id, doc)]
            if idempotency is not None:
                record = IdempotencyRecord(
                    scope=idempotency.scope,
                    key=idempotency.key,
                    fingerprint=body_print,
                    document_id=doc.id,
                    created_at=now,
                )
                changes.append(_key_change(record))
            return doc, False, self._stage(*changes)

    def _replay_of(
        self, idempotency: IdempotencyKey | None, body_print: str, now: datetime
    ) -> Document | None:
        if idempotency is None:
            return None
        known = self._latest(_IDEMPOTENCY, (idempotency.scope, idempotency.key))
        if known is None or now - known.created_at >= IDEMPOTENCY_TTL:
            return None
        if known.fingerprint != body_print:
            raise IdempotencyConflict(idempotency.key)
        original: Document | None = self._latest(_DOCUMENTS, known.document_id)
        if original is None:
            raise IdempotencyConflict(idempotency.key, "for a document that has since been deleted")
        return original

    async def get(self, doc_id: str) -> Document:
        # Memory only, and _lock is never held across I/O: safe on the event loop.
        with self._lock:
            self._usable()
            doc = self._index.get(doc_id)
        if doc is None:
            raise DocumentNotFound(doc_id)
        return doc

    async def page(
        self, query: DocumentQuery, *, limit: int, after: Key | None = None
    ) -> tuple[list[Document], Key | None]:
        # Memory only, and the walk is bounded (see DocumentIndex): safe on the event loop.
        with self._lock:
            self._usable()
            return self._index.page(query, limit, after)

    async def update(
        self, doc_id: str, patch: DocumentUpdate, *, if_version: int | None = None
    ) -> Document:
        # Check and change under one hold of the lock, so two PATCHes cannot interleave.
        with self._lock:
            current = self._current(doc_id, if_version)
            new = apply_patch(current, patch, self._clock())
            # With nothing to write, `current` may still be queued: answer once it is durable.
            ticket = (
                self._queued_ticket(doc_id)
                if new is current
                else self._stage(_doc_change(doc_id, new))
            )
        await self._durable(ticket)
        return new

    def _current(self, doc_id: str, if_version: int | None) -> Document:
        """The document a write builds on (queued changes included), checked against If-Match."""
        self._usable()
        current: Document | None = self._latest(_DOCUMENTS, doc_id)
        if current is None:
            raise DocumentNotFound(doc_id)
        if if_version is not None and current.version != if_version:
            raise stale(doc_id, current.version)
        return current

    async def delete(self, doc_id: str, *, if_version: int | None = None) -> None:
        with self._lock:
            self._current(doc_id, if_version)
            ticket = self._stage(_doc_change(doc_id, None))
        await self._durable(ticket)

    async def import_document(self, doc: Document) -> bool:
        change = _doc_change(doc.id, doc)
        with self._lock:
            self._usable()
            if self._latest(_DOCUMENTS, doc.id) is not None:
                return False
            ticket = self._stage(change)
        await self._durable(ticket)
        return True

    async def export_documents(self) -> AsyncIterator[Document]:
        with self._lock:
            docs = self._index.oldest_first()
        for doc in docs:
            yield doc

    async def count(self) -> int:
        return len(self._index)

    async def cursor_secret(self) -> bytes:
        if self._cursor_secret is None:
            self._cursor_secret = await anyio.to_thread.run_sync(self._read_cursor_secret)
        return self._cursor_secret

    def _read_cursor_secret(self) -> bytes:
        """The first to link its file in place wins: a secret is never seen half-written."""
        path = self.data_dir / CURSOR_KEY_FILE
        if not path.exists():
            tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_SURPRISES, 0o600)
            try:
                _write_all(fd, secrets.token_bytes(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
            _fsync_dir(self.data_dir)
        return path.read_bytes()

    async def check(self) -> None:
        self._usable()
        await anyio.to_thread.run_sync(self._probe)

    def _probe(self) -> None:
        """Writes nothing, so any number of probes at any rate cost a few system calls: the
        journal is still open and is the file we believe, and the directory accepts writes."""
        try:
            journal = os.fstat(self._journal_fd)
            on_disk = os.stat(self.journal_path, follow_symlinks=False)
            if (journal.st_dev, journal.st_ino) != (on_disk.st_dev, on_disk.st_ino):
                raise StoreUnavailable("the journal was replaced or removed under the store")
            if not os.access(self.data_dir, os.W_OK):
                raise StoreUnavailable("the data directory is not writable")
            if os.statvfs(self.data_dir).f_bavail == 0:
                raise StoreUnavailable("the data directory's filesystem is full")
        except OSError as exc:
            raise StoreUnavailable(f"the data directory cannot be read: {exc.strerror}") from exc

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self.close_sync)

    def close_sync(self) -> None:
        """Fold the journal into the TinyDB file and release the directory."""
        with self._flush_lock:
            if self._closed:
                return
            try:
                if self._failed is None:
                    self._compact()
            finally:
                self._closed = True
                self._release()

    def _release(self) -> None:
        for fd in (self._journal_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)  # closing the lock fd releases the flock
        self._journal_fd = self._lock_fd = -1
