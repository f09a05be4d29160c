"""`make soak`: 60 s of mixed load at 64 connections against one `python main.py` on loopback:
70% reads, 20% lists, 10% writes (creates, and deletes of documents the soak created, so the
live set stays level and memory growth means a leak, not more data). Every acknowledged write is
checked afterwards. Fails on any 5xx, any lost or resurrected write, RSS growth of 10% or more
between the 20th and the 60th second, a rise in the floor of open non-socket descriptors, or
more open sockets than the client has connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from run import KEY, rss_mb, seed, start_service, wait_ready

DURATION = 60
CONNECTIONS = 64


def open_fds(pid: int) -> tuple[int, int]:
    """(sockets, everything else) the process holds open."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    sockets = sum(t.startswith("socket:") for t in targets)
    return sockets, len(targets) - sockets


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.server_errors = 0
        self.created: set[str] = set()
        self.deleted: set[str] = set()


async def worker(client: httpx.AsyncClient, ids: list[str], tally: Tally, until: float) -> None:
    rng = random.Random()
    mine: list[str] = []
    while time.monotonic() < until:
        roll = rng.random()
        if roll < 0.70:
            response = await client.get(f"/v1/documents/{rng.choice(ids)}")
        elif roll < 0.90:
            response = await client.get("/v1/documents", params={"limit": 20})
        elif mine and rng.random() < 0.5:
            doc_id = mine.pop(rng.randrange(len(mine)))
            response = await client.delete(f"/v1/documents/{doc_id}")
            if response.status_code == 204:
                tally.deleted.add(doc_id)
        else:
            body = {"title": f"soak {tally.requests}", "content": "y" * 500, "tags": ["soak"]}
            response = await client.post("/v1/documents", json=body)
            if response.status_code == 201:
                doc_id = response.json()["id"]
                tally.created.add(doc_id)
                mine.append(doc_id)
        tally.requests += 1
        if response.status_code >= 500:
            tally.server_errors += 1


async def drive(url: str, ids: list[str]) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": KEY}, limits=limits, timeout=30
    ) as client:
        until = time.monotonic() + DURATION
        await asyncio.gather(*(worker(client, ids, tally, until) for _ in range(CONNECTIONS)))
    return tally


def listed_ids(url: str) -> set[str]:
    found: set[str] = set()
    cursor = None
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30) as client:
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/documents", params=params).json()
            found |= {d["id"] for d in page["items"]}
            if (cursor := page["next_cursor"]) is None:
                return found


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        data_dir = Path(tmp) / "data"
        ids, _ = seed(data_dir, 1000)
        server, url = start_service(data_dir)
        try:
            wait_ready(url, server)
            samples: dict[int, tuple[float, tuple[int, int]]] = {}

            def sample() -> None:
                started = time.monotonic()
                for second in range(10, DURATION):
                    time.sleep(max(0.0, started + second - time.monotonic()))
                    samples[second] = (rss_mb(server.pid), open_fds(server.pid))

            sampler = threading.Thread(target=sample)
            sampler.start()
            started = time.monotonic()
            tally = asyncio.run(drive(url, ids))
            elapsed = time.monotonic() - started
            sampler.join()
            stored = listed_ids(url)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    rss20, rss60 = samples[20][0], samples[DURATION - 1][0]
    # Client connections come and go (the socket count swings by ten from second to second), so
    # sockets are bounded by the client's connections. Every other descriptor (data files, pipes,
    # the event loop's) must keep its floor: compaction opens a temp file for a moment, a leak
    # stays open.
    files20 = min(files for _, (_, files) in (samples[s] for s in range(10, 25)))
    files60 = min(files for _, (_, files) in (samples[s] for s in range(DURATION - 15, DURATION)))
    most_sockets = max(sockets for _, (sockets, _) in samples.values())
    expected = set(ids) | (tally.created - tally.deleted)
    rate = tally.requests / elapsed
    print(f"requests: {tally.requests} ({rate:.0f}/s over {CONNECTIONS} connections)")
    print(
        f"5xx: {tally.server_errors}; created: {len(tally.created)}; deleted: {len(tally.deleted)}"
    )
    print(f"documents expected: {len(expected)}; stored: {len(stored)}")
    print(f"RSS: {rss20:.1f} MB at 20 s, {rss60:.1f} MB at 60 s ({rss60 / rss20 - 1:+.1%})")
    print(f"other open fds, fewest: {files20} in 10-25 s, {files60} in the last 15 s")
    print(f"sockets: at most {most_sockets} (client connections: {CONNECTIONS}, plus the listener)")
    failures = []
    if tally.server_errors:
        failures.append(f"{tally.server_errors} responses were 5xx")
    if expected - stored:
        failures.append(f"{len(expected - stored)} acknowledged documents are missing")
    if stored - expected:
        failures.append(f"{len(stored - expected)} deleted or unknown documents are present")
    if rss60 >= rss20 * 1.10:
        failures.append("RSS grew by 10% or more")
    if files60 > files20:
        failures.append("open file descriptors grew")
    if most_sockets > CONNECTIONS + 1:
        failures.append("more sockets open than the client has connections")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("soak: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
