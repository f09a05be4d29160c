"""The embedded store: one SQLite database, `documents.db` in DATA_DIR, shared safely by every
process that opens it (workers, a second service, `main.py backup`).

WAL with synchronous=FULL: a write is acknowledged once its commit is fsync'ed. One writer
thread per process runs every write; the writes queued while it commits share the next
transaction (group commit). Reads use one connection per thread and never wait for writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from legacy import (
    imported_already,
    left_beside,
    mark_imported,
    previous_version_locked_out,
    read_legacy,
    same_body,
)
from logging_config import Outage
from models import (
    WORDS_RULES,
    Document,
    DocumentCreate,
    DocumentQuery,
    DocumentUpdate,
    document_words,
    millis,
)
from ratelimit import StoreWork
from sqlite_files import (
    APPLICATION_ID,
    BACKUP_ID,
    DATABASE_FILE,
    adopt_backup,
    check_file,
    check_sharers,
    check_target,
    check_wal_kept,
    create,
    identity,
    in_use,
    owner,
    read_own,
    remove_leftovers,
    remove_made,
    start_lock,
    sync_directory,
)
from storage import (
    IDEMPOTENCY_TTL,
    PAGE_MAX_BYTES,
    Clock,
    DocumentInvalid,
    DocumentNotFound,
    IdempotencyConflict,
    IdempotencyKey,
    IdGenerator,
    Key,
    StoreCorrupt,
    StoreUnavailable,
    apply_patch,
    find_words,
    fingerprint,
    new_document,
    on_cpu,
    stale,
    utc_now,
)

log = logging.getLogger("documents.store")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000  # how long a write waits for another process's transaction
LOOP_BUDGET_S = 0.002  # a read on the event loop longer than this moves to a thread
DAMAGE_FILE = "documents.damaged"  # what SQLite said of damage a process met, for the others
DAMAGE_MAX = 1024  # bytes of it read or written: SQLite's messages are a line
PROBE_WRITE_S = 1.0  # how long readiness waits for its write transaction
PARSED_MAX = 4_096  # documents kept parsed
PARSED_BODY_MAX = 4_096  # larger bodies are parsed at each read: the cache stays tens of MB
SLOTS = 1 << 14  # document keys per millisecond: every time from year 1 to 9999 fits 63 bits
TTL_MS = int(IDEMPOTENCY_TTL.total_seconds() * 1000)
FTS5_SEEKS_DOWN_WRONG = sqlite3.sqlite_version_info < (3, 42)  # see page_sql

# Forward migrations: MIGRATIONS[n] takes a database from user_version n to n + 1. Words arrive
# folded by models.words and joined by spaces: FTS5's ascii tokenizer only splits them again, so
# `q` keeps exactly the service's case and accent rules.
MIGRATIONS = [
    """
    CREATE TABLE documents (
        n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, created INTEGER NOT NULL,
        updated INTEGER NOT NULL, version INTEGER NOT NULL, body BLOB NOT NULL);
    CREATE INDEX documents_created ON documents (created, id);
    CREATE INDEX documents_updated ON documents (updated, id);
    -- One row per tag and per metadata value, in creation order: a filter walks its rows.
    CREATE TABLE tags (tag TEXT NOT NULL, created INTEGER NOT NULL, id TEXT NOT NULL,
        n INTEGER NOT NULL, PRIMARY KEY (tag, created, id)) WITHOUT ROWID;
    CREATE TABLE metadata (key TEXT NOT NULL, value NOT NULL, created INTEGER NOT NULL,
        id TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (key, value, created, id))
        WITHOUT ROWID;
    CREATE VIRTUAL TABLE words USING fts5 (terms, content='', tokenize='ascii', detail='none');
    CREATE TABLE idempotency (scope TEXT NOT NULL, key TEXT NOT NULL,
        fingerprint TEXT NOT NULL, document_id TEXT NOT NULL, created INTEGER NOT NULL,
        PRIMARY KEY (scope, key)) WITHOUT ROWID;
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    INSERT INTO meta VALUES ('cursor_secret', randomblob(32));
    """,
    # Expired idempotency records are found by age while the service runs (see create).
    "CREATE INDEX idempotency_created ON idempotency (created)",
    # A tag's or a metadata value's rows hold only the key, which sorts as creation times do.
    """
    CREATE TABLE tags_by_key (tag TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (tag, n))
        WITHOUT ROWID;
    INSERT INTO tags_by_key SELECT tag, n FROM tags;
    DROP TABLE tags;
    ALTER TABLE tags_by_key RENAME TO tags;
    CREATE TABLE metadata_by_key (key TEXT NOT NULL, value NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (key, value, n)) WITHOUT ROWID;
    INSERT INTO metadata_by_key SELECT key, value, n FROM metadata;
    DROP TABLE metadata;
    ALTER TABLE metadata_by_key RENAME TO metadata;
    """,
    # The words' index keeps each document's words, and so removes those it was given: without
    # them (content=''), a removal had to give the same words again, and words found by other
    # rules (another version's, another Python's Unicode) damaged the index. Found again by
    # _reindex, which the missing rules in `meta` call for.
    """
    DROP TABLE words;
    CREATE VIRTUAL TABLE words USING fts5 (terms, tokenize='ascii', detail='none');
    """,
]


def _schema(conn: sqlite3.Connection) -> set[tuple[str, str, str]]:
    """Each table, index, view and trigger with its definition (white space aside, and the
    quotes a rename puts around its name), but ANALYZE's tables; the words' index's own tables
    by name, as each FTS5 version words them its own way."""
    rows = conn.execute(
        "SELECT type, name, coalesce(sql, '') FROM sqlite_master"
        " WHERE NOT (type = 'table' AND name GLOB 'sqlite_stat[1-4]')"
    )
    return {
        (
            kind,
            name,
            ""
            if name.startswith("words_")
            else " ".join(sql.replace(f'"{name}"', name, 1).split()),
        )
        for kind, name, sql in rows
    }


def _expected_schema(version: int) -> set[tuple[str, str, str]]:
    """What the migrations up to `version` make, made in memory."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        return _schema(conn)


def _key(conn: sqlite3.Connection, created: int) -> int:
    """A document's key `n`: the next of the SLOTS keys of its creation's millisecond, or once
    the last is taken, the first free one. Keys sort as creation times do, so the words' index
    returns `q`'s matches in page order; those of one millisecond in the order written."""
    first, last = created * SLOTS, created * SLOTS + SLOTS - 1
    (taken,) = conn.execute(
        "SELECT max(n) FROM documents WHERE n BETWEEN ? AND ?", (first, last)
    ).fetchone()
    if taken is None or taken < last:
        return first if taken is None else int(taken) + 1
    free = conn.execute(
        "SELECT k FROM (SELECT ? AS k UNION ALL"
        " SELECT n + 1 FROM documents WHERE n BETWEEN ? AND ?)"
        " WHERE NOT EXISTS (SELECT 1 FROM documents WHERE n = k) ORDER BY k LIMIT 1",
        (first, first, last - 1),
    ).fetchone()
    if free is None:
        reason = f"too many documents created in one millisecond (the most is {SLOTS})"
        raise DocumentInvalid("created_at", reason)
    return int(free[0])


def _indexed_rules(conn: sqlite3.Connection) -> str | None:
    """The rules that found the indexed words (WORDS_RULES of the process that indexed them)."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'words'").fetchone()
    return None if row is None else str(row[0])


def _meta_value(value: Any) -> Any:
    # A boolean as a blob: SQLite takes True for 1, while 12 and 12.0 (one JSON number) are equal.
    return bytes([value]) if isinstance(value, bool) else value


class SQLiteStore:
    """Reads run on the event loop while they are short (a progress handler stops them at
    LOOP_BUDGET_S and a thread runs them again); writes go to the writer thread."""

    backend = "sqlite"

    def __init__(self, data_dir: Path, clock: Clock) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DATABASE_FILE
        self._clock = clock
        self._new_id = IdGenerator()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop_thread = -1
        self._deadline = 0.0
        # Parsed once per version while it is read often: the hot path of every read. A body is
        # the document exactly as the API serves it, so it is its own cache key.
        self._parsed = functools.lru_cache(maxsize=PARSED_MAX)(_parse)
        self._secret = b""
        self._outage = Outage(log, "store")  # what readiness finds failing, logged once
        self._write_failed = ""  # why the last commit failed; empty once one succeeds
        self._damaged = ""  # what SQLite said of damage it met: until a restart
        self._file: tuple[int, ...] | None = None  # the files as opened (identity)
        self._legacy_fd: int | None = None
        self._legacy_digest: bytes | None = None  # of the previous version's file it imported

    @classmethod
    def open(cls, data_dir: Path, *, clock: Clock = utc_now, migrate: bool = True) -> SQLiteStore:
        """Check the files, run the migrations (one process at a time; without `migrate`, an
        older schema is refused), start the writer."""
        store = cls(data_dir, clock)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            # SQLite says only "unable to open database file": a nameless file names the cause.
            tempfile.TemporaryFile(dir=data_dir).close()
            store._legacy_fd = previous_version_locked_out(data_dir)
            # One starting process at a time checks, adopts, migrates and imports.
            with start_lock(data_dir):
                head = check_file(store.path)
                check_file(store.path.with_name(DATABASE_FILE + "-journal"))
                check_sharers(store.path)
                first = not in_use(store.path.with_name(DATABASE_FILE + "-shm"))
                wal = store.path.with_name(DATABASE_FILE + "-wal")
                if head is None and os.path.lexists(wal) and os.lstat(wal).st_size:
                    # A new database beside it would be read through another's pages.
                    raise StoreCorrupt(
                        wal,
                        f"its database, {DATABASE_FILE}, is missing: put it back or restore a "
                        f"backup, or move this file and {DATABASE_FILE}-shm aside to start a "
                        "new, empty database",
                    )
                if owner(head) == BACKUP_ID:  # checked alone: the WAL beside it is not its own
                    store._check_as_found(migrate, backup=True)
                    adopt_backup(store.path)
                for name in ("-wal", "-shm"):
                    check_file(store.path.with_name(DATABASE_FILE + name))
                check_wal_kept(store.path)
                made = [
                    name
                    for name in ("", "-wal", "-shm")
                    if not os.path.lexists(f"{store.path}{name}")
                ]
                try:
                    store._migrate(head is not None, migrate, alone=first)
                except BaseException:
                    store.close_sync()
                    remove_made(store.path, made)
                    raise
                store._file = identity(store.path)
                remove_leftovers(data_dir)  # once started: a refused start changes nothing
                if first:  # a damage report of processes since stopped
                    (data_dir / DAMAGE_FILE).unlink(missing_ok=True)
        except BaseException as exc:
            store.close_sync()
            if isinstance(exc, OSError):  # e.g. a root-owned bind mount: Permission denied
                raise StoreUnavailable(f"cannot use data directory {data_dir}: {exc}") from exc
            if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, cannot open
                raise StoreUnavailable(f"cannot use {store.path}: {exc}") from exc
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreCorrupt(store.path, f"SQLite refused it: {exc}") from exc
            raise
        # A daemon: a store opened for a task cancelled meanwhile (Ctrl-C) is never closed, and
        # its writer, with no write, had held the exit for ever.
        store._writer = threading.Thread(
            target=store._write_loop, name="sqlite-writer", daemon=True
        )
        store._writer.start()
        return store

    def _migrate(self, existed: bool, migrate: bool, *, alone: bool) -> None:
        # Checked before SQLite creates anything: a refused start leaves the directory as it was.
        imported = None if existed else read_legacy(self.data_dir, self._clock(), task=not migrate)
        if not existed:
            create(self.path)
        version = self._check_as_found(migrate)
        if existed and 0 < version < len(MIGRATIONS) and not alone:
            # The previous version's service: it would go on writing by the older schema's rules.
            raise StoreUnavailable(
                f"{self.path} has schema {version} and another process has it open: stop every "
                f"process using it, then start this version, which migrates it to schema "
                f"{len(MIGRATIONS)}"
            )
        if existed and version == 0 and not migrate:
            raise StoreUnavailable(
                f"{self.path} is an empty database: start the service on it once, or check that "
                "DATA_DIR is the service's"
            )
        if existed and version == 0:  # made, not yet migrated: the start was killed
            imported = read_legacy(self.data_dir, self._clock(), task=False)
        elif existed and (left := left_beside(self.data_dir)):
            if not imported_already(left, self._legacy_digest):
                raise StoreCorrupt(
                    left,
                    "the previous version wrote it beside this store's database, which holds the "
                    "data since the upgrade; it is never read: move it aside, then start",
                )
            mark_imported(self.data_dir)
        # One process migrates; the others wait here for its lock, then find nothing to do.
        conn = self._connection()
        with conn:
            conn.execute("BEGIN EXCLUSIVE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], version + 1):
                for statement in script.split(";"):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
            if migrate or version == 0:  # a task leaves it to the service (see _commit)
                self._reindex(conn)
            if version == 0 and imported is not None:
                for doc in imported[0]:
                    self._insert(conn, doc, _terms(doc))
                conn.executemany("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?)", imported[1])
                conn.execute("INSERT INTO meta VALUES ('legacy_file', ?)", (imported[2],))
            # Expired keys go at each start; a live key is replaced once expired.
            expired = millis(self._clock()) - TTL_MS
            conn.execute("DELETE FROM idempotency WHERE created <= ?", (expired,))
        sql = "SELECT value FROM meta WHERE name = 'cursor_secret'"
        self._secret = conn.execute(sql).fetchone()[0]
        if imported is not None and version == 0:
            mark_imported(self.data_dir)
            log.info("store.legacy_imported", extra={"documents": len(imported[0])})

    @staticmethod
    def _reindex(conn: sqlite3.Connection) -> None:
        """Every document's words found again, once the rules that found those indexed differ
        from this process's (WORDS_RULES): a document's words are never mixed from two rules. In
        the start's transaction: the other processes wait for it."""
        if _indexed_rules(conn) == WORDS_RULES:
            return
        conn.execute("DELETE FROM words")
        indexed = 0
        for n, body in conn.execute("SELECT n, body FROM documents"):  # one body at a time
            conn.execute(
                "INSERT INTO words (rowid, terms) VALUES (?, ?)", (n, _terms(_parse(body)))
            )
            indexed += 1
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('words', ?)", (WORDS_RULES,))
        if indexed:  # not for a new database
            log.info("store.words_indexed", extra={"rules": WORDS_RULES, "documents": indexed})

    def _check_as_found(self, migrate: bool, *, backup: bool = False) -> int:
        """The schema version, once the database is one this version can serve: not a newer
        version's (nor an older one's for a task, which never migrates), its schema what the
        migrations made (a part missing, changed or added by hand is refused here, not met by
        requests that fail or scan), its cursor secret whole. Read through a read-only
        connection, which never writes the database nor folds the WAL into it as the last
        connection's close does: a refusal leaves both as they were. A `backup` is read alone,
        without the WAL beside it, which is the replaced database's."""
        beside = [self.path.with_name(DATABASE_FILE + name) for name in ("-wal", "-shm")]
        made = [path for path in beside if not os.path.lexists(path)]
        mode = "immutable=1" if backup else "mode=ro"
        conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?{mode}", uri=True)
        try:
            # The header as the WAL leaves it.
            marks = {BACKUP_ID} if backup else {0, APPLICATION_ID}
            mark = conn.execute("PRAGMA application_id").fetchone()[0]
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            # Unmarked: this store's from before it marked its files (its schema tells), or
            # another application's, whose numbers are its own.
            if mark not in marks or (mark == 0 and version > len(MIGRATIONS)):
                raise StoreCorrupt(self.path, "an SQLite database of another application")
            if version > len(MIGRATIONS):
                raise StoreCorrupt(
                    self.path,
                    f"written by a newer version (schema {version}, this one knows up to "
                    f"{len(MIGRATIONS)}); run that version or restore a backup",
                )
            if not migrate and 0 < version < len(MIGRATIONS):
                # A task of a newer version: the previous version's service may still use it.
                raise StoreUnavailable(
                    f"{self.path} has schema {version}, this version {len(MIGRATIONS)}: stop the "
                    "service using it, then start this version's service, which migrates it"
                )
            if differ := _expected_schema(version) ^ _schema(conn):
                names = ", ".join(sorted({name for _, name, _ in differ}))
                raise StoreCorrupt(self.path, f"its schema is not this version's in: {names}")
            if version:
                sql = "SELECT value FROM meta WHERE name = 'cursor_secret'"
                secret = conn.execute(sql).fetchone()
                if secret is None or not isinstance(secret[0], bytes) or len(secret[0]) != 32:
                    raise StoreCorrupt(self.path, "its cursor secret is missing or not 32 bytes")
                sql = "SELECT value FROM meta WHERE name = 'legacy_file'"
                digest = conn.execute(sql).fetchone()
                self._legacy_digest = digest[0] if digest else None
            return version
        finally:
            conn.close()
            for path in made:  # by this connection, which cannot remove them (start_lock held)
                path.unlink(missing_ok=True)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, cached_statements=256
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")  # a no-op, without a lock, once it is
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    # writes: one thread, one transaction per batch of queued jobs

    async def _write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((job, loop, future))
        return await future

    def _write_loop(self) -> None:
        conn = self._connection()
        while True:
            batch = [self._jobs.get()]
            while not self._jobs.empty():  # its only reader: get() does not block
                batch.append(self._jobs.get())
            jobs = [job for job in batch if job is not None]  # None: stop after this batch
            # One wake-up per event loop for the whole batch, not one per write.
            settled: dict[asyncio.AbstractEventLoop, list[Any]] = {}
            for (_, loop, future), outcome in zip(jobs, self._commit(conn, jobs), strict=True):
                settled.setdefault(loop, []).append((future, outcome))
            for loop, outcomes in settled.items():
                loop.call_soon_threadsafe(_settle, outcomes)
            if len(jobs) < len(batch):
                return

    def _commit(self, conn: sqlite3.Connection, batch: list[Any]) -> list[Any]:
        """Each job's result or what it raised. A job that fails by itself (StoreError, or a
        document the database cannot take) is undone alone and the others commit; the database
        failing (a full disk, an I/O error) rolls back the whole batch."""
        outcomes: list[Any] = []
        if not batch:
            return outcomes
        try:
            conn.execute("BEGIN IMMEDIATE")
            # A process started since by other rules found every document's words again by them.
            if (rules := _indexed_rules(conn)) != WORDS_RULES:
                raise StoreUnavailable(
                    f"its words were indexed by other rules ({rules or 'none'}; "
                    f"this process's: {WORDS_RULES}): run the version and Python of the "
                    "service that uses it"
                )
            for job, _, _ in batch:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append(job(conn))
                except sqlite3.Error:
                    raise  # the database failing: the whole batch
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    outcomes.append(exc)
                conn.execute("RELEASE job")
            # Files replaced or removed under this process (a restore while it ran) take what it
            # commits where no later start reads it: undone if found before the commit, and
            # never acknowledged if found after it.
            self._check_files()
            conn.execute("COMMIT")
            self._check_files()
            self._write_failed = ""
        except Exception as exc:
            if conn.in_transaction:
                conn.rollback()
            self._write_failed = str(exc)
            self._note_damage(exc)
            log.error("store.write_failed", extra={"error": str(exc)})
            failed = StoreUnavailable(f"cannot write the database: {exc}")
            failed.__cause__ = exc
            return [failed] * len(batch)
        return outcomes

    def _insert(self, conn: sqlite3.Connection, doc: Document, terms: str) -> None:
        created = millis(doc.created_at)
        n = _key(conn, created)
        conn.execute(
            "INSERT INTO documents (n, id, created, updated, version, body)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (n, doc.id, created, millis(doc.updated_at), doc.version, doc.json_bytes),
        )
        conn.execute("INSERT INTO words (rowid, terms) VALUES (?, ?)", (n, terms))
        self._index(conn, doc, n, drop=False)

    @staticmethod
    def _index(conn: sqlite3.Connection, doc: Document, n: int, drop: bool) -> None:
        """Add (or, with `drop`, remove) the rows that find `doc` by its tags and metadata."""
        tags = [(tag, n) for tag in doc.tags]
        values = [(k, _meta_value(v), n) for k, v in doc.metadata.items() if v is not None]
        if drop:
            conn.executemany("DELETE FROM tags WHERE tag = ? AND n = ?", tags)
            conn.executemany("DELETE FROM metadata WHERE key = ? AND value = ? AND n = ?", values)
        else:
            conn.executemany("INSERT INTO tags VALUES (?, ?)", tags)
            conn.executemany("INSERT INTO metadata VALUES (?, ?, ?)", values)

    def _current(
        self, conn: sqlite3.Connection, doc_id: str, if_version: int | None
    ) -> tuple[int, Document]:
        row = conn.execute("SELECT n, body FROM documents WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            raise DocumentNotFound(doc_id)
        doc = self._document(row[1])
        if if_version is not None and doc.version != if_version:
            raise stale(doc_id, doc.version)
        return row[0], doc

    async def create(
        self, data: DocumentCreate, *, idempotency: IdempotencyKey | None = None
    ) -> tuple[Document, bool]:
        body_print = fingerprint(data) if idempotency is not None else ""
        terms = await find_words(_terms, _chars(data), data)

        def job(conn: sqlite3.Connection) -> tuple[Document, bool]:
            now = self._clock()
            if idempotency is not None:
                scope = (idempotency.scope, idempotency.key)
                known = conn.execute(
                    "SELECT i.fingerprint, d.body FROM idempotency i"
                    " LEFT JOIN documents d ON d.id = i.document_id"
                    " WHERE i.scope = ? AND i.key = ? AND i.created > ?",
                    (*scope, millis(now) - TTL_MS),
                ).fetchone()
                if known is not None:
                    if known[0] != body_print and not same_body(known[0], data):
                        raise IdempotencyConflict(idempotency.key)
                    if known[1] is None:
                        reason = "for a document that has since been deleted"
                        raise IdempotencyConflict(idempotency.key, reason)
                    return self._document(known[1]), True
            # After every id of its millisecond, another worker's too: ids sort by creation.
            (last,) = conn.execute(
                "SELECT max(id) FROM documents WHERE created = ?", (millis(now),)
            ).fetchone()
            doc = new_document(data, self._new_id(now, last), now)
            self._insert(conn, doc, terms)  # first: it may refuse the document (DocumentInvalid)
            if idempotency is not None:
                # Each record written takes out up to two expired ones, oldest first, through
                # the index on `created`: the table holds about the keys of the last 24 h, at a
                # bounded cost per write.
                conn.execute(
                    "DELETE FROM idempotency WHERE (scope, key) IN (SELECT scope, key"
                    " FROM idempotency WHERE created <= ? ORDER BY created LIMIT 2)",
                    (millis(now) - TTL_MS,),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                    (*scope, body_print, doc.id, millis(now)),
                )
            return doc, False

        return await self._write(job)

    async def update(
        self, doc_id: str, patch: DocumentUpdate, *, if_version: int | None = None
    ) -> Document:
        # Its words are found from the document as read. If another write changes its text before
        # this one, it reads again: words are never found in the writer, which others wait for.
        while True:
            seen = await self.get(doc_id)
            preview = apply_patch(seen, patch, self._clock())
            terms = None
            if _text(seen) != _text(preview):
                terms = await find_words(_terms, _chars(preview), preview)

            def job(
                conn: sqlite3.Connection, seen: Document = seen, terms: str | None = terms
            ) -> Document | None:
                n, current = self._current(conn, doc_id, if_version)
                new = apply_patch(current, patch, self._clock())
                if new is current:
                    return current
                if _text(current) != _text(seen):
                    return None
                # Read in this transaction, which holds the write lock: no version check needed.
                sql = "UPDATE documents SET updated = ?, version = ?, body = ? WHERE n = ?"
                conn.execute(sql, (millis(new.updated_at), new.version, new.json_bytes, n))
                if terms is not None:
                    conn.execute("UPDATE words SET terms = ? WHERE rowid = ?", (terms, n))
                self._index(conn, current, n, drop=True)
                self._index(conn, new, n, drop=False)
                return new

            if (written := await self._write(job)) is not None:
                return written

    async def delete(self, doc_id: str, *, if_version: int | None = None) -> None:
        def job(conn: sqlite3.Connection) -> None:
            n, current = self._current(conn, doc_id, if_version)
            conn.execute("DELETE FROM documents WHERE n = ?", (n,))
            conn.execute("DELETE FROM words WHERE rowid = ?", (n,))
            self._index(conn, current, n, drop=True)

        await self._write(job)

    async def import_documents(self, docs: Sequence[Document]) -> int:
        # One job for them all: a job each (its future, its savepoint) cost more than its insert.
        # Their words are found first, as a create's are: not in the transaction.
        terms = await find_words(lambda: [_terms(doc) for doc in docs], _chars(*docs))

        def job(conn: sqlite3.Connection) -> int:
            added = 0
            for doc, words in zip(docs, terms, strict=True):
                if conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc.id,)).fetchone():
                    continue
                try:
                    self._insert(conn, doc, words)
                except DocumentInvalid as exc:
                    exc.doc_id = doc.id
                    raise
                added += 1
            return added

        return await self._write(job)

    # reads

    def _document(self, body: bytes) -> Document:
        return self._parsed(body) if len(body) <= PARSED_BODY_MAX else _parse(body)

    async def _read(
        self,
        sql: str,
        params: tuple[Any, ...] | list[Any],
        fetch: Callable[[sqlite3.Cursor], Any] = sqlite3.Cursor.fetchall,
    ) -> Any:
        """What `fetch` takes of the rows of `sql`: on the event loop within LOOP_BUDGET_S, else
        in a thread. The key is charged its CPU time, the rest is recorded as waits (on_cpu)."""
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        conn = self._connection()
        if self._loop_thread != threading.get_ident():
            self._loop_thread = threading.get_ident()
            conn.set_progress_handler(self._over_budget, 1000)
        started, cpu = time.perf_counter(), time.thread_time()
        self._deadline = started + LOOP_BUDGET_S
        try:
            try:
                return fetch(conn.execute(sql, params))
            except sqlite3.OperationalError as exc:
                if str(exc) != "interrupted":
                    raise
            finally:
                StoreWork.waited(time.perf_counter() - started - (time.thread_time() - cpu))
            await StoreWork.before_long_work()
            started = time.perf_counter()
            rows, cpu = await anyio.to_thread.run_sync(
                on_cpu, lambda: fetch(self._connection().execute(sql, params))
            )
            StoreWork.waited(time.perf_counter() - started - cpu)
            return rows
        except sqlite3.Error as exc:
            self._note_damage(exc)
            raise StoreUnavailable(f"cannot read the database: {exc}") from exc

    def _over_budget(self) -> bool:
        return threading.get_ident() == self._loop_thread and time.perf_counter() > self._deadline

    async def get(self, doc_id: str) -> Document:
        rows = await self._read("SELECT body FROM documents WHERE id = ?", (doc_id,))
        if not rows:
            raise DocumentNotFound(doc_id)
        return self._document(rows[0][0])

    async def page(
        self, query: DocumentQuery, *, limit: int, after: Key | None = None
    ) -> tuple[list[Document], Key | None]:
        rows: list[Any] = []
        by_created = query.sort_field == "created_at"
        while not rows:  # found again if what a crowded page took was deleted meanwhile
            following = None
            if after is not None and by_created:
                # The rest of the cursor's millisecond first, in id order from the cursor (its
                # keys, in the order written, would step past every row of it sent before).
                sql, params = page_sql(query, limit + 1, after, millisecond=after[0])
                rows, following = await self._read(
                    sql, params, functools.partial(_page_rows, limit=limit)
                )
            if following is not None:  # the millisecond's rest fills the page
                break
            sql, params = page_sql(query, limit + 1, after)  # the page goes on past it
            rows, following = await self._read(
                sql, params, functools.partial(_page_rows, limit=limit, rows=rows)
            )
            if not by_created or not rows:
                break
            # By creation time, keys sort as times do, but those of one millisecond in the order
            # written: the page's are put in id order (a body begins with its id). A page that
            # ends inside a millisecond, or at a row too large to fit, goes on with the ids of
            # that millisecond in order.
            if len({key // SLOTS for key, _ in rows}) < len(rows):
                rows.sort(key=lambda row: (row[0] // SLOTS, row[1]), reverse=query.descending)
            last = rows[-1][0] // SLOTS
            if following is not None and (len(rows) < limit or following // SLOTS == last):
                rows, following = await self._crowded_page(query, limit, after, rows, following)
        items = [self._document(body) for _, body in rows]
        return items, query.position(items[-1]) if following is not None else None

    async def _crowded_page(
        self, query: DocumentQuery, limit: int, after: Key | None, rows: list[Any], following: int
    ) -> tuple[list[Any], int | None]:
        """`rows` without those of the millisecond of `following`, then that millisecond's in id
        order; and the key of the first row after the page, if any."""
        millisecond = following // SLOTS
        rows = [row for row in rows if row[0] // SLOTS != millisecond]
        sql, params = page_sql(query, limit - len(rows) + 1, after, millisecond=millisecond)
        rows, following = await self._read(
            sql, params, functools.partial(_page_rows, limit=limit, rows=rows)
        )
        if following is not None:
            return rows, following
        sql, params = page_sql(query, 1, (millisecond, ""), keys=True)  # past that millisecond
        row = await self._read(sql, params, sqlite3.Cursor.fetchone)
        return rows, None if row is None else row[0]

    async def export_documents(self) -> AsyncIterator[Document]:
        after: Key | None = None
        query = DocumentQuery(sort="created_at")
        while True:
            items, after = await self.page(query, limit=500, after=after)
            for doc in items:
                yield doc
            if after is None:
                return

    async def count(self) -> int:
        rows = await self._read("SELECT count(*) FROM documents", ())
        return int(rows[0][0])

    async def cursor_secret(self) -> bytes:
        return self._secret  # made once by the first migration, never changed

    async def check(self) -> None:
        try:
            # A newer version's service may have migrated the database under this one.
            ((version,),) = await self._read("PRAGMA user_version", ())
            if version != len(MIGRATIONS):
                raise StoreUnavailable(f"{self.path} was migrated to schema {version} since")
            await anyio.to_thread.run_sync(self._probe)
            # The probe's own reads and writes may miss the damaged pages a request met.
            if self._damaged:
                raise StoreUnavailable(
                    f"the database is damaged ({self._damaged}): check and recover it as the "
                    "runbook says, or restore a backup"
                )
            # A write transaction that changes nothing, which writes nothing, tells whether the
            # write lock can be had (another program may hold it); while writes are failing (an
            # I/O error, say) one writes a row anew, and the first to succeed ends the failure
            # (a row rewritten as it was is a page SQLite does not write, nor the disk sync).
            rewrite = "INSERT OR REPLACE INTO meta VALUES ('probe', randomblob(8))"
            sql = rewrite if self._write_failed else "SELECT 1"
            with anyio.move_on_after(PROBE_WRITE_S) as waited:
                await self._write(lambda conn: conn.execute(sql).fetchall())
            if waited.cancelled_caught:
                raise StoreUnavailable(f"a write waited more than {PROBE_WRITE_S:g} s")
            if self._write_failed:
                raise StoreUnavailable(f"writes are failing: {self._write_failed}")
        except StoreUnavailable as exc:
            self._outage.failed(str(exc))
            raise
        self._outage.answered()

    def _check_files(self) -> None:
        if identity(self.path) != self._file:
            raise StoreUnavailable(f"{self.path} was replaced or removed: restart")

    def _note_damage(self, exc: BaseException) -> None:
        """Damage SQLite met, kept until the next start of a first process on the database, for
        every process on it: each one's readiness says so, whatever its own requests met."""
        if (damage := _damage(exc)) and not self._damaged:
            self._damaged = damage
            # Neither following a link put there nor blocking on a FIFO; this process's
            # readiness says so all the same if it cannot be written.
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
            with contextlib.suppress(OSError):
                fd = os.open(self.data_dir / DAMAGE_FILE, flags, 0o600)
                with open(fd, "wb") as file:
                    file.write(damage.encode()[:DAMAGE_MAX])

    def _probe(self) -> None:
        self._check_files()
        try:
            # Absent: no process met damage since the first start.
            if not self._damaged and (damage := read_own(self.data_dir / DAMAGE_FILE, DAMAGE_MAX)):
                self._damaged = damage.decode("utf-8", "replace")
        except StoreCorrupt as exc:
            raise StoreUnavailable(str(exc)) from exc
        try:
            if not os.access(self.data_dir, os.W_OK):
                raise StoreUnavailable("the data directory is not writable")
            if os.statvfs(self.data_dir).f_bavail == 0:
                raise StoreUnavailable("the data directory's filesystem is full")
        except OSError as exc:
            raise StoreUnavailable(f"the data directory cannot be read: {exc.strerror}") from exc

    def backup(self, target: Path) -> None:
        """A consistent copy through SQLite's online backup API, in one step (one read
        transaction, which writers never wait for under WAL), marked as a backup, and linked
        into place whole: a failure leaves nothing, a crash at most `.*.backup-partial`."""
        if os.path.lexists(target):
            raise StoreUnavailable(f"{target} exists; back up to a new file")
        check_target(target, self.data_dir)
        # Made here, by a random name, with no link followed: SQLite would write the copy
        # through a link planted at a predictable name.
        try:
            fd, name = tempfile.mkstemp(".backup-partial", ".", target.parent)  # short names
        except OSError as exc:
            raise StoreUnavailable(f"cannot write the backup {target}: {exc}") from exc
        os.close(fd)
        partial = Path(name)
        try:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                self._connection().backup(copy)
                copy.execute(f"PRAGMA application_id = {BACKUP_ID}")
            os.link(partial, target)
            sync_directory(target.parent)
        except FileExistsError:
            raise StoreUnavailable(f"{target} exists; back up to a new file") from None
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot write the backup {target}: {exc}") from exc
        finally:
            for name in ("", "-journal", "-wal", "-shm"):
                partial.with_name(partial.name + name).unlink(missing_ok=True)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self.close_sync)

    def close_sync(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._jobs.put(None)
            writer.join()
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        self._local = threading.local()
        if self._legacy_fd is not None:
            os.close(self._legacy_fd)
            self._legacy_fd = None


def _damage(exc: BaseException) -> str:
    """What SQLite said if it found the database's file damaged ("malformed"), else ""."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    return str(exc) if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) else ""


def _terms(doc: Document | DocumentCreate) -> str:
    """A document's words as the words table takes them."""
    return " ".join(document_words(doc.title, doc.content))


def _chars(*docs: Document | DocumentCreate) -> int:
    return sum(len(doc.title) + len(doc.content) for doc in docs)


def _text(doc: Document) -> tuple[str, str]:
    return doc.title, doc.content


def _page_rows(
    cursor: sqlite3.Cursor, limit: int, rows: list[Any] | None = None
) -> tuple[list[Any], int | None]:
    """`rows` (none by default) and the rows of (key, body) after them, up to `limit` in all,
    ending before the row that would take their bodies past
    PAGE_MAX_BYTES (at least one); and the key of the row after them (None: no row is left). No
    more is read: a page of large documents read whole would hold the event loop (a blob is one
    step of the progress handler, however large) and its memory for nothing."""
    rows = list(rows or ())
    size = sum(len(body) for _, body in rows)
    for row in cursor:
        size += len(row[1])
        if len(rows) == limit or (rows and size > PAGE_MAX_BYTES):
            return rows, row[0]
        rows.append(row)
    return rows, None


def _parse(body: bytes) -> Document:
    doc = Document.model_validate_json(body)
    doc.__dict__["json_bytes"] = body  # its response, with no encoding
    return doc


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in outcomes:
        if future.done():
            continue  # the caller was cancelled; the write itself stands
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def page_sql(
    query: DocumentQuery,
    limit: int,
    after: Key | None,
    *,
    keys: bool = False,
    millisecond: int | None = None,
) -> tuple[str, list[Any]]:
    """One statement per listing, driven by an index that walks the page in its order: by
    creation time, one of keys (the FTS5 words for `q`, else the first tag's or metadata
    filter's rows, else the documents'); by update time, the one on (updated, id), each entry
    tested against the filters, so a walk reads each entry once, where sorting every match
    for every page had read each match's row (quadratic in the matches). By creation time
    only: `after` starts past its millisecond (page() reads the rest of it first); with `keys`,
    the keys of every match after it; with `millisecond`, that millisecond's matches in id
    order, after `after` if it is of that millisecond."""
    by_created = query.sort_field == "created_at"
    # Each tag and metadata filter: its table and the condition its rows meet.
    filters = [("tags", "tag = ?", [tag]) for tag in query.tag] + [
        (
            "metadata",
            f"key = ? AND value IN ({', '.join('?' * len(vs))})",
            [k, *map(_meta_value, vs)],
        )
        for k, vs in query.metadata_values
    ]
    source, key, where, params = "documents d", "d.n", list[str](), list[Any]()
    merged = False  # the rows come from several ranges of their index, which SQLite sorts
    match = " ".join(f'"{word}"' for word in query.words)
    # A millisecond's page walks the index on (created, id): in id order, reading only the rows
    # it sends, where the keys' range would read each row of the millisecond to sort them.
    if millisecond is not None:
        where.append("d.created = ?")
        params.append(millisecond)
        if query.words:  # the millisecond's matches, found once (+: no row looked up by key)
            matches = "SELECT rowid FROM words WHERE words MATCH ? AND rowid >= ? AND rowid < ?"
            where.append(f"+d.n IN ({matches})")
            params += [match, millisecond * SLOTS, (millisecond + 1) * SLOTS]
    elif query.words and not by_created:  # the matches' keys, found once (+: none looked up)
        where.append("+d.n IN (SELECT rowid FROM words WHERE words MATCH ?)")
        params.append(match)
    elif query.words:
        source, key = "words w CROSS JOIN documents d ON d.n = w.rowid", "w.rowid"
        where.append("w.words MATCH ?")
        params.append(match)
    elif filters and by_created:
        table, condition, values = filters.pop(0)
        merged = len(values) > 2  # a metadata key and a value of several stored forms
        # Merged, SQLite sorts the keys: with no row read for them (a document is read below
        # only for what it alone holds), where a row had been read for each remaining match.
        source = f"{table} t" if merged else f"{table} t CROSS JOIN documents d ON d.n = t.n"
        key = "t.n"
        where.append(condition)
        params += values
    for table, condition, values in filters:  # tested on the key, before its row is read
        where.append(f"EXISTS (SELECT 1 FROM {table} WHERE {condition} AND n = {key})")  # noqa: S608
        params += values
    # One bound a side for each index (SQLite seeks on the first of two, and a range's end
    # before the cursor had each page walk from there again): a range's, or the cursor's.
    # A key's millisecond is its creation's: a creation time bounds the key itself, exactly.
    created = [
        None if at is None else millis(at) * SLOTS
        for at in (query.created_after, query.created_before)
    ]
    updated = [
        None if at is None else millis(at) for at in (query.updated_after, query.updated_before)
    ]
    side = int(query.descending)  # the bound the cursor moves: the lower one walking up
    if after is not None and millisecond is None and by_created:  # past the cursor's millisecond
        cursor, bound = (after[0] + 1 - side) * SLOTS, created[side]
        created[side] = cursor if bound is None else (max, min)[side](bound, cursor)
    elif after is not None and millisecond is None:
        bound = updated[side]
        if bound is not None and (after[0] < bound if side else after[0] >= bound):
            updated[side] = None  # the cursor's (time, id) is past it
    # SQLite before 3.42 skips matches when FTS5 walks its rowids downward from an upper bound:
    # there the words' index walks down from the newest, and the bound (out of the index's
    # reach behind a unary +) only filters, reading every newer match again for each page.
    downward = query.words and by_created and query.descending
    below = f"+{key}" if downward and FTS5_SEEKS_DOWN_WRONG else key
    # Each sort's own index walks the page: the other time only filters, out of reach behind
    # a unary + (SQLite had taken the other index and sorted every match).
    low_key, high_key = (key, below) if by_created else (f"+{key}", f"+{key}")
    time = "+d.updated" if by_created else "d.updated"
    if merged:
        time = f"(SELECT updated FROM documents WHERE n = {key})"  # noqa: S608
    bounds = [(low_key, high_key, created), (time, time, updated)]
    for low, high, (start, end) in bounds if millisecond is None else bounds[1:]:
        if start is not None:
            where.append(f"{low} >= ?")
            params.append(start)
        if end is not None:
            where.append(f"{high} < ?")
            params.append(end)
    op = "<" if query.descending else ">"
    if after is not None and after[0] == millisecond:  # where the index walk starts
        where.append(f"d.id {op} ?")
        params.append(after[1])
    elif after is not None and not by_created:
        where.append(f"(d.updated, d.id) {op} (?, ?)")
        params += list(after)
    direction = " DESC" if query.descending else ""
    found = f"FROM {source}" + (f" WHERE {' AND '.join(where)}" if where else "")
    # Only fixed fragments are joined here; every value is a parameter.
    if keys:
        return f"SELECT {key} {found} ORDER BY {key}{direction}", params
    if millisecond is not None:
        order = f"d.id{direction}"
    elif by_created:
        order = f"{key}{direction}"
    else:
        order = f"d.updated{direction}, d.id{direction}"
    # An index walks the page in its order: the keys' own (by creation time), the one on
    # (created, id) (a millisecond's), or the one on (updated, id). Else SQLite sorts the
    # matches, which with their bodies would read every one: the keys alone then.
    if not merged:  # merged: only by creation time, never a millisecond's
        return f"SELECT {key}, d.body {found} ORDER BY {order} LIMIT {int(limit)}", params
    return _bodies_of(f"SELECT {key} AS k {found} ORDER BY {order}", limit), params


def _bodies_of(keys: str, limit: int) -> str:
    """The first `limit` keys `k` of a sorted statement with their bodies. SQLite sorts the keys
    alone, then reads each body as its row is stepped to, so no more are read than fit. An outer
    ORDER BY would sort again, with every body; the keys' subquery (a co-routine) yields them in
    its order (the contract tests walk every sort and filter, and would see another)."""
    sorted_keys = f"{keys} LIMIT {int(limit)}"
    return f"SELECT k, (SELECT body FROM documents WHERE n = k) FROM ({sorted_keys})"  # noqa: S608
