"""Prometheus metrics: one registry per app, fed by the request middleware, and a store
wrapper that times every store operation and counts its failures."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    multiprocess,
    platform_collector,
    process_collector,
)
from starlette.exceptions import HTTPException

from models import Document, DocumentCreate, DocumentQuery, DocumentUpdate
from ratelimit import StoreWork
from storage import (
    DocumentInvalid,
    DocumentNotFound,
    DocumentStore,
    IdempotencyConflict,
    IdempotencyKey,
    Key,
    PreconditionFailed,
    ReadStopped,
    StoreUnavailable,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From 100 us: reads are answered in far less than the millisecond a coarser first bucket starts at.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Every label value a client can choose must come from a small fixed set: probes answer without
# a key, and each new method, route or status would otherwise add series to /metrics for good.
# Methods this service serves keep their name (OPTIONS: CORS preflights, 405s); the parser accepts
# some thirty more (PROPFIND, MKCOL, ...), all counted as "other". Routes are already templates
# (middleware.route_template) and statuses the service's own.
_METHODS = frozenset({"GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
SCRAPE_PATH = "/metrics"
# Routes that are not API traffic: a scrape is not counted by the metrics it reads.
_UNCOUNTED_ROUTES = frozenset({SCRAPE_PATH})
# The embedded store's files in DATA_DIR: the database and SQLite's write-ahead log.
DATABASE_FILE = "documents.db"
WAL_FILE = "documents.db-wal"
_OPERATIONS = ("create", "get", "page", "update", "delete", "import", "check")
# The operations that read documents for a client, charged to its key by their time. Not writes:
# their time is mostly waiting for a group commit and its fsync, which others' load sets, and
# their cost per document is already bounded.
_READS = frozenset({"get", "page"})
# What a client caused (a missing document, a stale If-Match, a reused idempotency key, a change
# the stored document refuses) is an answer, counted as a 4xx in http_requests_total, not a
# failure of the store.
_CLIENT_OUTCOMES = (
    DocumentNotFound,
    PreconditionFailed,
    IdempotencyConflict,
    DocumentInvalid,
    HTTPException,  # a key's budget spent by its work before (ratelimit.StoreWork)
)

log = logging.getLogger("documents.metrics")
DISK_NEARLY_FULL = 0.1  # free share of DATA_DIR's volume below which a scrape warns (as the alert)


MULTIPROCESS_PREFIX = "documents-metrics-"


@contextlib.contextmanager
def multiprocess_directory() -> Iterator[str]:
    """A directory for the workers' metric files, removed when the service stops. A service
    killed with kill -9 cannot remove its own: each holds a lock on its directory (released by
    the kernel at its death), and a start removes the directories nobody holds."""
    temp = Path(tempfile.gettempdir())
    for directory in temp.glob(MULTIPROCESS_PREFIX + "*"):
        with contextlib.suppress(OSError):  # held: its service lives; no lock: not one of ours
            with (directory / ".lock").open() as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(directory, ignore_errors=True)
    # Made under another name and locked, then renamed: no start sees it unheld under its name.
    made = Path(tempfile.mkdtemp(prefix="." + MULTIPROCESS_PREFIX))
    with (made / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        directory = made.rename(temp / made.name[1:])
        try:
            yield str(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _forget_dead_workers() -> None:
    """A worker killed with kill -9 never marks itself dead (close), and its live gauges (the
    requests it had in progress) counted for ever: the worker that replaces it does."""
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream
        except PermissionError:
            pass  # alive, another user's: not a worker of this service


class Metrics:
    """Every metric the service exports, on its own registry so that apps never share state."""

    def __init__(self, *, multiprocess: bool = False, data_dir: Path | None = None) -> None:
        """With `multiprocess` (several uvicorn workers; PROMETHEUS_MULTIPROC_DIR set before they
        start), values live in files that /metrics sums across workers. `data_dir` (the embedded
        store's; None with MongoDB) is measured at each scrape: its files' sizes, its free space."""
        self.multiprocess = multiprocess
        self.data_dir = data_dir
        self.registry = CollectorRegistry()
        if multiprocess:
            _forget_dead_workers()
        else:
            # These read this process only; prometheus-client cannot merge them across workers.
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "http_requests_in_progress",
            "HTTP requests being served.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.documents = Gauge(
            "documents_stored",
            "Documents in the store, as of the last scrape.",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.store_duration = Histogram(
            "store_operation_duration_seconds",
            "Time spent in each store operation, including waiting for durable writes.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "rate_limited_total",
            "Requests with a valid key refused with 429 (over its budget, or too many at once).",
            registry=self.registry,
        )
        # Bounded: served methods and "other" x route templates x statuses, never raw paths.
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.auth_failures = Counter(
            "auth_failures_total",
            "Requests without a valid key refused: 401, or 429 over their address's budget.",
            registry=self.registry,
        )
        self.store_errors = Counter(
            "store_errors_total",
            "Store operations that failed, by operation and error class (a client's mistake, "
            "such as a missing document, is not counted).",
            ["operation", "kind"],
            registry=self.registry,
        )
        # The failure a running store raises (a disk that refuses a write, MongoDB out of
        # reach): its series exist from the start at 0, so increase() sees the very first one.
        for operation in _OPERATIONS:
            self.store_errors.labels(operation, StoreUnavailable.__name__)
        if data_dir is not None:
            self.database_bytes = Gauge(
                "store_database_bytes",
                f"Size of DATA_DIR/{DATABASE_FILE} at the last scrape (0 when absent).",
                registry=self.registry,
                multiprocess_mode="mostrecent",
            )
            self.wal_bytes = Gauge(
                "store_wal_bytes",
                f"Size of DATA_DIR/{WAL_FILE} at the last scrape (0 when absent).",
                registry=self.registry,
                multiprocess_mode="mostrecent",
            )
            self.free_bytes = Gauge(
                "data_dir_free_bytes",
                "Bytes the service may still write on DATA_DIR's filesystem, at the last scrape.",
                registry=self.registry,
                multiprocess_mode="mostrecent",
            )
            self.size_bytes = Gauge(
                "data_dir_size_bytes",
                "Size of DATA_DIR's filesystem, at the last scrape.",
                registry=self.registry,
                multiprocess_mode="mostrecent",
            )

    def render(self) -> bytes:
        """The exposition text, with the data directory measured now. It may wait on the disk:
        call it from a worker thread."""
        if self.data_dir is not None:
            self._measure(self.data_dir)
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(merged)

    def _measure(self, data_dir: Path) -> None:
        """Three system calls whatever the store holds: stat and statvfs never read a file.
        NaN says "could not look" (the directory is gone, say): never a made-up number."""
        self.database_bytes.set(_file_size(data_dir / DATABASE_FILE))
        self.wal_bytes.set(_file_size(data_dir / WAL_FILE))
        try:
            volume = os.statvfs(data_dir)
        except OSError:
            self.free_bytes.set(math.nan)
            self.size_bytes.set(math.nan)
            return
        # f_bavail, not f_bfree: the blocks reserved for root are not the service's to use.
        free, size = volume.f_bavail * volume.f_frsize, volume.f_blocks * volume.f_frsize
        self.free_bytes.set(free)
        self.size_bytes.set(size)
        if free < size * DISK_NEARLY_FULL:
            # For an operator to act on before writes fail: at most one line per scrape.
            log.warning("store.disk_nearly_full", extra={"free_bytes": free, "size_bytes": size})

    def close(self) -> None:
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # untyped upstream

    # RequestObserver: called by the request middleware, labelled by route template (never the
    # raw path, whose ids would make a new series per document).

    def request_started(self) -> None:
        self.in_progress.inc()

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        self.in_progress.dec()
        if route in _UNCOUNTED_ROUTES:
            return
        if method not in _METHODS:
            method = OTHER_METHOD
        series = self._request_series.get((method, route, status))
        if series is None:
            # labels() validates and locks on every call: look each labelled child up once.
            series = (
                self.requests.labels(method, route, str(status)),
                self.duration.labels(method, route),
            )
            self._request_series[method, route, status] = series
        series[0].inc()
        series[1].observe(seconds)


def _file_size(path: Path) -> float:
    """0 for a file that is not there (SQLite makes its WAL on demand), NaN for one that cannot
    be looked at."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
    except OSError:
        return math.nan


COUNT_EVERY_S = 5.0  # how stale the documents count of /health/ready and /metrics may be


class _Edits:
    """One document's edits in this process: one at a time, and when one last failed for want
    of the store."""

    __slots__ = ("__weakref__", "failed_at", "lock")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.failed_at = -math.inf


class _Measured:
    """Times one store operation, counts its failure by error class, and adds a read's time
    to the request's StoreWork."""

    __slots__ = ("_duration", "_errors", "_operation", "_started", "_waits")

    def __init__(self, duration: Histogram, errors: Counter, operation: str) -> None:
        self._duration = duration
        self._errors = errors
        self._operation = operation
        self._started = self._waits = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()
        self._waits = StoreWork.waits_so_far()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._started
        self._duration.observe(seconds)
        # A cancellation (the client left, a timeout) is a BaseException: not the store's failure.
        failed = isinstance(exc, Exception) and not isinstance(exc, _CLIENT_OUTCOMES)
        if failed:
            self._errors.labels(self._operation, type(exc).__name__).inc()
        # The store's failure (MongoDB out of reach) is not the client's cost: answers count, and
        # reads the database stopped at their time limit, which their cost ran into; less what
        # the store recorded as waits during this read (StoreWork.waited), not the read's cost.
        if self._operation in _READS and (not failed or isinstance(exc, ReadStopped)):
            StoreWork.add(seconds - (StoreWork.waits_so_far() - self._waits))


class MeteredStore:
    """A DocumentStore that times each operation and counts the ones that fail, and edits one
    document at a time. It also keeps the documents count that /health/ready and /metrics show,
    which anyone may ask for: counted at most every COUNT_EVERY_S, whatever the size of the data
    (SQLite's count walks an index; some MongoDB servers' estimate walks the collection) or the
    rate of requests; this process's own creates and deletes change it at once, others' show at
    the next count."""

    def __init__(self, store: DocumentStore, metrics: Metrics) -> None:
        self.inner = store
        self.backend = store.backend
        self._errors = metrics.store_errors
        self._timers = {op: metrics.store_duration.labels(op) for op in _OPERATIONS}
        self._counted_at, self._count = -math.inf, 0
        self._editing: weakref.WeakValueDictionary[str, _Edits] = weakref.WeakValueDictionary()

    @contextlib.asynccontextmanager
    async def _edit(self, doc_id: str) -> AsyncIterator[None]:
        """One edit of a document at a time in this process. Racing edits of one document
        otherwise each find its words again after every other's write: K of a large document
        cost K²/2 tokenizings, a second of CPU each at K = 40. An edit that waited while an
        edit failed for want of the store (a hung MongoDB) fails at once too: each had waited
        out its own time limit behind the others, the sixth answering after six."""
        edits = self._editing.get(doc_id)
        if edits is None:
            edits = self._editing[doc_id] = _Edits()
        asked = time.monotonic()
        async with edits.lock:
            if edits.failed_at >= asked:
                raise StoreUnavailable("the store failed the edit before this one; try again")
            try:
                yield
            except StoreUnavailable:
                edits.failed_at = time.monotonic()
                raise

    def _timed(self, operation: str) -> _Measured:
        return _Measured(self._timers[operation], self._errors, operation)

    async def create(
        self, data: DocumentCreate, *, idempotency: IdempotencyKey | None = None
    ) -> tuple[Document, bool]:
        with self._timed("create"):
            doc, replayed = await self.inner.create(data, idempotency=idempotency)
        self._count += not replayed
        return doc, replayed

    async def get(self, doc_id: str) -> Document:
        with self._timed("get"):
            return await self.inner.get(doc_id)

    async def page(
        self, query: DocumentQuery, *, limit: int, after: Key | None = None
    ) -> tuple[list[Document], Key | None]:
        with self._timed("page"):
            return await self.inner.page(query, limit=limit, after=after)

    async def update(
        self, doc_id: str, patch: DocumentUpdate, *, if_version: int | None = None
    ) -> Document:
        async with self._edit(doc_id):
            with self._timed("update"):
                return await self.inner.update(doc_id, patch, if_version=if_version)

    async def delete(self, doc_id: str, *, if_version: int | None = None) -> None:
        async with self._edit(doc_id):
            with self._timed("delete"):
                await self.inner.delete(doc_id, if_version=if_version)
        self._count -= 1

    async def import_documents(self, docs: Sequence[Document]) -> int:
        with self._timed("import"):
            imported = await self.inner.import_documents(docs)
        self._count += imported
        return imported

    def export_documents(self) -> AsyncIterator[Document]:
        return self.inner.export_documents()

    async def count(self) -> int:
        if time.monotonic() >= self._counted_at + COUNT_EVERY_S:
            self._count = await self.inner.count()
            self._counted_at = time.monotonic()
        return self._count

    async def cursor_secret(self) -> bytes:
        return await self.inner.cursor_secret()

    async def check(self) -> None:
        with self._timed("check"):
            await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()
