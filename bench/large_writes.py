"""Other clients' GETs while one client writes large documents back to back, on the embedded store.

Starts `python main.py` (one worker) on a temp dir. A client in a process of its own creates a
document of 100 000 characters of CHAR, then PATCHes it, without a pause; this process GETs a
small document every 5 ms meanwhile, and first alone. Prints the GETs' p50, p99 and slowest,
and how many large documents were written. `.venv/bin/python bench/large_writes.py [CHAR...]`
(default: U+FDFA, which folds 18-fold, and `é`).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

import httpx
from run import KEY, free_port, start, stop

SECONDS = 8
CHARS = 100_000


def write_large(url: str, char: str, stop_writing: Event, written: Synchronized[int]) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
        while not stop_writing.is_set():
            doc = client.post("/v1/documents", json={"title": "t", "content": char * CHARS})
            assert doc.status_code == 201, doc.text
            edit = {"content": char * (CHARS - 1) + "x"}
            assert client.patch(f"/v1/documents/{doc.json()['id']}", json=edit).status_code == 200
            written.value += 1


def gets(client: httpx.Client, path: str, seconds: float) -> str:
    took: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        assert client.get(path).status_code == 200
        took.append((time.perf_counter() - started) * 1000)
        time.sleep(0.005)
    took.sort()
    p99 = took[int(len(took) * 0.99)]
    return f"GET p50 {statistics.median(took):.1f} ms, p99 {p99:.1f} ms, slowest {took[-1]:.1f} ms"


def main(chars: list[str]) -> None:
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "API_KEYS": f"bench:{KEY}", "DATA_DIR": data, "PORT": str(port)}
        env |= {"RATE_LIMIT": "1000000/minute"}
        proc, _ = start([sys.executable, "main.py"], env, url)
        try:
            with httpx.Client(base_url=url, headers={"X-API-Key": KEY}) as client:
                small = client.post("/v1/documents", json={"title": "s", "content": "small"})
                path = f"/v1/documents/{small.json()['id']}"
                print(f"alone: {gets(client, path, 3)}")
                for char in chars:
                    stop_writing = multiprocessing.Event()
                    written: Synchronized[int] = multiprocessing.Value("i")
                    writer = multiprocessing.Process(
                        target=write_large, args=(url, char, stop_writing, written)
                    )
                    writer.start()
                    try:
                        print(f"beside U+{ord(char):04X}: {gets(client, path, SECONDS)}", end="")
                    finally:
                        stop_writing.set()
                        writer.join()
                    print(f"; {written.value} large documents written and patched")
        finally:
            stop(proc)


if __name__ == "__main__":
    main(sys.argv[1:] or ["\ufdfa", "\u00e9"])
