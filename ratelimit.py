"""Rate-limit accounting on `limits`' asyncio API: `spend()`, hits on a key's budget in every
configured window, and the storages behind `RATE_LIMIT_STORAGE_URI`; and `StoreWork`, what a
request's store work costs its key.

`memory://` is `LocalStorage` below: fixed-window counters in a dict, expired lazily when read.
limits' asyncio memory storage schedules an expiry task on every hit (and its sync one a sweeper
timer), work on the event loop for every request; here windows that are over are dropped in one
pass whenever the dict has doubled, so memory follows the budgets in use (API keys, and the client
addresses of requests without a key), not every address ever seen. `redis://` and `rediss://` are
limits' asyncio Redis storage over redis-py, so a round trip never blocks the event loop, and
every spend is bounded by `TIMEOUT`: a slow or unreachable Redis costs a request a 503, never
the process its liveness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import anyio
from limits import RateLimitItem
from limits.aio.storage import RedisStorage, Storage
from limits.errors import StorageError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from logging_config import Outage

log = logging.getLogger("documents.ratelimit")
# How long one request may wait on the rate-limit store before it is answered 503.
TIMEOUT = 1.0


class LimiterUnavailable(Exception):
    """The rate-limit store did not answer within TIMEOUT, or failed."""


class LocalStorage(Storage):
    STORAGE_SCHEME = ["async+local"]
    SWEEP_FROM = 1024  # windows held before the first sweep for ended ones

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: float | str | bool
    ) -> None:
        super().__init__(uri, wrap_exceptions, **options)
        self._windows: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self._sweep_at = self.SWEEP_FROM

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    # Each method runs on the event loop without awaiting: no lock is needed.

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        count, expires = self._windows.get(key, (0, 0.0))
        if expires <= now:  # the previous window is over: this hit opens a new one
            count, expires = 0, now + expiry
            if len(self._windows) >= self._sweep_at:
                self._sweep(now)
        count += amount
        self._windows[key] = (count, expires)
        return count

    def _sweep(self, now: float) -> None:
        """Drop every ended window; the next sweep waits until the dict has doubled again, so
        the cost per hit stays constant however many clients come and go."""
        self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
        self._sweep_at = max(self.SWEEP_FROM, 2 * len(self._windows))

    async def get(self, key: str) -> int:
        count, expires = self._windows.get(key, (0, 0.0))
        return count if expires > time.time() else 0

    async def get_expiry(self, key: str) -> float:
        now = time.time()
        _, expires = self._windows.get(key, (0, 0.0))
        return expires if expires > now else now

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        cleared = len(self._windows)
        self._windows.clear()
        return cleared

    async def clear(self, key: str) -> None:
        self._windows.pop(key, None)


class RedisLimits(RedisStorage):
    """limits' asyncio Redis storage over redis-py, with its own outage (Redis not answering
    within TIMEOUT), logged once as it begins and once as it ends: one per app, as the storage
    is, so that one app's Redis answering does not end another's outage."""

    def __init__(self, uri: str) -> None:
        # redis-py's own timeouts bound each socket operation; TIMEOUT bounds the whole spend.
        super().__init__(
            f"async+{uri}",
            implementation="redispy",
            wrap_exceptions=True,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            # Once more on a new connection: a pooled one Redis closed while idle (its `timeout`,
            # a restart) fails at its next use though Redis answers. TIMEOUT still bounds it all.
            retry=Retry(NoBackoff(), retries=1),  # type: ignore[arg-type]  # limits passes it on
        )
        self.outage = Outage(log, "rate_limit", logging.ERROR)


def open_storage(uri: str) -> Storage:
    """The storage for a `RATE_LIMIT_STORAGE_URI` (`memory://` or a Redis URI: Settings checks)."""
    return LocalStorage() if uri == "memory://" else RedisLimits(uri)


@dataclass(frozen=True, slots=True, order=True)
class Budget:
    """One hit's outcome in one window, with what the X-RateLimit-* headers report; budgets
    order by what remains."""

    remaining: int
    allowed: bool
    limit: int
    reset_at: float  # epoch seconds


@contextmanager
def _bounded(storage: Storage) -> Iterator[None]:
    """At most TIMEOUT on the rate-limit store; its failures become LimiterUnavailable here.
    The local store never waits, so it goes unbounded: a timeout scope is the costliest part
    of a spend, on every request."""
    if not isinstance(storage, RedisLimits):
        yield
        return
    try:
        with anyio.fail_after(TIMEOUT):
            yield
    except (TimeoutError, StorageError) as exc:
        storage.outage.failed(repr(exc.__cause__ or exc)[:200])
        raise LimiterUnavailable("The rate-limit store did not answer; try again shortly.") from exc
    else:
        storage.outage.answered()


async def spend(
    storage: Storage, items: list[RateLimitItem], identifier: str, units: int = 1
) -> list[Budget]:
    """Spend `units` of `identifier`'s budget in each window: limits' fixed-window arithmetic,
    but with `incr()`'s returned count instead of a separate read, so two storage calls per
    window rather than three (two Redis round trips)."""
    budgets = []
    with _bounded(storage):
        for item in items:
            window = item.key_for(identifier)
            count = await storage.incr(window, item.get_expiry(), units)
            reset_at = await storage.get_expiry(window)
            budgets.append(
                Budget(max(0, item.amount - count), count <= item.amount, item.amount, reset_at)
            )
    return budgets


async def check(storage: Storage) -> None:
    """Raise LimiterUnavailable unless the store answers within TIMEOUT."""
    with _bounded(storage):
        # A read, not limits' check(): that answers False for every failure, so a refused
        # password was logged as an unreachable Redis. A read raises the cause.
        await storage.get("check")


class StoreWork:
    """One request's store work: the seconds its reads, and the finding of a written document's
    words, took, which admission charges to its key as its answer starts (writes' own time is
    others' group commit, so it is not charged); and the key's lane. Work that may take more
    than a moment (a read moved off the event loop, a MongoDB listing with a filter or a time
    range, words found in a thread) first takes the lane, held until the request's charge is
    spent: a key so runs one such piece of work at
    a time in the process, each after the charges of those before, and `check` refuses it (429)
    once they have spent the budget. Otherwise work started at once ran ahead of every charge:
    60 listings of 330 ms each answered within one window of 60 units."""

    __slots__ = ("_check", "_ended", "_held", "_lane", "seconds", "waits")

    def __init__(
        self, lane: asyncio.Lock | None, check: Callable[[], Awaitable[None]] | None
    ) -> None:
        self.seconds = 0.0
        # Waits a read saw (for the lane, a server, a connection, an attempt never answered,
        # the processor), which its charged time leaves out.
        self.waits = 0.0
        self._lane, self._check = lane, check
        self._held = self._ended = False

    @classmethod
    def start(
        cls,
        lane: asyncio.Lock | None = None,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> StoreWork:
        """A fresh record for the request being served, which its store work adds to (a task or
        thread the request starts copies the context, and so shares it)."""
        work = cls(lane, check)
        _store_work.set(work)
        return work

    @staticmethod
    def add(seconds: float) -> None:
        if (work := _store_work.get()) is not None:
            work.seconds += seconds

    @staticmethod
    def waited(seconds: float) -> None:
        if (work := _store_work.get()) is not None:
            work.waits += seconds

    @staticmethod
    def waits_so_far() -> float:
        work = _store_work.get()
        return 0.0 if work is None else work.waits

    @staticmethod
    async def before_long_work() -> None:
        """Wait for the key's lane, once per request; the wait is not work: a read that
        includes it leaves it out of its charge."""
        work = _store_work.get()
        if work is None or work._lane is None or work._held or work._ended:
            return
        started = time.perf_counter()
        await work._lane.acquire()
        work.waits += time.perf_counter() - started
        work._held = True
        if work._ended:  # a task that outlived its request
            work.end()
        elif work._check is not None:
            await work._check()

    @property
    def ended(self) -> bool:
        return self._ended

    def end(self) -> None:
        """The request's work is charged: the key's next long work may go."""
        self._ended = True
        if self._held and self._lane is not None:
            self._held = False
            self._lane.release()


_store_work: ContextVar[StoreWork | None] = ContextVar("store_work", default=None)
