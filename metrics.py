"""Prometheus metrics: one registry per app, fed by the request middleware, and a store
wrapper that times every store operation."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

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
from prometheus_client.context_managers import Timer

from index import Key
from models import Document, DocumentCreate, DocumentQuery, DocumentUpdate
from storage import DocumentStore, IdempotencyKey

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
# Routes that are not API traffic: a scrape is not counted by the metrics it reads.
_UNCOUNTED_ROUTES = frozenset({"/metrics"})


class Metrics:
    """Every metric the service exports, on its own registry so that apps never share state."""

    def __init__(self, *, multiprocess: bool = False) -> None:
        """With `multiprocess` (several uvicorn workers; PROMETHEUS_MULTIPROC_DIR set before they
        start), values live in files that /metrics sums across workers."""
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry()
        if not multiprocess:
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
            "rate_limited_total", "Requests refused with 429.", registry=self.registry
        )
        # Bounded: methods x route templates x statuses, never raw paths.
        self._request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.auth_failures = Counter(
            "auth_failures_total", "Requests refused with 401.", registry=self.registry
        )

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(merged)

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


class MeteredStore:
    """A DocumentStore that times each operation."""

    def __init__(self, store: DocumentStore, metrics: Metrics) -> None:
        self.inner = store
        self.backend = store.backend
        self._timers = {
            op: metrics.store_duration.labels(op)
            for op in ("create", "get", "page", "update", "delete", "import", "check")
        }

    def _timed(self, operation: str) -> Timer:
        return self._timers[operation].time()

    async def create(
        self, data: DocumentCreate, *, idempotency: IdempotencyKey | None = None
    ) -> tuple[Document, bool]:
        with self._timed("create"):
            return await self.inner.create(data, idempotency=idempotency)

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
        with self._timed("update"):
            return await self.inner.update(doc_id, patch, if_version=if_version)

    async def delete(self, doc_id: str, *, if_version: int | None = None) -> None:
        with self._timed("delete"):
            await self.inner.delete(doc_id, if_version=if_version)

    async def import_document(self, doc: Document) -> bool:
        with self._timed("import"):
            return await self.inner.import_document(doc)

    def export_documents(self) -> AsyncIterator[Document]:
        return self.inner.export_documents()

    async def count(self) -> int:
        return await self.inner.count()

    async def check(self) -> None:
        with self._timed("check"):
            await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()
