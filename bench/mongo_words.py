"""What a document with many distinct words costs the MongoDB store: its create, the database's
growth, and other clients' GET latency while it is PATCHed. Runs on SecantusDB, in a process of
its own (in this one it would share the interpreter lock with the store), on a temp dir:
`.venv/bin/python bench/mongo_words.py [WORDS]`."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import DocumentCreate, DocumentUpdate
from mongo_store import MongoStore


def cjk_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(
        chr(0x4E00 + rng.randrange(20_000)) + chr(0x4E00 + rng.randrange(20_000))
        for _ in range(words)
    )


async def size(store: MongoStore) -> int:
    stats = await store._db.command("dbStats")
    return int(stats.get("dataSize", 0) + stats.get("indexSize", 0))


async def loop_lag(busy: asyncio.Event) -> list[float]:
    """How late a 1 ms timer fires: the time this process's event loop was kept from others
    (a GET's latency also includes the server's, which in SecantusDB is one interpreter)."""
    late = []
    while not busy.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        late.append((time.perf_counter() - started) * 1000 - 1)
    return late


async def gets_while(store: MongoStore, doc_id: str, busy: asyncio.Event) -> list[float]:
    took = []
    while not busy.is_set():
        started = time.perf_counter()
        await store.get(doc_id)
        took.append((time.perf_counter() - started) * 1000)
    return took


def main(words: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "secantus", "--port", str(port), "--storage-path", data]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            asyncio.run(measure(f"mongodb://127.0.0.1:{port}/bench?directConnection=true", words))
        finally:
            server.terminate()
            server.wait(30)


async def measure(url: str, words: int) -> None:
    store = await MongoStore.open(url, timeout_ms=120_000)
    small, _ = await store.create(DocumentCreate(title="small", content="a few words"))
    timings = []
    for n in range(5):
        started = time.perf_counter()
        await store.create(DocumentCreate(title="s", content=f"small {n}"))
        timings.append((time.perf_counter() - started) * 1000)
    print(f"create, small: {statistics.median(timings):.1f} ms")
    before = await size(store)
    big_ids, timings = [], []
    for n in range(5):
        started = time.perf_counter()
        doc, _ = await store.create(DocumentCreate(title="big", content=cjk_text(words, n)))
        timings.append((time.perf_counter() - started) * 1000)
        big_ids.append(doc.id)
    print(f"create, {words} distinct words: {statistics.median(timings):.1f} ms")
    print(f"database growth per 5 such documents: {(await size(store) - before) / 1e6:.1f} MB")
    # Made before the clock runs: building them is the benchmark's work, not the store's.
    patches = [DocumentUpdate(content=cjk_text(words, 100 + n)) for n in range(10)]
    for label, patching in (("idle", False), ("while PATCHing a large document", True)):
        done = asyncio.Event()
        reader = asyncio.create_task(gets_while(store, small.id, done))
        lag = asyncio.create_task(loop_lag(done))
        for patch in patches:
            if patching:
                await store.update(big_ids[0], patch)
            else:
                await asyncio.sleep(0.05)
        done.set()
        took, late = await reader, await lag
        print(
            f"{label}: GET p50 {statistics.median(took):.2f} ms, max {max(took):.1f} ms; "
            f"event loop late by at most {max(late):.1f} ms"
        )
    await store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 33_000)
