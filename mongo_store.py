"""The MongoDB store: any number of processes share one database. Imported only when
`DATABASE_URL` is set, so a service on the embedded store never loads pymongo."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pymongo
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, monitoring
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    WaitQueueTimeoutError,
    WriteConcernError,
)

from logging_config import Outage, clip
from models import (
    WORDS_RULES,
    Document,
    DocumentCreate,
    DocumentQuery,
    DocumentUpdate,
    document_words,
    from_millis,
)
from ratelimit import StoreWork
from storage import (
    IDEMPOTENCY_TTL,
    PAGE_MAX_BYTES,
    Clock,
    DocumentNotFound,
    IdempotencyConflict,
    IdempotencyKey,
    IdGenerator,
    Key,
    ReadStopped,
    StoreAuthenticationFailed,
    StoreError,
    StoreUnavailable,
    apply_patch,
    find_words,
    fingerprint,
    new_document,
    stale,
    utc_now,
)

log = logging.getLogger("documents.store")
# How long the start waits for MongoDB before it serves anyway (not ready until it answers).
FIRST_CONTACT_SECONDS = 1.0
IMPORTS_AT_ONCE = 50
AUTHENTICATION_FAILED = 18  # MongoDB's error code
INDEX_NOT_FOUND = 27
BAD_VALUE = 2  # what a hint naming an index the collection no longer has gets
# What MongoDB answers when it cannot serve right now: a node unreachable, stepping down or
# shutting down (the codes the driver itself retries), a lock or write conflict it gave up on,
# no node the read may use, an operation or cursor killed under it (an operator's killOp, a
# plan or cursor dropped). Each is 503, to retry; they were 500. A refusal a retry would meet
# again (a bad value, missing rights, a validation rule) stays 500: a bug or a deployment to fix.
UNAVAILABLE_CODES = frozenset(
    {6, 7, 24, 43, 89, 91, 112, 133, 134, 175, 189, 237, 262, 9001, 10058, 10107, 11600, 11601}
    | {11602, 13435, 13436}
)
# What MongoDB names a command it stopped at its maxTimeMS: work it did, charged to the read.
STOPPED_AT_TIME_LIMIT = "MaxTimeMSExpired"
# How long a process signs cursors with the secret it read before it reads it again.
SECRET_READ_EVERY_S = 5.0
# How long the background pass for missing words waits after a failure.
WORDS_RETRY_SECONDS = 30.0
# A deleted document that its create's Idempotency-Key could bring back stays as a tombstone
# (see MongoStore.delete) for as long as the key lives, with an hour's margin for clock skew.
TOMBSTONE: dict[str, Any] = {"deleted_at": {"$exists": True}}
LIVE: dict[str, Any] = {"deleted_at": {"$exists": False}}
TOMBSTONE_TTL = IDEMPOTENCY_TTL + timedelta(hours=1)
LAST = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)  # the last stored millisecond
INDEX_RETRY_SECONDS = 5  # as the Retry-After of a 503
# Between attempts at the indexes while MongoDB cannot be reached (each waits up to the timeout
# for it to answer).
UNREACHABLE_RETRY_SECONDS = 0.5
# Reads leave `words` on the server: only queries use them, and a long text has many.
NO_WORDS = {"words": False}
# What a listing first reads of each match: the size of the JSON it sends, kept beside it (as
# stored, words and metadata pairs included, pages ended early: 8 documents where SQLite sent
# 10); of a document written before it was kept, its size as stored, without its words.
SIZE = {
    "size": {
        "$ifNull": [
            "$json_size",
            {"$subtract": [{"$bsonSize": "$$ROOT"}, {"$bsonSize": {"w": "$words"}}]},
        ]
    }
}
NEWEST = [("created_at", DESCENDING), ("_id", DESCENDING)]
# Every listing names its index (see MongoStore._index_for): one scan, never the collection.
INDEXES = {
    "created": NEWEST,
    "updated": [("updated_at", DESCENDING), ("_id", DESCENDING)],
    "words_created": [("words", ASCENDING), *NEWEST],
    "tags_created": [("tags", ASCENDING), *NEWEST],
    "metadata_created": [("metadata.k", ASCENDING), ("metadata.v", ASCENDING), *NEWEST],
}


def _to_mongo(doc: Document, words: list[str] | None) -> dict[str, Any]:
    raw = doc.model_dump()
    raw["_id"] = raw.pop("id")
    # Metadata keys are user data: as {k, v} pairs they may contain "." "$" or NUL, which BSON
    # field names may not.
    raw["metadata"] = [{"k": k, "v": v} for k, v in doc.metadata.items()]
    if words is not None:
        raw["words"] = words
    raw["json_size"] = len(doc.json_bytes)
    return raw


def _sorted_words(title: str, content: str) -> list[str]:
    """The words `q` finds, from the same tokenizer as the embedded store (MongoDB's own text
    index stems words and would find other documents)."""
    return sorted(document_words(title, content))


async def _words_of(title: str, content: str) -> list[str]:
    return await find_words(_sorted_words, len(title) + len(content), title, content)


def _key_id(idempotency: IdempotencyKey) -> str:
    return f"{len(idempotency.scope)}:{idempotency.scope}:{idempotency.key}"


def _from_mongo(raw: dict[str, Any]) -> Document:
    raw["id"] = raw.pop("_id")
    raw.pop("idempotency_key", None)
    raw.pop("restored_by", None)
    raw.pop("words", None)
    raw.pop("json_size", None)
    raw["metadata"] = {pair["k"]: pair["v"] for pair in raw["metadata"]}
    return Document.model_validate(raw)


# When the current driver call began, or last had an answer (set in the request's own task).
_since: ContextVar[float | None] = ContextVar("since", default=None)


class _UnchargedWaits(monitoring.CommandListener):
    """A read is charged its time (ratelimit.StoreWork), but not the time before each of its
    commands goes out (selecting a server that is away or coming back, waiting for one of the
    driver's connections that others' work holds), nor an attempt MongoDB never answered (cut,
    or its answer lost), which the driver retried: none is the read's cost. pymongo calls
    these in the task that runs the command."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if (since := _since.get()) is not None:
            StoreWork.waited(time.perf_counter() - since)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        _since.set(time.perf_counter())

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        if event.failure.get("codeName") != STOPPED_AT_TIME_LIMIT:
            StoreWork.waited(event.duration_micros / 1e6)
        _since.set(time.perf_counter())


@contextmanager
def _uncharged() -> Iterator[None]:
    """A read an index bounds (a get by id, a page in the order of an index): its unit covers
    it. MongoDB says nothing of what a read cost it, and its time by the clock is the network's
    and the server's, however loaded: a link that held each command 0.5 s cost a GET 51 units.
    Its whole time is recorded as a wait, which the read's charge leaves out: what the driver's
    listener recorded within it already, and the rest."""
    started, recorded = time.perf_counter(), StoreWork.waits_so_far()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        StoreWork.waited(elapsed - (StoreWork.waits_so_far() - recorded))


def _cause(exc: BaseException) -> str:
    """The error's class and the driver's first words on why (a refused connection, a timeout,
    and where), without its timeouts and topology: what an outage line says. PyMongo's messages
    name hosts, never a password."""
    reason = re.split(r" \(configured timeouts|, Timeout: ", str(exc), maxsplit=1)[0]
    return clip(f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__, 300)


@contextmanager
def _driver_errors(outage: Outage, *, ends_outage: bool = True) -> Iterator[None]:
    """Translate PyMongo's errors in one place: unreachable or overloaded is 503, the rest 500.
    `outage` is the kind of operation's (reads or writes) that an answer ends."""
    _since.set(time.perf_counter())  # not reset: an export's generator may end elsewhere
    try:
        yield
    except (ExecutionTimeout, NetworkTimeout) as exc:
        stopped = isinstance(exc, ExecutionTimeout) and (exc.details or {}).get("codeName")
        if stopped == STOPPED_AT_TIME_LIMIT:
            # The server worked on it until its maxTimeMS: the operation's own cost, charged to
            # its key. (The driver raises ExecutionTimeout with no codeName for an operation it
            # never sent, the time left gone waiting for a connection, say.)
            raise ReadStopped("MongoDB stopped the operation at its time limit.") from exc
        # No answer in time: a server or network that hangs, not the operation's cost, so it
        # is not charged; a key would otherwise be locked out past the outage.
        outage.failed(_cause(exc))
        raise StoreUnavailable("MongoDB did not answer within the time limit.") from exc
    except (ConnectionFailure, WaitQueueTimeoutError, WriteConcernError) as exc:
        outage.failed(_cause(exc))
        raise StoreUnavailable("Cannot reach MongoDB; try again shortly.") from exc
    except ConfigurationError as exc:
        # At first contact, a mongodb+srv:// name DNS did not resolve. A service's start gives
        # DNS FIRST_CONTACT_SECONDS: a name that does not exist stops it, a DNS server that does
        # not answer in time is an outage (see open). DNS's message names the host only.
        raise StoreError(f"cannot use DATABASE_URL: {exc}") from exc
    except OperationFailure as exc:
        if exc.code == BAD_VALUE and "existing index" in str(exc):
            outage.failed("indexes lost")
            raise IndexesLost("MongoDB has lost the store's indexes; try again shortly.") from exc
        if exc.code == AUTHENTICATION_FAILED:
            raise StoreAuthenticationFailed(
                "MongoDB authentication failed: check the user and password in DATABASE_URL"
            ) from exc
        if exc.code in UNAVAILABLE_CODES:
            outage.failed(f"{type(exc).__name__} {exc.code}")
            raise StoreUnavailable("MongoDB cannot serve right now; try again shortly.") from exc
        raise StoreError(f"MongoDB refused the operation: {type(exc).__name__}") from exc
    except PyMongoError as exc:
        raise StoreError(f"MongoDB refused the operation: {type(exc).__name__}") from exc
    else:
        if ends_outage:
            outage.answered()


class IndexesLost(StoreUnavailable):
    """A read named an index the collection no longer has: its database was dropped or emptied
    under the service (a MongoDB restarted without its volume)."""


class MongoStore:
    """The scale-out store: any number of processes share one MongoDB database.

    Uses PyMongo's asyncio client, so no call blocks the event loop. Conditional writes are
    compare-and-set on `version` in one server operation; indexes are created at startup (or in
    the background once MongoDB answers, if it was down then).
    """

    backend = "mongodb"

    def __init__(self, url: str, *, timeout_ms: int = 5000, clock: Clock = utc_now) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url,
            w="majority",
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            # Bounds every operation and sends what is left of it as maxTimeMS, so the server
            # stops work nobody waits for any more.
            timeoutMS=timeout_ms,
            event_listeners=[_UnchargedWaits()],
        )
        # The URL's database, read as the client parsed it: pymongo's parse_uri would resolve a
        # mongodb+srv:// name through DNS here, blocking the event loop. The client resolves it
        # at first contact, without blocking (_driver_errors translates its failure).
        self._db = self._client.get_default_database("documents")
        self._docs = self._db["documents"]
        self._idempotency = self._db["idempotency"]
        self._clock = clock
        self._timeout_s = timeout_ms / 1000
        self._new_id = IdGenerator()
        self._indexes_ready = False
        self.indexes_made: asyncio.Task[None] | None = None
        self._cursor_secret: bytes | None = None
        self._secret_read_at = -math.inf  # when to read it again
        self.words_added: asyncio.Task[int] | None = None
        self._importing = asyncio.Semaphore(IMPORTS_AT_ONCE)
        # MongoDB not answering, or not within its time limit: reads and writes each have an
        # outage of their own, since MongoDB may refuse one and not the other (a full disk, no
        # primary). Ended by the other kind's answers, one outage logged a pair of lines for
        # each request that met it.
        self._reads = Outage(log, "store", operations="reads")
        self._writes = Outage(log, "store", operations="writes")

    @classmethod
    async def open(
        cls, url: str, *, timeout_ms: int = 5000, clock: Clock = utc_now, serving: bool = True
    ) -> MongoStore:
        """A service waits at most FIRST_CONTACT_SECONDS for MongoDB, so it answers liveness
        at once. Refused credentials, or a mongodb+srv:// name DNS does not know, stop the
        start; an unreachable server (or DNS not answering) does not: the
        process stays up, reports not ready, and makes the indexes in the background. A task
        (serving=False) has nothing to answer meanwhile: each call waits its timeout, and a
        server that does not answer stops it."""
        try:
            store = cls(url, timeout_ms=timeout_ms, clock=clock)
        except (ConfigurationError, OSError) as exc:  # a malformed option, a TLS file
            # pymongo's messages name what is wrong, never the password.
            raise StoreError(f"cannot use DATABASE_URL: {exc}") from exc
        try:
            with anyio.fail_after(FIRST_CONTACT_SECONDS if serving else None):
                await store._build_indexes()
        except (StoreUnavailable, TimeoutError) as exc:
            if not serving or isinstance(exc, StoreAuthenticationFailed):
                await store.close()
                raise
            # Cut short at FIRST_CONTACT_SECONDS, the driver's last word on each server says why.
            errors = [
                s.error for s in store._client.topology_description.server_descriptions().values()
            ]
            cause = exc.__cause__ or next(filter(None, errors), None)
            error = _cause(cause) if cause else f"no answer within {FIRST_CONTACT_SECONDS} s"
            log.warning(
                "store.unreachable_at_startup", extra={"backend": cls.backend, "error": error}
            )
            store.indexes_made = asyncio.get_running_loop().create_task(store._make_indexes())
        except StoreError:  # refused: a name DNS does not know, an index the server will not make
            await store.close()
            raise
        else:
            store._indexes_are_made()
        return store

    async def _make_indexes(self) -> None:
        """Until MongoDB has the indexes, every request and probe answers 503: none makes them,
        so none waits on, or repeats, a build that anyone can trigger. A build MongoDB refused
        (not one it never saw) is tried again after a pause, as what refused it (an index, the
        credentials) may be fixed on the server at any time; a cause is logged when it changes,
        not at every try, so the line that names it is not buried under copies."""
        logged = ""
        while True:
            try:
                await self._build_indexes()
                break
            except StoreError as exc:
                # Refused: an operation or the credentials (not a server that never answered).
                refused = isinstance(exc, StoreAuthenticationFailed) or not isinstance(
                    exc, StoreUnavailable
                )
                if refused and str(exc) != logged:
                    log.error("store.indexes_refused", extra={"error": str(exc)}, exc_info=True)
                    logged = str(exc)
                await asyncio.sleep(INDEX_RETRY_SECONDS if refused else UNREACHABLE_RETRY_SECONDS)
        log.info("store.indexes_made", extra={"backend": self.backend})
        self._indexes_are_made()

    def _indexes_are_made(self) -> None:
        self._indexes_ready = True
        if self.words_added is not None:  # a pass from before the indexes were lost
            self.words_added.cancel()
        # In the background, so that a large collection does not hold up the start.
        self.words_added = asyncio.get_running_loop().create_task(self._add_missing_words())

    def _remake_indexes(self) -> None:
        """The indexes are gone (a database dropped or emptied under the service): every request
        and probe answers 503 until they are made again, as after a start without MongoDB, and
        the cursor secret is read again (made again, if it went with them)."""
        if self._indexes_ready:
            self._indexes_ready = False
            self._cursor_secret = None
            log.warning("store.indexes_lost", extra={"backend": self.backend})
            self.indexes_made = asyncio.get_running_loop().create_task(self._make_indexes())

    def _require_indexes(self) -> None:
        if not self._indexes_ready:
            raise StoreUnavailable("MongoDB's indexes are not made yet; try again shortly.")

    async def _build_indexes(self) -> None:
        with _driver_errors(self._writes):
            for name, keys in INDEXES.items():
                await self._docs.create_index(keys, name=name)
            try:
                await self._docs.drop_index("tag_newest")  # replaced by tags_created
            except OperationFailure as exc:
                if exc.code != INDEX_NOT_FOUND:
                    raise
            await self._idempotency.create_index(
                "created_at",
                expireAfterSeconds=int(IDEMPOTENCY_TTL.total_seconds()),
                name="ttl_24h",
            )
            await self._docs.create_index(
                "deleted_at",
                expireAfterSeconds=int(TOMBSTONE_TTL.total_seconds()),
                name="tombstones",
            )

    async def _add_missing_words(self) -> int:
        """Documents written before the word index have no `words`, so `q` cannot find them
        until they get theirs here; nor, after an upgrade that finds other words in some texts,
        by the words the new rules find, until every document's are found again here. A failed
        pass waits and starts again by itself: requests that meet a struggling server are not
        the ones to restart it."""
        while True:
            try:
                return await self._words_pass()
            except StoreError:
                log.warning("store.words_not_added", extra={"retry_seconds": WORDS_RETRY_SECONDS})
                await asyncio.sleep(WORDS_RETRY_SECONDS)

    async def _words_pass(self) -> int:
        """The documents without words; every document, once `meta` says other rules found
        them (WORDS_RULES: another version's, another Python's Unicode), or none. A document
        whose text changed since it was read is left to its writer, which found the words of
        its new text; one whose tags or metadata changed is not (an edit of those finds no
        words). Several workers may do this at once: each document is written once."""
        added = 0
        with _driver_errors(self._writes):
            meta = self._db["meta"]
            rules = await meta.find_one({"_id": "words_rules"})
            again = rules is None or rules.get("value") != WORDS_RULES
            which = LIVE if again else {"words": {"$exists": False}, **LIVE}
            fields = ["title", "content", "words"]
            found = self._docs.find(which, fields).hint("created" if again else "words_created")
            async for raw in found:
                words = await _words_of(raw["title"], raw["content"])
                if words != raw.get("words"):
                    text = {"title": raw["title"], "content": raw["content"]}
                    result = await self._docs.update_one(
                        {"_id": raw["_id"], **text, **which}, {"$set": {"words": words}}
                    )
                    added += result.modified_count
            if again:
                rule = {"$set": {"value": WORDS_RULES}}
                await meta.update_one({"_id": "words_rules"}, rule, upsert=True)
        if added:
            log.info("store.words_added", extra={"added": added})
        return added

    async def create(
        self, data: DocumentCreate, *, idempotency: IdempotencyKey | None = None
    ) -> tuple[Document, bool]:
        self._require_indexes()
        words = await _words_of(data.title, data.content)
        # Timed once its words are found (tens of ms for a large text), just before its insert:
        # timed first, it fell behind documents created and listed meanwhile, where a walk in
        # creation order that had passed them never saw it.
        now = self._clock()
        doc = new_document(data, self._new_id(now), now)
        raw = _to_mongo(doc, words)
        if idempotency is not None:
            raw["idempotency_key"] = _key_id(idempotency)
            original = await self._claim(idempotency, fingerprint(data), raw, now)
            if original is not None:
                return original, True
        if await self._insert_new(self._docs, raw):
            return doc, False
        # Its id is taken: by this very insert, which the driver retried once its answer was
        # lost, or, with a key, by a retry that finished this create from the claim first (the
        # document may since have been deleted). Either way this request is the original, not a
        # replay. Answer from what is stored: a refusal with nothing stored was acknowledged 201
        # and then 404.
        try:
            return await self.get(doc.id), False
        except DocumentNotFound:
            if idempotency is None:
                raise StoreUnavailable("MongoDB did not confirm the insert; try again.") from None
            raise IdempotencyConflict(
                idempotency.key, "for a document that has since been deleted"
            ) from None

    async def _claim(
        self, idempotency: IdempotencyKey, body_print: str, raw: dict[str, Any], now: datetime
    ) -> Document | None:
        """Record the key, with the document it creates, before the document exists: two
        racing requests cannot both create, and a retry can finish a create whose insert was
        lost (a cut connection, a timeout, a worker killed between the two writes). Returns the
        original document when the key is already taken. The record leaves out the words, which
        a retry finds again: a document of many short words is several times their text."""
        key_id = raw["idempotency_key"]
        document = {k: v for k, v in raw.items() if k != "words"}
        claim = {"_id": key_id, "fingerprint": body_print, "document": document, "created_at": now}
        for _ in range(2):
            if await self._insert_new(self._idempotency, claim):
                return None
            with _driver_errors(self._reads):
                known = await self._idempotency.find_one({"_id": key_id})
            if known is None:
                continue
            if known["document"]["_id"] == raw["_id"]:
                return None  # its own claim, which the driver retried once the answer was lost
            if now - known["created_at"] >= IDEMPOTENCY_TTL:
                # Expired but not yet swept by the TTL monitor: take the key over.
                with _driver_errors(self._writes):
                    await self._idempotency.delete_one(
                        {"_id": key_id, "created_at": known["created_at"]}
                    )
                continue
            if known["fingerprint"] != body_print:
                raise IdempotencyConflict(idempotency.key)
            # The first attempt's insert may be lost or still in flight: finish it. Its id
            # taken means it landed, and then either the document or its tombstone answers:
            # a delete leaves one in the same record, so this insert can never bring back a
            # document that was deleted (see delete). A delete marks the key once its tombstone
            # is written (an earlier version's marked it and left none): it never re-inserts.
            if not known.get("deleted"):
                lost = known["document"]
                words = await _words_of(lost["title"], lost["content"])
                await self._insert_new(self._docs, {**lost, "words": words})
            try:
                return await self.get(known["document"]["_id"])
            except DocumentNotFound:
                raise IdempotencyConflict(
                    idempotency.key, "for a document that has since been deleted"
                ) from None
        raise StoreUnavailable("idempotency key is contended; retry")

    async def get(self, doc_id: str) -> Document:
        self._require_indexes()
        with _uncharged(), _driver_errors(self._reads):
            raw = await self._docs.find_one({"_id": doc_id, **LIVE}, NO_WORDS)
        if raw is None:
            raise DocumentNotFound(doc_id)
        return _from_mongo(raw)

    async def page(
        self, query: DocumentQuery, *, limit: int, after: Key | None = None
    ) -> tuple[list[Document], Key | None]:
        """Two reads: the sizes of the next `limit` matches, then as many of them as fit in
        PAGE_MAX_BYTES (at least one), and the one after to tell whether this is the last page.
        A listing of large documents reads and decodes on the event loop about what its page
        can send, not `limit` documents of any size."""
        self._require_indexes()
        bounds = (query.created_after, query.created_before, query.updated_after)
        if query.words or query.tag or query.metadata or any(bounds) or query.updated_before:
            # It may match sparsely, and MongoDB walks the matches of one filter or of the sort:
            # wait for the key's lane (ratelimit.StoreWork), as the embedded store's reads that
            # take long do.
            await StoreWork.before_long_work()
            return await self._page(query, limit, after)
        with _uncharged():
            return await self._page(query, limit, after)

    async def _page(
        self, query: DocumentQuery, limit: int, after: Key | None
    ) -> tuple[list[Document], Key | None]:
        try:
            with _driver_errors(self._reads):
                sizes = await self._find(query, limit, after, SIZE).to_list(limit)
        except IndexesLost:
            self._remake_indexes()
            raise
        if not sizes:
            return [], None
        total, fit = 0, 0
        for row in sizes:
            total += row["size"]
            if fit and total > PAGE_MAX_BYTES:
                break
            fit += 1
        with _driver_errors(self._reads):
            rows = await self._find(query, fit + 1, after).to_list(fit + 1)
        items = [_from_mongo(raw) for raw in rows[:fit]]
        return items, query.position(items[-1]) if len(rows) > fit else None

    def _find(
        self, query: DocumentQuery, limit: int, after: Key | None, fields: Any = NO_WORDS
    ) -> Any:
        field = query.sort_field
        direction = DESCENDING if query.descending else ASCENDING
        # Tombstones have no times: the bound keeps them out of every listing's index scan.
        clauses: list[dict[str, Any]] = [{field: {"$type": "date"}}]
        if query.words:
            clauses.append({"words": {"$all": list(query.words)}})
        if query.tag:
            clauses.append({"tags": {"$all": query.tag}})
        for name, values in query.metadata_values:
            match = {"k": name, "v": {"$in": list(values)}}
            clauses.append({"metadata": {"$elemMatch": match}})
        for name, start, end in (
            ("created_at", query.created_after, query.created_before),
            ("updated_at", query.updated_after, query.updated_before),
        ):
            # A bound past the last millisecond (9999-12-31T23:59:59.999999) is after every
            # stored time, as in SQLite: a BSON date would cut it down to that millisecond.
            if start is not None:
                clauses.append({name: {"$gt": LAST} if start > LAST else {"$gte": start}})
            if end is not None:
                clauses.append({name: {"$lte": LAST} if end > LAST else {"$lt": end}})
        if after is not None:
            # Past `after` in the sort order: the time bound alone narrows the index scan.
            beyond, up_to = ("$lt", "$lte") if direction == DESCENDING else ("$gt", "$gte")
            at, doc_id = from_millis(after[0]), after[1]
            clauses.append({field: {up_to: at}})
            clauses.append({"$or": [{field: {beyond: at}}, {"_id": {beyond: doc_id}}]})
        return (
            self._docs.find({"$and": clauses}, fields)
            .sort([(field, direction), ("_id", direction)])
            .hint(self._index_for(query))
            .limit(limit)
        )

    @staticmethod
    def _index_for(query: DocumentQuery) -> str:
        """Words and tags are the most selective filters; a metadata value may match most
        documents, so sorting by update time walks that order instead."""
        if query.words:
            return "words_created"
        if query.tag:
            return "tags_created"
        if query.sort_field == "updated_at":
            return "updated"
        return "metadata_created" if query.metadata else "created"

    async def update(
        self, doc_id: str, patch: DocumentUpdate, *, if_version: int | None = None
    ) -> Document:
        # Compare-and-set on version: of two writers that read the same version, one wins.
        while True:
            current = await self.get(doc_id)
            if if_version is not None and current.version != if_version:
                raise stale(doc_id, current.version)
            new = apply_patch(current, patch, self._clock())
            if new is current:
                return current
            with _driver_errors(self._writes):
                # $set, not a replacement: the key that created the document stays with it.
                # Words only when the text changed: a tag or metadata edit leaves them as they are.
                text = (new.title, new.content)
                words = None if text == (current.title, current.content) else await _words_of(*text)
                fields = {k: v for k, v in _to_mongo(new, words).items() if k != "_id"}
                result = await self._docs.update_one(
                    {"_id": doc_id, "version": current.version}, {"$set": fields}
                )
            if result.matched_count == 1:
                return new
            if if_version is not None:
                latest = await self.get(doc_id)
                raise stale(doc_id, latest.version)

    async def delete(self, doc_id: str, *, if_version: int | None = None) -> None:
        """One conditional write on the document itself. The document becomes a tombstone
        under the same id instead of going, for IDEMPOTENCY_TTL: a retry's insert of a create
        whose key may still replay it then finds the id taken and answers 409, in whichever
        order the two arrive, and a delete that does not happen (412, a cut connection) has
        changed nothing, the key included. Every delete leaves one, whatever the record says
        about its key: a restore brings documents back without it."""
        self._require_indexes()
        # One time limit for the whole delete: a write sent again after a reply that did not
        # come gets what the first left, so a hung MongoDB costs MONGO_TIMEOUT_MS, not twice.
        with pymongo.timeout(self._timeout_s):
            await self._delete(doc_id, if_version)

    async def _delete(self, doc_id: str, if_version: int | None) -> None:
        # Whose tombstone it is: a delete whose reply was lost finds out whether it landed.
        tombstone = {"deleted_at": self._clock(), "deleted_by": secrets.token_hex(8)}
        with _driver_errors(self._reads):
            raw = await self._docs.find_one(
                {"_id": doc_id, **LIVE}, ["version", "restored_by", "idempotency_key"]
            )
        key_id = None if raw is None else raw.get("idempotency_key")
        while True:
            if raw is None or "version" not in raw:
                raise DocumentNotFound(doc_id)  # never there, or another request deleted it
            if if_version is not None and raw["version"] != if_version:
                raise stale(doc_id, raw["version"])
            # The version and the copy read, never just "live": a write held on the wire that
            # lands after its 503 has gone out (happened or not) cannot delete a version written
            # since, nor a retry a copy restored over the tombstone its first write left.
            restored_by = raw.get("restored_by")  # None matches a document never restored
            match = {"_id": doc_id, **LIVE, "version": raw["version"], "restored_by": restored_by}
            try:
                done = await self._replace(match, tombstone)
            except StoreUnavailable:
                # The reply is lost, not necessarily the write: send it again. If the first
                # landed, this one matches nothing and the tombstone says whose delete it was.
                done = await self._replace(match, tombstone)
            if not done:
                with _driver_errors(self._reads):
                    raw = await self._docs.find_one(
                        {"_id": doc_id}, ["version", "deleted_by", "restored_by"]
                    )
                # This delete's first write landed; a retry of it matched nothing.
                done = raw is not None and raw.get("deleted_by") == tombstone["deleted_by"]
            if done:
                if key_id is not None:
                    await self._forget_content(key_id, doc_id)
                return
            if raw is not None and "version" in raw and raw.get("restored_by") != restored_by:
                # Deleted since it was read (by this delete's first write, or another's) and
                # then restored: the copy there now came after this delete and stays.
                return
            # Else deleted by another (404), or written since it was read: 412 under If-Match,
            # and without it, the delete of what is there now.

    async def _forget_content(self, key_id: str, doc_id: str) -> None:
        """A deleted document's claim keeps its id and that it was deleted, all a retry needs
        to answer 409, not its text: a delete is for good. A second write (the tombstone is in
        another collection; one atomic step across both would take a transaction, so a replica
        set), after the tombstone: a claim is only emptied for a document that is gone. If it
        fails, the delete stands and the claim keeps the copy until the key expires."""
        try:
            with _driver_errors(self._writes):
                await self._idempotency.update_one(
                    {"_id": key_id, "document._id": doc_id},
                    {"$set": {"document": {"_id": doc_id}, "deleted": True}},
                )
        except StoreUnavailable:
            log.warning("store.claim_kept", extra={"document_id": doc_id})

    async def _replace(self, match: dict[str, Any], record: dict[str, Any]) -> bool:
        with _driver_errors(self._writes):
            return (await self._docs.replace_one(match, record)).matched_count == 1

    async def import_documents(self, docs: Sequence[Document]) -> int:
        self._require_indexes()
        # An id's first document only: inserted at once, a later one could win the race.
        first: dict[str, Document] = {}
        for doc in docs:
            first.setdefault(doc.id, doc)
        return sum(await asyncio.gather(*map(self._import, first.values())))

    async def _import(self, doc: Document) -> bool:
        # Fewer at once than the driver's pool holds (100): each call's time limit runs from its
        # start, and a call queued for a connection would spend it waiting on the others.
        async with self._importing:
            raw = _to_mongo(doc, await _words_of(doc.title, doc.content))
            # Which copy it is: a delete that read another (before a delete and this restore)
            # and retries its write cannot remove this one (see delete).
            raw["restored_by"] = secrets.token_hex(8)
            if await self._insert_new(self._docs, raw):
                return True
            # A restore may bring back what was deleted: over its tombstone.
            with _driver_errors(self._writes):
                result = await self._docs.replace_one({"_id": doc.id, **TOMBSTONE}, raw)
            return result.matched_count == 1

    async def _insert_new(self, collection: Any, record: dict[str, Any]) -> bool:
        """Insert unless a record with its _id exists: False then, never an error."""
        with _driver_errors(self._writes):
            try:
                await collection.insert_one(record)
            except DuplicateKeyError:
                return False
        return True

    async def export_documents(self) -> AsyncIterator[Document]:
        with _driver_errors(self._reads):
            # Oldest first, as on SQLite: ids sort by creation only among the ids made here.
            oldest = [(field, ASCENDING) for field, _ in NEWEST]
            async for raw in self._docs.find(LIVE, NO_WORDS).sort(oldest):
                yield _from_mongo(raw)

    async def count(self) -> int:
        """From the collection's metadata. Tombstones of the last day count too, and after an
        unclean shutdown it may be off until the server next validates the collection."""
        self._require_indexes()  # at once: a start or a scrape without MongoDB waited a second
        with _driver_errors(self._reads):
            return await self._docs.estimated_document_count()

    async def cursor_secret(self) -> bytes:
        """Made by the first process to ask and read by every other (insert-if-absent), and
        read again every SECRET_READ_EVERY_S: a MongoDB back empty gets a new one, made by the
        process that asks first, and a process that kept the old one had signed cursors no
        other process took."""
        if self._cursor_secret is None or time.monotonic() >= self._secret_read_at:
            self._require_indexes()  # no call waits on a MongoDB the start could not reach
            meta = self._db["meta"]
            with _driver_errors(self._reads):
                stored = await meta.find_one({"_id": "cursor_secret"})
            if stored is None:
                made = {"_id": "cursor_secret", "value": secrets.token_bytes(32)}
                await self._insert_new(meta, made)
                with _driver_errors(self._reads):
                    stored = await meta.find_one({"_id": "cursor_secret"})
            if stored is None:
                raise StoreUnavailable("the cursor secret was not stored; try again")
            self._cursor_secret = bytes(stored["value"])
            self._secret_read_at = time.monotonic() + SECRET_READ_EVERY_S
        return self._cursor_secret

    async def check(self) -> None:
        """Writes nothing: the server answers and would take writes (a primary)."""
        self._require_indexes()
        # A server that answers `hello` may still refuse every operation: a read by _id says
        # whether it serves, and only an operation's answer ends an outage. Readiness was 200
        # meanwhile, and each probe logged the outage's end, the next request its beginning.
        with _driver_errors(self._reads, ends_outage=False):
            hello = await self._db.command("hello")
        if not hello.get("isWritablePrimary"):
            raise StoreUnavailable("MongoDB answers but does not take writes (not a primary)")
        with _driver_errors(self._reads):
            await self._db["meta"].find_one({"_id": "cursor_secret"}, {"_id": 1})
            made = {index["name"] async for index in await self._docs.list_indexes()}
        if missing := {*INDEXES, "tombstones"} - made:  # found before a listing meets it
            self._remake_indexes()
            raise StoreUnavailable(f"MongoDB has lost indexes: {', '.join(sorted(missing))}")

    async def close(self) -> None:
        for task in (self.indexes_made, self.words_added):
            if task is not None:
                task.cancel()
        await self._client.close()
