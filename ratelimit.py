"""Rate-limit accounting: `spend()`, one hit on a key's budget in any limits storage, and the
in-process storage behind `RATE_LIMIT_STORAGE_URI=memory://`.

A `limits` storage backend (registered as `local://` through limits' storage registry) that keeps
fixed-window counters in a dict and expires them lazily when they are read. limits' own
`MemoryStorage` starts a fresh timer thread every 10 ms while any window is open, to sweep
expired keys; under load those threads contend for the GIL with the event loop, which measured
20-45 us per request here. The keys are API key names, so the dict is bounded by the number of
configured keys and needs no sweep.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem
from limits.storage import Storage
from limits.strategies import RateLimiter


class LocalStorage(Storage):
    STORAGE_SCHEME = ["local"]

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: float | str | bool
    ) -> None:
        super().__init__(uri, wrap_exceptions, **options)
        self._windows: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self._lock = threading.Lock()

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            count, expires = self._windows.get(key, (0, 0.0))
            if expires <= now:  # the previous window is over: this hit opens a new one
                count, expires = 0, now + expiry
            count += amount
            self._windows[key] = (count, expires)
            return count

    def get(self, key: str) -> int:
        with self._lock:
            count, expires = self._windows.get(key, (0, 0.0))
        return count if expires > time.time() else 0

    def get_expiry(self, key: str) -> float:
        now = time.time()
        with self._lock:
            _, expires = self._windows.get(key, (0, 0.0))
        return expires if expires > now else now

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            cleared = len(self._windows)
            self._windows.clear()
        return cleared

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)


def storage_uri(configured: str) -> str:
    """`memory://` (in-process counting) is served by LocalStorage; other URIs pass through."""
    return "local://" if configured == "memory://" else configured


@dataclass(frozen=True, slots=True, order=True)
class Budget:
    """One hit's outcome in one window, with what the X-RateLimit-* headers report; budgets
    order by what remains."""

    remaining: int
    allowed: bool
    limit: int
    reset_at: float  # epoch seconds


def spend(limiter: RateLimiter, item: RateLimitItem, identifier: str) -> Budget:
    """Spend one unit of `identifier`'s budget in the fixed window the service configures. The
    same arithmetic as limits' `FixedWindowRateLimiter.hit()` followed by `get_window_stats()`,
    but those ask the storage three times (and build the window's key three times) where
    `incr()` already returns the count: two storage calls instead of three, which with Redis
    are two round trips on the event loop, not three."""
    storage = limiter.storage
    window = item.key_for(identifier)
    count = storage.incr(window, item.get_expiry())
    return Budget(
        max(0, item.amount - count), count <= item.amount, item.amount, storage.get_expiry(window)
    )
